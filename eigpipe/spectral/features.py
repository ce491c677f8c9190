"""The one extraction path of the pipeline's ``covariance`` stage and the library's tracker: forward hooks on the
taps of the selected layers fold every call's features into accumulators, batch by batch.

A batch is one forward pass of the model (its driver calls ``begin_batch``/``end_batch`` around it). A module
that runs several times in one forward pass (a reused ReLU, a shared block, a head run per pyramid level) is kept
apart per call: its k-th call of every batch goes into its own accumulator, named ``<layer>#k`` (a module that
runs once keeps its plain name). Hooks are always removed on exit, errors included; nothing is written onto the
model's modules. Statistics are taken from detached outputs (never part of autograd) with autocast off. Small
layers' features are copied as the hooks run and computed together at the batch's end (eigpipe.spectral.grouped);
in the float32 mode, layers that widen their input are measured at it (eigpipe.spectral.widening).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from eigpipe.errors import EigpipeError, NumericalError
from eigpipe.models.taps import is_detector
from eigpipe.spectral.accumulator import CovarianceAccumulator, FeatureBatch, NonFiniteFeature
from eigpipe.spectral.buffers import Workspace
from eigpipe.spectral.folds import FoldedAccumulator, FoldPlan, from_state
from eigpipe.spectral.grouped import BatchGroups, GroupNonFinite, groupable, small_map
from eigpipe.spectral.layers import Layer
from eigpipe.spectral.layouts import Layout
from eigpipe.spectral.widening import Widening, widening_input, widens

DEFAULT_LAYOUT = Layout()
CONCURRENT = (
    "concurrent forward passes (from several threads at once) are not supported; "
    "for nn.DataParallel use DistributedDataParallel, which eigpipe.track supports"
)


@dataclass
class Stream:
    """The statistics of one layer's k-th call per forward pass; ``layer`` holds its forward index and shape."""

    layer: Layer
    call: int
    acc: CovarianceAccumulator | None  # None for a layer whose statistics are mapped from another's (float32)
    widening: Widening | bool | None = None  # its input's statistics when it widens its input (float32); False: not
    direct: bool = False  # features taken as they are (no layout, crop or folds): the hook's direct path, from batch 2


class FeatureHooks:
    """Forward hooks on the selected layers' taps; use as a context manager (hooks removed on exit).

    ``layouts`` maps a layer name to its Layout (default: by the output's rank). ``mapped`` names layers whose
    statistics their driver derives from another layer's (not accumulated; their forward order is kept). On an
    eigpipe or torchvision detector, its transform's batch geometry crops each image's padding from its maps.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[Layer],
        precision: str = "float64",
        layouts: Callable[[str], Layout] | None = None,
        mapped: Sequence[str] = (),
        folds: FoldPlan | None = None,
    ) -> None:
        self.model = model
        self.folds = folds  # per-image layers also keep their statistics per fold of the images
        self.layers = list(layers)
        self.precision = precision
        self.layouts = {layer.name: (layouts(layer.name) if layouts else DEFAULT_LAYOUT) for layer in self.layers}
        self.mapped = set(mapped)
        self.workspace = Workspace()
        self.streams: dict[tuple[str, int], Stream] = {}
        self.by_tap: dict[str, list[Layer]] = {}
        for layer in self.layers:
            self.by_tap.setdefault(layer.tap, []).append(layer)
        self.active = False
        self.thread: int | None = None  # the thread of the batch in progress
        self.batches = 0  # batches ended
        self.ids: Sequence[Any] | None = None  # the current batch's sample ids, for error messages
        self.geometry: tuple[list[tuple[int, int]], tuple[int, int]] | None = None  # image sizes, padded size
        self.token_mask: torch.Tensor | None = None  # [N, T] real tokens of the current batch
        self.outside: set[str] = set()  # taps that ran outside a batch (not taken)
        self.groups = BatchGroups()  # the small layers' features of this batch, computed together at its end
        self._calls: dict[str, int] = {}
        self._handles: list[Any] = []

    # ---- hooks ----------------------------------------------------------------------------------
    def __enter__(self) -> FeatureHooks:
        try:
            for tap in self.by_tap:
                self._handles.append(self.model.get_submodule(tap).register_forward_hook(self._hook(tap)))
            if is_detector(self.model):
                self._handles.append(self.model.transform.register_forward_hook(self._record_transform))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.groups.clear()
        self.active = False

    def keep(self, handle: Any) -> None:
        """A hook handle of the driver's, removed with the layers' hooks on exit."""
        self._handles.append(handle)

    def _hook(self, tap: str) -> Callable[..., None]:
        layers = self.by_tap[tap]

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if not self.active:
                self.outside.add(tap)
                return
            if threading.get_ident() != self.thread:
                raise EigpipeError(f"layer {layers[0].name}: {CONCURRENT}")
            call = self._calls.get(tap, 0)
            self._calls[tap] = call + 1
            for layer in layers:
                self._take(layer, call, module, inputs, output)

        return hook

    def _record_transform(self, _module: nn.Module, _inputs: Any, output: Any) -> None:
        batched = output[0]
        self.geometry = (list(batched.image_sizes), (batched.tensors.shape[-2], batched.tensors.shape[-1]))

    # ---- batches ---------------------------------------------------------------------------------
    def begin_batch(self, ids: Sequence[Any] | None = None) -> None:
        self._calls.clear()
        self.groups.clear()
        self.ids, self.geometry, self.active = ids, None, True
        self.thread = threading.get_ident()

    def end_batch(self) -> list[str]:
        """Close the batch (the small layers' statistics are computed now, in groups); returns the selected layers
        whose module did not run in it."""
        self.active = False
        try:
            self.groups.flush()
        except GroupNonFinite as bad:
            raise self._non_finite(bad.tag, bad.index) from None
        finally:
            self.batches += 1
            self.token_mask = None
        return [layer.name for layer in self.layers if layer.tap not in self._calls]

    # ---- accumulation ----------------------------------------------------------------------------
    def _take(self, layer: Layer, call: int, module: nn.Module, inputs: Any, output: Any) -> None:
        stream = self.streams.get((layer.name, call))
        direct = stream is not None and stream.direct and self.geometry is None
        if direct and self._take_direct(layer, stream, module, inputs, output):
            return
        if layer.name in self.mapped:
            if stream is None:
                self._new_stream(layer, call, None, [])
            return
        layout = self.layouts[layer.name]
        tensor = layout.tensor(output, layer.name)
        feats, per_image = self._features(layer, layout, tensor)
        if len(feats) == 0:  # a batch of no samples (no regions of a detector's images) adds nothing
            return
        if stream is None:
            first = feats[0]
            args = (first.shape[0], first.device, self.workspace, self.precision)
            folded = self.folds is not None and per_image and self.ids is not None  # a region's fold is not known
            acc = FoldedAccumulator(*args, folds=self.folds.count) if folded else CovarianceAccumulator(*args)
            stream = self._new_stream(layer, call, acc, [int(s) for s in first.shape])
        if stream.acc is not None and _channels(feats) != stream.acc.channels:
            raise EigpipeError(
                f"layer {stream.layer.name}: {_channels(feats)} channels in batch {self.batches}, "
                f"{stream.acc.channels} before; a layer's channels must stay the same"
            )
        source, inputs_acc = self._widening_input(stream, layer, module, inputs, tensor, layout)
        if inputs_acc is not None:
            feats, _ = self._features(layer, layout, source)
        target = stream.acc if inputs_acc is None else inputs_acc
        device_type = stream.acc.device.type
        try:
            if torch.is_autocast_enabled(device_type):
                with torch.autocast(device_type, enabled=False):
                    self._update(stream, target, feats)
            else:
                self._update(stream, target, feats)
        except NonFiniteFeature as bad:
            raise self._non_finite(stream, bad.index) from None
        stream.direct = (
            type(stream.acc) is CovarianceAccumulator  # not folded
            and stream.acc.device.type == "cpu"
            and not layer.per_region
            and layout.resolved_axis(4) == 1
        )

    def _take_direct(self, layer: Layer, stream: Stream, module: nn.Module, inputs: Any, output: Any) -> bool:
        """The common case, after a stream's first batch, without the general path's steps (with the groups' slot
        views, 1.0 ms off a float32 demo batch's 6.9, side by side): a small [N, C, H, W] output, or a widening
        layer's input, into its group; False where it does not apply (then the general path takes it)."""
        if not small_map(output) or output.shape[1] != stream.acc.channels:  # another width: the general path says so
            return False
        target, feats = stream.acc, output
        if stream.widening:
            source = widening_input(module, inputs, output, self.layouts[layer.name])
            if source is None or not small_map(source):
                return False
            inputs_acc = stream.widening.accumulator(self.workspace)
            if inputs_acc is not None:
                target, feats = inputs_acc, source
        self.groups.add(target, feats.detach() if feats.requires_grad else feats, stream)
        return True

    def _features(self, layer: Layer, layout: Layout, tensor: torch.Tensor) -> tuple[FeatureBatch, bool]:
        """(the layer's features of a tensor, cropped to each image's valid part on a detector; whether per image)."""
        feats = layout.features(tensor, layer.name, self.token_mask)
        per_image = isinstance(feats, torch.Tensor) and self.geometry is not None and not layer.per_region
        if per_image and feats.shape[0] == len(self.geometry[0]):
            feats = crop_valid(feats, *self.geometry)
        return feats, per_image

    def _widening_input(
        self, stream: Stream, layer: Layer, module: nn.Module, inputs: Any, output: torch.Tensor, layout: Layout
    ) -> tuple[torch.Tensor, CovarianceAccumulator | None]:
        """(the tensor to take, and where its features go when it is the layer's input: float32 mode, a layer that
        widens its input, eigpipe.spectral.widening); (output, None) to take the output."""
        if stream.widening is None:
            plain = self.precision != "float32" or self.folds is not None or layer.per_region
            stream.widening = False if plain or not widens(module) else Widening(stream.layer, module, stream.acc)
        source = widening_input(module, inputs, output, layout) if stream.widening else None
        if source is None:
            return output, None
        acc = stream.widening.accumulator(self.workspace)
        return (output, None) if acc is None else (source, acc)

    def _update(self, stream: Stream, target: CovarianceAccumulator, feats: FeatureBatch) -> None:
        """Small batches join their group, computed at the batch's end (a folded layer's folds are updated now);
        others are folded in at once."""
        folds = [self.folds.of[i] for i in self.ids] if isinstance(stream.acc, FoldedAccumulator) else None
        if groupable(feats, target.device):
            if folds is not None:
                stream.acc.update_folds(feats, folds)
            self.groups.add(target, feats, stream)
        elif folds is not None:
            stream.acc.update(feats, folds)
        else:
            target.update(feats)

    def _non_finite(self, stream: Stream, index: int) -> NumericalError:
        where = f"sample {index} of batch {self.batches}"
        if self.ids is not None:
            known = index < len(self.ids)  # per-region layers: the index is a region's
            where = f"image id {self.ids[index]}" if known else f"the batch of image ids {list(self.ids)}"
        return NumericalError(f"layer {stream.layer.name}: non-finite feature in {where}")

    def _new_stream(self, layer: Layer, call: int, acc: CovarianceAccumulator | None, shape: list[int]) -> Stream:
        if call:
            self._check_call_names(layer.name, [0, call] if call == 1 else [call])
        named = replace(layer, name=layer.name if call == 0 else f"{layer.name}#{call}", feature_shape=shape)
        named.forward_index = len(self.streams)
        if call == 1:  # the module runs more than once: its first call becomes <layer>#0 too
            self.streams[(layer.name, 0)].layer.name = f"{layer.name}#0"
        stream = self.streams[(layer.name, call)] = Stream(named, call, acc)
        return stream

    def _check_call_names(self, name: str, calls: list[int]) -> None:
        """A module's repeated calls are named ``<name>#k``: none of them may be another selected layer's name."""
        taken = {layer.name for layer in self.layers}
        clash = next((f"{name}#{k}" for k in calls if f"{name}#{k}" in taken), None)
        if clash is not None:
            raise EigpipeError(
                f"layer {name}: it runs more than once per forward pass, so its calls are named {name}#0, {name}#1, "
                f"...; {clash} is also the name of a selected layer (rename that module or leave one of them out)"
            )

    def results(self) -> tuple[list[Layer], dict[str, CovarianceAccumulator]]:
        """(layers in forward order, {layer name: accumulator}) of every layer that has statistics."""
        for stream in self.streams.values():
            if stream.widening:
                stream.widening.settle()
        ordered = sorted(self.streams.values(), key=lambda stream: stream.layer.forward_index)
        return [s.layer for s in ordered], {s.layer.name: s.acc for s in ordered if s.acc is not None}


def _channels(feats: FeatureBatch) -> int:
    """The channels of a batch's features ([N, C, ...], or a list of [C, ...])."""
    return int(feats.shape[1]) if isinstance(feats, torch.Tensor) else int(feats[0].shape[0])


def crop_valid(feats: torch.Tensor, sizes: list[tuple[int, int]], padded: tuple[int, int]) -> FeatureBatch:
    """Each image's feature map without the zero padding of the batch (the whole batch if none)."""
    fh, fw = feats.shape[-2:]
    valid = [(math.ceil(h * fh / padded[0]), math.ceil(w * fw / padded[1])) for h, w in sizes]
    if all(v == (fh, fw) for v in valid):
        return feats
    return [feats[i, :, :vh, :vw] for i, (vh, vw) in enumerate(valid)]


def merge_ranks(
    layers: Sequence[Layer], accumulators: dict[str, CovarianceAccumulator]
) -> tuple[list[Layer], dict[str, CovarianceAccumulator]]:
    """Under torch.distributed: every rank's statistics, gathered and merged in rank order (Chan's formula in
    float64), on every rank alike; layers seen on any rank are kept, in rank 0's forward order first."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(layers), accumulators
    mine = [(layer, accumulators[layer.name].state_dict()) for layer in layers if layer.name in accumulators]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    device = next(iter(accumulators.values())).device if accumulators else torch.device("cpu")
    merged_layers: dict[str, Layer] = {}
    merged: dict[str, CovarianceAccumulator] = {}
    for rank_items in gathered:
        for layer, state in rank_items:
            other = from_state(state, device)
            if layer.name in merged:
                merged[layer.name].merge(other)
            else:
                merged_layers[layer.name], merged[layer.name] = layer, other
    ordered = [replace(layer, forward_index=i) for i, layer in enumerate(merged_layers.values())]
    return ordered, merged
