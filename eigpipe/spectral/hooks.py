"""Forward hooks that fold the selected layers' features into accumulators while a model runs on images."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from eigpipe.errors import EigpipeError, NumericalError
from eigpipe.models.taps import is_detector, runner_path
from eigpipe.spectral.accumulator import CovarianceAccumulator, FeatureBatch, NonFiniteFeature
from eigpipe.spectral.affine import affine_maps, mapped_accumulator
from eigpipe.spectral.buffers import Workspace, ieee_float32
from eigpipe.spectral.folds import FoldedAccumulator, FoldPlan
from eigpipe.spectral.layers import Layer


def input_transform(model: nn.Module, meta: dict) -> nn.Module:
    """How every model sees the images: the detector's own transform, or the same one for classifiers."""
    if meta["task"] == "detection":
        transform = getattr(model, "transform", None)
        if transform is None:
            raise EigpipeError(f"checkpoint of run {meta.get('run')}: detector has no transform module")
        return transform
    from eigpipe.models import build_transform

    return build_transform(meta["model_config"])


class Extractor:
    """Hooks the selected layers of a model and folds every batch's features into accumulators.

    Use as a context manager (hooks are removed on exit); call ``run(images, image_ids)`` per batch.
    Only the smallest part of the model that runs every selected layer is run (the body, the backbone,
    or, for head layers, the whole model, whose own transform then sees the images). ``precision`` is
    the accumulators' Gram-product dtype (float64 or float32); in float32, layers that are one affine map
    of another selected layer take their statistics from it (``finish()``, eigpipe.spectral.affine). With
    ``folds``, per-image layers also keep their statistics per fold of the images (eigpipe.spectral.folds).
    """

    def __init__(
        self,
        model: nn.Module,
        meta: dict,
        layers: Sequence[Layer],
        device: torch.device | str,
        precision: str = "float64",
        folds: FoldPlan | None = None,
    ) -> None:
        self.model = model
        self.folds = folds
        self.layers = list(layers)
        self.device = torch.device(device)
        self.precision = precision
        self.transform = input_transform(model, meta).to(self.device).eval()
        part = runner_path(model, [name for layer in self.layers for name in (layer.tap, layer.name)])
        self.runner = model.get_submodule(part) if part else None
        self.accumulators: dict[str, CovarianceAccumulator] = {}
        self.affine = affine_maps(model, self.layers) if precision == "float32" else {}
        for layer in self.layers:
            layer.mapped_from = self.affine[layer.name].source if layer.name in self.affine else ""
        self.workspace = Workspace()
        self._by_tap: dict[str, list[Layer]] = {}
        for layer in self.layers:
            self._by_tap.setdefault(layer.tap, []).append(layer)
        self._handles: list[Any] = []
        self._fired: dict[str, int] = {}
        self._order: list[str] = []
        self._batch: tuple[list[tuple[int, int]], tuple[int, int], list[Any]] | None = None
        self._ids: list[Any] = []

    def __enter__(self) -> Extractor:
        for tap in self._by_tap:
            self._handles.append(self.model.get_submodule(tap).register_forward_hook(self._hook(tap)))
        if self.runner is None and is_detector(self.model):
            self._handles.append(self.transform.register_forward_hook(self._record_transform))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def run(self, images: Sequence[torch.Tensor], image_ids: Sequence[Any]) -> None:
        """Forward and accumulate one batch of [3, H, W] images in [0, 1]."""
        self._fired = {}
        self._ids = list(image_ids)
        first = not self._order
        images = [img.to(self.device, non_blocking=True) for img in images]  # pinned by the loader on CUDA
        if self.runner is None and is_detector(self.model):
            self.model(images)  # its transform's hook records the batch geometry
        else:
            batched, _ = self.transform(images)
            self._record_transform(self.transform, (images,), (batched, None))
            (self.runner or self.model)(batched.tensors)
        self._check_fired(first)

    def finish(self) -> None:
        """After the last batch: the statistics of the affinely mapped layers, from their sources' (a 1x1
        stride-1 conv, so each feature map has its source's positions)."""
        by_name = {layer.name: layer for layer in self.layers}
        for name, affine in self.affine.items():
            if affine.source in self.accumulators:
                self.accumulators[name] = mapped_accumulator(name, self.accumulators[affine.source], affine)
                by_name[name].feature_shape = [affine.matrix.shape[0], *by_name[affine.source].feature_shape[1:]]

    def _record_transform(self, _module: nn.Module, _inputs: Any, output: Any) -> None:
        batched = output[0]
        padded = (batched.tensors.shape[-2], batched.tensors.shape[-1])
        self._batch = (list(batched.image_sizes), padded, self._ids)

    def _check_fired(self, first: bool) -> None:
        missing = [layer.name for layer in self.layers if layer.tap not in self._fired]
        if missing:
            raise EigpipeError(f"layer {missing[0]}: the forward pass never ran its module ({len(missing)} such)")
        if first:
            for i, name in enumerate(self._order):
                for layer in self._by_tap[name]:
                    layer.forward_index = i
            self.layers.sort(key=lambda layer: layer.forward_index)

    def _hook(self, tap: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            self._fired[tap] = self._fired.get(tap, 0) + 1
            if self._fired[tap] > 1:
                raise EigpipeError(
                    f"layer {self._by_tap[tap][0].name}: module {tap} runs more than once per forward pass; "
                    "its features are ambiguous (select a module that runs once)"
                )
            if len(self._order) < len(self._by_tap) and tap not in self._order:
                self._order.append(tap)
            for layer in self._by_tap[tap]:
                self._accumulate(layer, output)

        return hook

    def _accumulate(self, layer: Layer, output: Any) -> None:
        if not isinstance(output, torch.Tensor):
            raise EigpipeError(f"layer {layer.name}: output of {layer.tap} is a {type(output).__name__}, not a tensor")
        feats = output.unsqueeze(-1).unsqueeze(-1) if output.dim() == 2 else output
        if feats.dim() != 4:
            raise EigpipeError(f"layer {layer.name}: expected a [N, C, H, W] feature, got {tuple(output.shape)}")
        if layer.mapped_from:  # its statistics come from its source's in finish()
            return
        assert self._batch is not None
        sizes, padded, ids = self._batch
        per_image = not layer.per_region and feats.shape[0] == len(ids)
        crops = _crop_valid(feats, sizes, padded) if per_image else feats
        acc = self.accumulators.get(layer.name)
        if acc is None:
            args = (feats.shape[1], self.device, self.workspace, self.precision)
            folded = self.folds is not None and per_image  # a region's fold is not known here
            acc = FoldedAccumulator(*args, folds=self.folds.count) if folded else CovarianceAccumulator(*args)
            self.accumulators[layer.name] = acc
            first = crops[0]
            layer.feature_shape = [int(s) for s in first.shape]
        try:
            if isinstance(acc, FoldedAccumulator):
                acc.update(crops, [self.folds.of[i] for i in ids])
            else:
                acc.update(crops)
        except NonFiniteFeature as bad:
            where = f"image id {ids[bad.index]}" if per_image else f"the batch of image ids {list(ids)}"
            raise NumericalError(f"layer {layer.name}: non-finite feature in {where}") from None


def _crop_valid(feats: torch.Tensor, sizes: list[tuple[int, int]], padded: tuple[int, int]) -> FeatureBatch:
    """Each image's feature map without the zero padding of the batch (the whole batch if none)."""
    fh, fw = feats.shape[-2:]
    valid = [(math.ceil(h * fh / padded[0]), math.ceil(w * fw / padded[1])) for h, w in sizes]
    if all(v == (fh, fw) for v in valid):
        return feats
    return [feats[i, :, :vh, :vw] for i, (vh, vw) in enumerate(valid)]


def accumulate(
    model: nn.Module,
    meta: dict,
    layers: Sequence[Layer],
    batches: Iterable[tuple[Sequence[torch.Tensor], Sequence[Any]]],
    device: torch.device | str,
    progress: Any = None,
    precision: str = "float64",
    folds: FoldPlan | None = None,
) -> tuple[list[Layer], dict[str, CovarianceAccumulator]]:
    """Run every batch of (images, image ids) through the model; layers come back in forward order. The model's
    float32 convolutions and matmuls run in IEEE precision whatever runtime.tf32 says: TF32's ~1e-3 relative
    error in the features would move small eigenvalues across the paper's absolute threshold. ``folds``: keep
    per-image layers' statistics per fold of the images too."""
    model.eval()
    with torch.inference_mode(), ieee_float32(), Extractor(model, meta, layers, device, precision, folds) as extractor:
        for images, ids in batches:
            extractor.run(images, ids)
            if progress is not None:
                progress.update(len(images))
        extractor.finish()
    return extractor.layers, extractor.accumulators
