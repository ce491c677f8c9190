"""Feature layouts: how a module's output becomes the per-sample feature maps the accumulator takes.

Every layout ends as [N, C, positions...]: one row of C channels per position, averaged per sample first.
- [N, C, H, W] conv maps (channels on axis 1), per image, as the paper's matrix;
- [N, C] vectors: one position per sample;
- [N, T, C] token sequences (channels last): the tokens are a sample's positions, so each sample's tokens are
  averaged like a conv map's positions; ``prefix_tokens`` leading tokens (CLS, registers) are dropped, kept
  as ordinary tokens, or taken alone; a [N, T] mask of real tokens leaves the padding out;
- any other axis order: ``channel_axis`` says where the channels are (batch is always axis 0); the library reads
  modules that act on the last axis channels-last without it (``channels_last``);
- tuple or list outputs: ``output_index`` picks the element.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchvision.models.swin_transformer import PatchMerging, PatchMergingV2, SwinTransformerBlock

from eigpipe.errors import EigpipeError, require_whole
from eigpipe.spectral.accumulator import FeatureBatch

PREFIX_POLICIES = ("drop", "keep", "only")
CHANNELS_LAST = (nn.Linear, PatchMerging, PatchMergingV2, SwinTransformerBlock)  # SwinTransformerBlockV2 too


def channels_last(module: nn.Module) -> bool:
    """Whether a module's output has its channels on the last axis whatever its rank: modules that act on the last
    axis (Linear, a LayerNorm over it) and torchvision's Swin blocks and patch merging, which keep [N, H, W, C]
    (torchvision/models/swin_transformer.py); a Sequential as its last module."""
    while isinstance(module, nn.Sequential) and len(module):
        module = module[-1]
    if isinstance(module, nn.LayerNorm):
        return len(module.normalized_shape) == 1
    return isinstance(module, CHANNELS_LAST)


@dataclass(frozen=True)
class Layout:
    """How one layer's output is read; ``channel_axis`` None means by rank (2-D: 1, 3-D: -1 tokens, else 1)."""

    channel_axis: int | None = None
    output_index: int | None = None
    prefix_tokens: int = 0
    prefix: str = "drop"

    def __post_init__(self) -> None:
        if self.prefix not in PREFIX_POLICIES:
            raise EigpipeError(f"prefix: {self.prefix!r} is not one of {', '.join(PREFIX_POLICIES)}")
        require_whole("prefix_tokens", self.prefix_tokens, 0)
        if self.prefix == "only" and self.prefix_tokens == 0:
            raise EigpipeError("prefix: 'only' takes the prefix tokens alone, but prefix_tokens is 0")

    def tensor(self, output: Any, layer: str) -> torch.Tensor:
        """The output's feature tensor (detached), or a one-line error naming the layer."""
        if isinstance(output, tuple | list):
            if self.output_index is None:
                raise EigpipeError(
                    f"layer {layer}: its output is a {type(output).__name__} of {len(output)}; "
                    "choose an element with output_index"
                )
            if not -len(output) <= self.output_index < len(output):
                raise EigpipeError(f"layer {layer}: output_index {self.output_index} is out of its {len(output)}")
            output = output[self.output_index]
        if not isinstance(output, torch.Tensor):
            raise EigpipeError(f"layer {layer}: its output is a {type(output).__name__}, not a tensor")
        if output.layout != torch.strided:
            raise EigpipeError(f"layer {layer}: its output is a {output.layout} tensor; select one with dense output")
        if output.is_meta:
            raise EigpipeError(f"layer {layer}: its output is on the meta device (no values); run the model on data")
        if output.is_complex():  # copied into real buffers, its imaginary part would be dropped
            raise EigpipeError(f"layer {layer}: its output is complex ({output.dtype}); take its real features")
        if not output.is_floating_point():
            raise EigpipeError(f"layer {layer}: its output is {output.dtype}; select a layer with real-valued features")
        if output.dim() < 2:
            raise EigpipeError(f"layer {layer}: a {output.dim()}-D output has no batch and channel axes")
        return output.detach()

    def _axis(self, dims: int) -> int:
        return (-1 if dims == 3 else 1) if self.channel_axis is None else self.channel_axis

    def resolved_axis(self, dims: int) -> int:
        """The channel axis of a ``dims``-D output, counted from 0 (by rank unless declared)."""
        return self._axis(dims) % dims

    def features(self, output: torch.Tensor, layer: str, token_mask: torch.Tensor | None = None) -> FeatureBatch:
        """[N, C, P, 1] (or [N, C, H, W] for conv maps), or a list of [C, P_i, 1] where a mask leaves samples with
        different numbers of tokens."""
        dims = output.dim()
        axis = self._axis(dims)
        if not -dims <= axis < dims or axis % dims == 0:
            raise EigpipeError(
                f"layer {layer}: channel_axis {axis} does not fit its {dims}-D output (axis 0 is the batch)"
            )
        axis %= dims
        if output.shape[axis] == 0:
            raise EigpipeError(f"layer {layer}: its output of shape {list(output.shape)} has 0 channels (axis {axis})")
        if dims == 3 and axis == 2:
            return self._tokens(output, layer, token_mask)
        feats = output.movedim(axis, 1) if axis != 1 else output
        if dims == 4:
            return feats
        return feats.reshape(feats.shape[0], feats.shape[1], math.prod(feats.shape[2:]), 1)  # an empty batch too

    def _tokens(self, tokens: torch.Tensor, layer: str, mask: torch.Tensor | None) -> FeatureBatch:
        """[N, T, C] -> each sample's chosen tokens as positions."""
        k = self.prefix_tokens
        if k >= tokens.shape[1] and self.prefix == "drop":
            raise EigpipeError(f"layer {layer}: {k} prefix tokens leave none of its {tokens.shape[1]} tokens")
        if k > tokens.shape[1]:
            raise EigpipeError(f"layer {layer}: {k} prefix tokens are more than its {tokens.shape[1]} tokens")
        if mask is not None and tuple(mask.shape) != tuple(tokens.shape[:2]):
            raise EigpipeError(
                f"layer {layer}: the token mask of shape {tuple(mask.shape)} does not fit its "
                f"{tuple(tokens.shape[:2])} tokens"
            )
        part = {"drop": slice(k, None), "only": slice(0, k), "keep": slice(None)}[self.prefix]
        tokens = tokens[:, part]
        feats = tokens.transpose(1, 2).unsqueeze(-1)  # [N, C, T, 1]
        if mask is None:
            return feats
        mask = mask[:, part].to(torch.bool)
        if bool(mask.all()):
            return feats
        counts = mask.sum(dim=1).tolist()
        if 0 in counts:
            raise EigpipeError(f"layer {layer}: sample {counts.index(0)} has no unmasked token")
        return [feats[i][:, mask[i].to(feats.device)] for i in range(len(counts))]
