"""Layers whose features are one fixed affine map of another selected layer's features.

A bottleneck's conv3 feature is bn3(conv3(z)), z its conv2 feature (relu2's output). With a 1x1 conv and the
norm in eval mode (BatchNorm on running statistics, FrozenBatchNorm2d) that is y = A z + b at every position
of every image, so y's statistics follow from z's: mean_y = A mean_z + b and scatter_y = A scatter_z Aᵀ
(per-image centring and Chan's merge terms map the same way). The float32 mode takes conv3's statistics so,
instead of its own Gram products (the widest per-position work of a bottleneck); they differ from the Gram
of the float32-rounded features by that rounding, ~1e-7 relative. The float64 mode accumulates every layer
(exact to float64 round-off of the features themselves), and GroupNorm's affine changes with each image, so
GroupNorm models accumulate conv3 too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from eigpipe.errors import NumericalError
from eigpipe.models.resnet import Bottleneck
from eigpipe.spectral.accumulator import CovarianceAccumulator
from eigpipe.spectral.folds import from_state
from eigpipe.spectral.layers import Layer


@dataclass(frozen=True)
class AffineMap:
    """y = matrix @ z + shift, z the features of layer ``source`` (float64 tensors)."""

    source: str
    matrix: torch.Tensor
    shift: torch.Tensor


def affine_maps(model: nn.Module, layers: Sequence[Layer]) -> dict[str, AffineMap]:
    """The selected conv3 layers of bottlenecks whose 1x1 conv3 and eval-mode norm map the selected conv2
    layer's features affinely, by layer name."""
    selected = {layer.name for layer in layers}
    maps = {}
    for name in (layer.name for layer in layers):  # in layer order
        block_path, _, attr = name.rpartition(".")
        source = f"{block_path}.conv2"
        if attr != "conv3" or source not in selected:
            continue
        block = model.get_submodule(block_path)
        if not isinstance(block, Bottleneck):
            continue
        conv = _pointwise_matrix(block.conv3)
        norm = _eval_affine(block.bn3)
        if conv is not None and norm is not None:
            (weight, bias), (scale, shift) = conv, norm
            maps[name] = AffineMap(source, scale[:, None] * weight, shift + scale * bias)
    return maps


def mapped_accumulator(name: str, source: CovarianceAccumulator, affine: AffineMap) -> CovarianceAccumulator:
    """Layer ``name``'s statistics from its source's: same images and positions (and folds), mapped mean and
    scatter."""
    device = source.device  # state_dict is on the CPU: the products run on the source's device
    matrix, shift = affine.matrix.to(device), affine.shift.to(device)

    def mapped(state: dict) -> dict:
        mean = matrix @ state["mean"].to(device) + shift
        scatter = matrix @ state["scatter"].to(device) @ matrix.T
        if not (torch.isfinite(mean).all() and torch.isfinite(scatter).all()):
            raise NumericalError(
                f"layer {name}: non-finite statistics mapped from {affine.source} (non-finite weights or running "
                "statistics)"
            )
        folds = {"folds": [mapped(fold) for fold in state["folds"]]} if "folds" in state else {}
        return {**state, "channels": matrix.shape[0], "mean": mean, "scatter": scatter, **folds}

    return from_state(mapped(source.state_dict()), device)


def _pointwise_matrix(conv: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(W [C_out, C_in], bias [C_out]) in float64 for a plain 1x1, stride-1, ungrouped conv; else None."""
    plain = (
        isinstance(conv, nn.Conv2d)
        and conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.padding == (0, 0)
        and conv.groups == 1
    )
    return layer_matrix(conv) if plain else None


def layer_matrix(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [C_out, C_in], bias [C_out]) as new float64 tensors of a Linear or 1x1 conv (zeros without a bias)."""
    weight = module.weight.detach()
    matrix = weight.reshape(weight.shape[0], -1).to(torch.float64, copy=True)
    bias = module.bias
    return matrix, bias.detach().to(torch.float64, copy=True) if bias is not None else torch.zeros_like(matrix[:, 0])


def _eval_affine(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(scale, shift) in float64 of a norm that is one per-channel affine map for every image; else None."""
    frozen = isinstance(norm, FrozenBatchNorm2d)
    running = isinstance(norm, nn.modules.batchnorm._BatchNorm) and not norm.training and norm.running_var is not None
    if not (frozen or running):
        return None
    mean, var = norm.running_mean.detach().double(), norm.running_var.detach().double()
    scale = (var + norm.eps).rsqrt() * (norm.weight.detach().double() if norm.weight is not None else 1.0)
    shift = (norm.bias.detach().double() if norm.bias is not None else 0.0) - mean * scale
    return scale, shift
