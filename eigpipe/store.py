"""Zarr v3 stores of covariance and eigenvalue results: layout, atomic publication, provenance attributes.

Layout (DESIGN.md, "Artifacts")::

    <iter>.zarr/            root attrs: run, iteration, init, task, checkpoint sha256, dataset, layers, provenance
      <module path>/        attrs: module_type, tap, channels, feature_shape, count, positions, forward_index
        second_moment       float64 [C, C]
        mean                float64 [C]

An eigenvalue store has the same groups with arrays ``second_moment`` and ``covariance`` (eigenvalues,
descending). Both open with plain ``zarr.open_group(path, mode="r")``; nothing here needs the model.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from eigpipe.errors import EigpipeError
from eigpipe.provenance import publish, record, sha256_file

COVARIANCE_KIND = "eigpipe.covariance"
EIGENVALUE_KIND = "eigpipe.eigenvalues"
FORMAT_VERSION = 1
CHUNK = 512  # [C, C] chunks of at most 512 x 512 float64 (2 MiB)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float64)


def _add_array(group: zarr.Group, name: str, data: np.ndarray) -> None:
    chunks = tuple(min(s, CHUNK) for s in data.shape) or ()
    group.create_array(name, data=np.ascontiguousarray(data), chunks=chunks, compressors=ZstdCodec(level=3))


def _check_name(name: str) -> None:
    if not name or "/" in name or name.startswith("__"):
        raise EigpipeError(f"layer {name!r}: not usable as a zarr group name")


def _consolidate(path: Path) -> None:
    with warnings.catch_warnings():
        # zarr warns that consolidated metadata is not yet in the v3 spec; zarr-python itself reads it
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(str(path))


def _write_store(
    path: str | Path,
    arrays: Mapping[str, Mapping[str, np.ndarray]],
    attrs: dict,
    layer_attrs: Mapping[str, dict],
) -> Path:
    """Write groups of arrays into a temporary sibling and rename it to ``path`` when complete."""
    path = Path(path)
    with publish(path) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        root.attrs.update(_jsonable(attrs))
        for name, named_arrays in arrays.items():
            _check_name(name)
            group = root.create_group(name)
            group.attrs.update(_jsonable(layer_attrs.get(name, {})))
            for array_name, data in named_arrays.items():
                _add_array(group, array_name, data)
        _consolidate(tmp)
    return path


def _open(path: str | Path, kind: str) -> zarr.Group:
    path = Path(path)
    if not path.exists():
        raise EigpipeError(f"{path}: store not found")
    try:
        root = zarr.open_group(str(path), mode="r")
    except Exception as exc:  # zarr raises several types for a damaged or foreign store
        raise EigpipeError(f"{path}: not a readable zarr group ({type(exc).__name__}: {exc})") from None
    found = root.attrs.get("kind")
    if found != kind:
        raise EigpipeError(f"{path}: not an {kind} store (kind={found!r})")
    return root


def _layer_group(root: zarr.Group, name: str, path: str | Path) -> zarr.Group:
    try:
        return root[name]
    except KeyError:
        raise EigpipeError(f"{path}: layer {name} is listed in the root attrs but has no group") from None


# ---- covariance stores ------------------------------------------------------------------------------


def covariance_root_attrs(
    meta: dict,
    checkpoint: str | Path,
    annotations: str | Path,
    images: str | Path,
    n_images: int,
    layers: list[Any],
    selectors: list[str],
    cfg: dict,
    transform: Any = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Root attributes of a covariance store: what was measured, on what, and how."""
    annotations_sha = sha256_file(annotations)
    names = [getattr(layer, "name", layer) for layer in layers]
    provenance = record(config=cfg.get("covariance", cfg), seed=cfg.get("seed"), device=device)
    provenance["inputs"] = {str(checkpoint): meta.get("sha256"), str(annotations): annotations_sha}
    return {
        "kind": COVARIANCE_KIND,
        "format_version": FORMAT_VERSION,
        "run": meta.get("run"),
        "iteration": meta.get("iteration"),
        "init": meta.get("init"),
        "task": meta.get("task"),
        "model_name": meta.get("model_name"),
        "num_classes": meta.get("num_classes"),
        "model_config": meta.get("model_config"),
        "widths": meta.get("widths"),
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": meta.get("sha256"),
        "checkpoint_provenance": meta.get("provenance"),
        "dataset": {
            "annotations": str(annotations),
            "annotations_sha256": annotations_sha,
            "images": str(images),
            "n_images": int(n_images),
            "order": "first n image ids, ascending",
        },
        "n_images": int(n_images),
        "layers": names,
        "selectors": list(selectors),
        "input": _transform_attrs(transform),
        "matrix": "second_moment = (1/n) sum_i mean_xy F F^T (uncentred); mean = (1/n) sum_i mean_xy F",
        "provenance": provenance,
    }


def _transform_attrs(transform: Any) -> dict[str, Any]:
    if transform is None:
        return {}
    return {
        "transform": type(transform).__name__,
        "min_size": list(getattr(transform, "min_size", ())),
        "max_size": getattr(transform, "max_size", None),
        "mean": list(getattr(transform, "image_mean", ())),
        "std": list(getattr(transform, "image_std", ())),
        "size_divisible": getattr(transform, "size_divisible", None),
    }


def covariance_layer_attrs(layer: Any, acc: Any) -> dict[str, Any]:
    """Attributes of one layer group (``layer`` is an ``eigpipe.covariance.Layer``)."""
    return {
        "module_type": layer.module_type,
        "tap": layer.tap,
        "channels": int(acc.channels),
        "feature_shape": list(layer.feature_shape),
        "count": int(acc.count),
        "positions": int(getattr(acc, "positions", 0)),
        "forward_index": int(layer.forward_index),
    }


def write_covariance_store(
    path: str | Path,
    layers: Mapping[str, Any],
    attrs: dict,
    layer_attrs: Mapping[str, dict] | None = None,
) -> Path:
    """Publish a covariance store; ``layers`` maps names (forward order) to objects with
    ``second_moment`` [C, C], ``mean`` [C] and ``count`` (an accumulator or anything alike)."""
    layer_attrs = dict(layer_attrs or {})
    arrays = {}
    for name, acc in layers.items():
        arrays[name] = {"second_moment": _numpy(acc.second_moment), "mean": _numpy(acc.mean)}
        extra = layer_attrs.setdefault(name, {})
        extra.setdefault("channels", int(arrays[name]["mean"].shape[0]))
        extra.setdefault("count", int(acc.count))
    attrs = {"kind": COVARIANCE_KIND, "format_version": FORMAT_VERSION, **attrs, "layers": list(layers)}
    return _write_store(path, arrays, attrs, layer_attrs)


def iter_covariance_store(path: str | Path) -> Iterator[tuple[str, np.ndarray, np.ndarray, dict]]:
    """(name, second_moment, mean, layer attrs) per layer in forward order, one layer in memory at a time."""
    root = _open(path, COVARIANCE_KIND)
    for name in root.attrs["layers"]:
        group = _layer_group(root, name, path)
        yield name, group["second_moment"][...], group["mean"][...], dict(group.attrs)


def covariance_store_attrs(path: str | Path) -> dict:
    """Root attributes of a covariance store (no array is read)."""
    return dict(_open(path, COVARIANCE_KIND).attrs)


def read_covariance_store(path: str | Path) -> tuple[dict, dict[str, tuple[np.ndarray, np.ndarray, dict]]]:
    """(root attrs, {name: (second_moment, mean, layer attrs)}) of a whole covariance store."""
    return covariance_store_attrs(path), {name: (s, m, a) for name, s, m, a in iter_covariance_store(path)}


# ---- eigenvalue stores ------------------------------------------------------------------------------


def write_eigenvalue_store(
    path: str | Path,
    layers: Mapping[str, Mapping[str, np.ndarray]],
    attrs: dict,
    layer_attrs: Mapping[str, dict] | None = None,
) -> Path:
    """Publish eigenvalues: ``layers`` maps names to {"second_moment": eig, "covariance": eig} (descending)."""
    arrays = {name: {k: _numpy(v) for k, v in eigs.items()} for name, eigs in layers.items()}
    attrs = {**attrs, "kind": EIGENVALUE_KIND, "format_version": FORMAT_VERSION, "layers": list(layers)}
    return _write_store(path, arrays, attrs, dict(layer_attrs or {}))


def read_eigenvalue_store(path: str | Path) -> tuple[dict, dict[str, tuple[np.ndarray, np.ndarray, dict]]]:
    """(root attrs, {name: (second_moment eigenvalues, covariance eigenvalues, layer attrs)})."""
    root = _open(path, EIGENVALUE_KIND)
    layers = {}
    for name in root.attrs["layers"]:
        group = _layer_group(root, name, path)
        layers[name] = (group["second_moment"][...], group["covariance"][...], dict(group.attrs))
    return dict(root.attrs), layers
