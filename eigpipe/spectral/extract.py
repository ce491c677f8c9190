"""The ``eigpipe covariance`` stage: one covariance store per checkpoint, with the attributes it records."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from eigpipe import provenance
from eigpipe.errors import EigpipeError
from eigpipe.outputs import claim_outputs
from eigpipe.spectral import store
from eigpipe.spectral.accumulator import CovarianceAccumulator
from eigpipe.spectral.features import merge_ranks
from eigpipe.spectral.folds import ASSIGNMENT, FoldedAccumulator, FoldPlan
from eigpipe.spectral.hooks import accumulate, input_transform
from eigpipe.spectral.layers import Layer, select_layers

MATRIX = "second_moment = (1/n) sum_i mean_xy F F^T (uncentred); mean = (1/n) sum_i mean_xy F"


def _collate(items: list[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[int]]:
    """A batch stays a list of images (any sizes), with their image ids."""
    return [img for img, _ in items], [_image_id(target) for _, target in items]


def _batches(dataset: Any, indices: Sequence[int], batch_size: int, workers: int, pin_memory: bool) -> DataLoader:
    """Batches of (images, image ids) in the order of ``indices``, decoded by ``workers`` processes (0: here).

    The order and the batches are fixed (a sequential sampler), so the statistics do not depend on the
    worker count; the loader's own generator keeps the global RNG untouched.
    """
    return DataLoader(
        Subset(dataset, list(indices)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=pin_memory,
        generator=torch.Generator(),
    )


def _image_id(target: dict) -> int:
    value = target["image_id"]
    return int(value.item() if isinstance(value, torch.Tensor) else value)


def transform_attrs(transform: nn.Module) -> dict[str, Any]:
    """The input transform every image went through (resize bounds, normalisation, padding)."""
    return {
        "transform": type(transform).__name__,
        "min_size": list(getattr(transform, "min_size", ())),
        "max_size": getattr(transform, "max_size", None),
        "mean": list(getattr(transform, "image_mean", ())),
        "std": list(getattr(transform, "image_std", ())),
        "size_divisible": getattr(transform, "size_divisible", None),
    }


def root_attrs(
    meta: dict,
    paths: dict[str, Path],
    n_images: int,
    cfg: dict,
    transform: nn.Module,
    device: str,
    world_size: int,
    folds: FoldPlan | None = None,
) -> dict[str, Any]:
    """Root attributes of a covariance store: what was measured, on what, and how."""
    annotations_sha = provenance.sha256_file(paths["annotations"])
    record = provenance.record(config=cfg["covariance"], seed=cfg["seed"], device=device)
    record["inputs"] = {str(paths["checkpoint"]): meta["sha256"], str(paths["annotations"]): annotations_sha}
    record["world_size"] = world_size
    return {
        **{key: meta.get(key) for key in ("run", "iteration", "init", "task", "model_name", "num_classes")},
        "model_config": meta.get("model_config"),
        "widths": meta.get("widths"),
        "checkpoint": str(paths["checkpoint"]),
        "checkpoint_sha256": meta["sha256"],
        "checkpoint_provenance": meta.get("provenance"),
        "dataset": {
            "annotations": str(paths["annotations"]),
            "annotations_sha256": annotations_sha,
            "images": str(paths["images"]),
            "n_images": int(n_images),
            "order": "first n image ids, ascending",
        },
        "n_images": int(n_images),
        "selectors": list(cfg["covariance"]["layers"]),
        "precision": cfg["covariance"]["precision"],
        "input": transform_attrs(transform),
        "matrix": MATRIX,
        "provenance": record,
        **({"folds": {"count": folds.count, "sizes": folds.sizes(), "assignment": ASSIGNMENT}} if folds else {}),
    }


def layer_attrs(layer: Layer, acc: CovarianceAccumulator) -> dict[str, Any]:
    """Attributes of one layer group."""
    return {
        "module_type": layer.module_type,
        "tap": layer.tap,
        "channels": int(acc.channels),
        "feature_shape": list(layer.feature_shape),
        "count": int(acc.count),
        "positions": int(acc.positions),
        "forward_index": int(layer.forward_index),
        "statistics": f"mapped from {layer.mapped_from}" if layer.mapped_from else "accumulated",
        **({"folds": len(acc.folds), "fold_counts": acc.fold_counts} if isinstance(acc, FoldedAccumulator) else {}),
    }


def layer_arrays(acc: CovarianceAccumulator) -> dict[str, Any]:
    """The arrays of one layer group: the merged statistics, and the folds' where they were kept."""
    folds = acc.fold_arrays() if isinstance(acc, FoldedAccumulator) else {}
    return {"second_moment": acc.second_moment, "mean": acc.mean, **folds}


def extract(cfg: dict, checkpoint: Path, annotations: Path, images: Path, out: Path) -> Path | None:
    """One covariance store for one checkpoint (sections covariance, runtime, seed).

    Under torchrun every rank takes a strided share of the images; rank 0 merges and writes. The Gram
    products run in ``covariance.precision``, recorded in the store's root attribute ``precision``. With
    ``covariance.folds`` K, every per-image layer also keeps its statistics per fold of the images (arrays
    ``fold_second_moment`` [K, C, C] and ``fold_mean`` [K, C]; eigpipe.spectral.folds).
    """
    from eigpipe import runtime
    from eigpipe.data.coco import CocoDetection
    from eigpipe.models import load_checkpoint

    section = cfg["covariance"]
    claim_outputs((out, store.COVARIANCE_STORE), inputs=[checkpoint, annotations, images])
    rt = runtime.setup(cfg["runtime"], seed=cfg["seed"])
    model, meta = load_checkpoint(checkpoint, rt.device)
    selected = select_layers(model, section["layers"])
    dataset = CocoDetection(annotations, images, train=False)
    n = min(section["images"], len(dataset))
    if n == 0:
        raise EigpipeError(f"{annotations}: no images to extract features from")
    if n < section["images"] and rt.is_main:
        print(f"covariance: only {n} images in {annotations} (asked for {section['images']})", file=sys.stderr)
    folds = FoldPlan.consecutive(dataset.ids[:n], section["folds"]) if section["folds"] else None
    share = list(range(rt.rank, n, rt.world_size))
    desc = f"covariance {meta.get('run')}@{meta.get('iteration')}"
    with runtime.progress(total=len(share), desc=desc, unit="img", disable=not rt.is_main) as bar:
        batches = _batches(dataset, share, section["batch_size"], section["workers"], rt.device.type == "cuda")
        ordered, accs = accumulate(model, meta, selected, batches, rt.device, bar, section["precision"], folds)
    if rt.distributed:
        ordered, accs = merge_ranks(ordered, accs)  # every rank's images, on every rank; rank 0 writes
        if not rt.is_main:
            return None
    paths = {"checkpoint": Path(checkpoint), "annotations": Path(annotations), "images": Path(images)}
    attrs = root_attrs(meta, paths, n, cfg, input_transform(model, meta), str(rt.device), rt.world_size, folds)
    arrays = {layer.name: layer_arrays(accs[layer.name]) for layer in ordered}
    per_layer = {layer.name: layer_attrs(layer, accs[layer.name]) for layer in ordered}
    return store.write_store(out, store.COVARIANCE_KIND, arrays, attrs, per_layer)
