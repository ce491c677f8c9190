"""The ``covariance`` stage's driver: runs a checkpoint's model on batches of images through the shared extraction
path (eigpipe.spectral.features), in inference mode and IEEE float32."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from eigpipe.errors import EigpipeError
from eigpipe.models.taps import is_detector, runner_path
from eigpipe.spectral.accumulator import CovarianceAccumulator
from eigpipe.spectral.affine import affine_maps, mapped_accumulator
from eigpipe.spectral.buffers import ieee_float32
from eigpipe.spectral.features import FeatureHooks
from eigpipe.spectral.folds import FoldPlan
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
    """Runs a model on batches of images for the ``covariance`` stage, through the extraction path the library's
    tracker uses (eigpipe.spectral.features): hooks fold each batch's features into accumulators.

    Use as a context manager (hooks are removed on exit); call ``run(images, image_ids)`` per batch.
    Only the smallest part of the model that runs every selected layer is run (the body, the backbone,
    or, for head layers, the whole model, whose own transform then sees the images). ``precision`` is
    the accumulators' Gram-product dtype (float64 or float32); in float32, layers that are one affine map
    of another selected layer take their statistics from it (``finish()``, eigpipe.spectral.affine).
    A selected layer whose module does not run in a batch is an error. With ``folds``, per-image layers also
    keep their statistics per fold of the images (eigpipe.spectral.folds).
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
        self.device = torch.device(device)
        self.transform = input_transform(model, meta).to(self.device).eval()
        part = runner_path(model, [name for layer in layers for name in (layer.tap, layer.name)])
        self.runner = model.get_submodule(part) if part else None
        self.affine = affine_maps(model, layers) if precision == "float32" else {}
        for layer in layers:
            layer.mapped_from = self.affine[layer.name].source if layer.name in self.affine else ""
        self.hooks = FeatureHooks(model, layers, precision, mapped=list(self.affine), folds=folds)

    def __enter__(self) -> Extractor:
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.hooks.__exit__()

    @property
    def layers(self) -> list[Layer]:
        return self.hooks.results()[0]

    @property
    def accumulators(self) -> dict[str, CovarianceAccumulator]:
        return self.hooks.results()[1]

    def run(self, images: Sequence[torch.Tensor], image_ids: Sequence[Any]) -> None:
        """Forward and accumulate one batch of [3, H, W] images in [0, 1]."""
        images = [img.to(self.device, non_blocking=True) for img in images]  # pinned by the loader on CUDA
        self.hooks.begin_batch(list(image_ids))
        if self.runner is None and is_detector(self.model):
            self.model(images)  # its transform's hook records the batch geometry
        else:
            batched, _ = self.transform(images)
            self.hooks.geometry = (list(batched.image_sizes), tuple(batched.tensors.shape[-2:]))
            (self.runner or self.model)(batched.tensors)
        missing = self.hooks.end_batch()
        if missing:
            raise EigpipeError(f"layer {missing[0]}: the forward pass never ran its module ({len(missing)} such)")

    def finish(self) -> None:
        """After the last batch: the statistics of the affinely mapped layers, from their sources' (a 1x1
        stride-1 conv, so each feature map has its source's positions)."""
        streams = self.hooks.streams
        for name, affine in self.affine.items():
            source = streams.get((affine.source, 0))
            if source is not None and source.acc is not None and (name, 0) in streams:
                mapped = streams[(name, 0)]
                mapped.acc = mapped_accumulator(name, source.acc, affine)
                mapped.layer.feature_shape = [affine.matrix.shape[0], *source.layer.feature_shape[1:]]


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
    extractor = Extractor(model, meta, layers, device, precision, folds)
    with torch.inference_mode(), ieee_float32(), extractor:
        for images, ids in batches:
            extractor.run(images, ids)
            if progress is not None:
                progress.update(len(images))
        extractor.finish()
    return extractor.hooks.results()
