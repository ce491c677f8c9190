"""Zarr v3 stores of per-layer arrays: atomic publication, attributes as given, integrity checked on every read.

Layout (DESIGN.md, "Artifacts")::

    <name>.zarr/            root attrs (the writing stage's), plus kind, format_version, layers (forward order)
      <layer path>/         layer attrs (the writing stage's), plus integrity: {array: {sha256, shape, dtype}}
        <array>             float64, chunked, zstd

Zarr reads a missing chunk as its fill value, so every array's checksum, shape and dtype are recorded
when it is written and verified when it is read: a missing, truncated or corrupted array fails in one
line naming the store, the layer and the array. The stores open with plain ``zarr.open_group(path,
mode="r")``; nothing here needs the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from eigpipe.errors import EigpipeError, require_whole
from eigpipe.outputs import stores_of
from eigpipe.provenance import publish

COVARIANCE_KIND = "eigpipe.covariance"
EIGENVALUE_KIND = "eigpipe.eigenvalues"
COVARIANCE_STORE = stores_of(COVARIANCE_KIND, "an eigpipe covariance store")
EIGENVALUE_STORE = stores_of(EIGENVALUE_KIND, "an eigpipe eigenvalue store")
FORMAT_VERSION = 1
STORE_ATTRS = ("kind", "format_version", "layers")  # the root attributes write_store sets over the writer's
CHUNK = 512  # [C, C] chunks of at most 512 x 512 float64 (2 MiB)
INTEGRITY = "integrity"

Arrays = dict[str, np.ndarray]


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def as_numpy(value: Any) -> np.ndarray:
    """A float64 C-contiguous copy-free view where possible (torch tensors are moved to the CPU)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.ascontiguousarray(value, dtype=np.float64)


def fingerprint(data: np.ndarray) -> dict[str, Any]:
    """What is recorded of an array to verify it on read: sha256 of its bytes, shape and dtype."""
    data = np.ascontiguousarray(data)
    return {"sha256": hashlib.sha256(data.tobytes()).hexdigest(), "shape": list(data.shape), "dtype": str(data.dtype)}


NAME_BYTES = 255  # the longest file name most file systems take


def check_names(names: Iterable[str]) -> None:
    """Every layer name usable as a group (folder) name of a store; checked before anything is created."""
    for name in names:
        bad = not name or "/" in name or "\0" in name or name.startswith("__") or name in (".", "..", "zarr.json")
        if bad or len(name.encode("utf-8", "surrogatepass")) > NAME_BYTES:
            raise EigpipeError(
                f"layer {name!r}: not usable as a zarr group name (no '/', NUL byte, leading '__', "
                f"'zarr.json', or more than {NAME_BYTES} bytes)"
            )


def _consolidate(path: Path) -> None:
    with warnings.catch_warnings():
        # zarr warns that consolidated metadata is not yet in the v3 spec; zarr-python itself reads it
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(str(path))


def write_store(
    path: str | Path, kind: str, layers: Mapping[str, Arrays], attrs: dict, layer_attrs: Mapping[str, dict]
) -> Path:
    """Publish ``layers`` ({layer: {array: data}}, forward order) with the given attributes, atomically."""
    path = Path(path)
    check_names(layers)
    with publish(path) as tmp:
        try:
            _write_groups(tmp, {**attrs, "kind": kind, "format_version": FORMAT_VERSION}, layers, layer_attrs)
        except BaseException:
            _settle_writes()  # before publish removes the temp store, or zarr's thread would write on into it
            raise
    return path


def _write_groups(tmp: Path, attrs: dict, layers: Mapping[str, Arrays], layer_attrs: Mapping[str, dict]) -> None:
    root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
    root.attrs.update(_jsonable({**attrs, "layers": list(layers)}))
    for name, arrays in layers.items():
        group = root.create_group(name)
        integrity = {}
        for array_name, value in arrays.items():
            data = as_numpy(value)
            chunks = tuple(min(s, CHUNK) for s in data.shape) or ()
            if data.ndim == 3:  # a stack of [C, C] matrices (folds): one matrix per chunk row
                chunks = (1, *chunks[1:])
            group.create_array(array_name, data=data, chunks=chunks, compressors=ZstdCodec(level=3))
            integrity[array_name] = fingerprint(data)
        group.attrs.update(_jsonable({**layer_attrs.get(name, {}), INTEGRITY: integrity}))
    _consolidate(tmp)


def _settle_writes(timeout: float = 60.0) -> None:
    """Wait for the writes that zarr runs on its own I/O thread (zarr.core.sync) and that an interrupt of this
    thread (Ctrl-C, SIGTERM) left running."""
    from zarr.core import sync

    loop = sync.loop[0]
    if loop is None or loop.is_closed() or not loop.is_running():
        return

    async def pending() -> None:
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        if others:
            await asyncio.wait(others, timeout=timeout)

    with contextlib.suppress(Exception):
        asyncio.run_coroutine_threadsafe(pending(), loop).result(timeout + 5)


def open_store(path: str | Path, kind: str) -> zarr.Group:
    """The root group of a store of ``kind``; one-line errors for a missing, unreadable or foreign store."""
    path = Path(path)
    if not path.exists():
        raise EigpipeError(f"{path}: store not found")
    try:
        root = zarr.open_group(str(path), mode="r")
        found = root.attrs.get("kind")
    except Exception as exc:  # zarr raises several types for a damaged or foreign store
        raise EigpipeError(f"{path}: not a readable zarr group ({type(exc).__name__}: {exc})") from None
    if found != kind:
        raise EigpipeError(f"{path}: not an {kind} store (kind={found!r})")
    version = root.attrs.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise EigpipeError(f"{path}: format_version {version!r} is not one this eigpipe reads ({FORMAT_VERSION})")
    layers = root.attrs.get("layers")
    if not isinstance(layers, list) or not all(isinstance(name, str) for name in layers):
        raise EigpipeError(f"{path}: the root attrs have no list of layer names")
    twice = next((name for i, name in enumerate(layers) if name in layers[:i]), None)
    if twice is not None:
        raise EigpipeError(f"{path}: layer {twice} is listed twice in the root attrs")
    return root


def store_attrs(path: str | Path, kind: str) -> dict:
    """Root attributes of a store (no array is read)."""
    return dict(open_store(path, kind).attrs)


def _read_array(group: zarr.Group, name: str, where: str, expected: dict | None) -> np.ndarray:
    try:
        data = group[name][...]
    except KeyError:
        raise EigpipeError(f"{where}: array {name} is missing") from None
    except Exception as exc:  # decompression and decoding errors of damaged chunks
        raise EigpipeError(f"{where}: array {name} cannot be read ({type(exc).__name__}: {exc})") from None
    if expected is not None and fingerprint(data) != expected:
        raise EigpipeError(f"{where}: array {name} does not match its recorded checksum (missing or damaged chunks)")
    return data


def _groups(path: str | Path, root: zarr.Group) -> dict[str, zarr.Group]:
    """Every listed layer's group; a store is legacy (read with one warning) only when no layer has checksums."""
    groups = {}
    for name in root.attrs["layers"]:
        try:
            groups[name] = root[name]
        except KeyError:
            raise EigpipeError(f"{path}: layer {name}: listed in the root attrs but has no group") from None
    unrecorded = [name for name, group in groups.items() if INTEGRITY not in group.attrs]
    if unrecorded and len(unrecorded) < len(groups):
        raise EigpipeError(
            f"{path}: layer {unrecorded[0]}: has no integrity checksums though the store's other layers have them"
            " (damaged or edited store)"
        )
    if unrecorded:
        print(f"warning: {path}: written before integrity checksums; its arrays are read unverified", file=sys.stderr)
    return groups


def iter_layers(
    path: str | Path, kind: str, arrays: Sequence[str], optional: Sequence[str] = ()
) -> Iterator[tuple[str, Arrays, dict]]:
    """(layer, {array: data}, layer attrs) in forward order, one layer in memory at a time, each verified.
    ``optional`` arrays are read where the layer has them (stores written before them lack them)."""
    for name, group in _groups(path, open_store(path, kind)).items():
        where = f"{path}: layer {name}"
        attrs = dict(group.attrs)
        integrity = attrs.pop(INTEGRITY, None)
        unrecorded = [a for a in arrays if integrity is not None and a not in integrity]
        if unrecorded:
            raise EigpipeError(f"{where}: array {unrecorded[0]} has no recorded checksum")
        present = [a for a in optional if (a in integrity if integrity is not None else a in group)]
        data = {a: _read_array(group, a, where, integrity[a] if integrity else None) for a in (*arrays, *present)}
        yield name, data, attrs


def read_store(
    path: str | Path, kind: str, arrays: Sequence[str], optional: Sequence[str] = ()
) -> tuple[dict, dict[str, tuple[Arrays, dict]]]:
    """(root attrs, {layer: ({array: data}, layer attrs)}) of a whole store, verified."""
    layers = iter_layers(path, kind, arrays, optional)
    return store_attrs(path, kind), {name: (data, attrs) for name, data, attrs in layers}


def check_root(root: dict, where: str) -> None:
    """The run and iteration a covariance store's rows are filed under (checked by the spectrum stage, not later
    by dimensions)."""
    require_whole(f"{where}: root attribute iteration", root.get("iteration"), 0)
    if not isinstance(root.get("run"), str) or not root["run"]:
        raise EigpipeError(f"{where}: root attribute run: {root.get('run')!r} is not a run name")


def check_shapes(arrays: Arrays, where: str) -> None:
    """second_moment [C, C], mean [C] and, where present, fold_second_moment [K, C, C] and fold_mean [K, C]."""
    channels = (np.shape(arrays["second_moment"]) or (0,))[-1]
    wanted = {"second_moment": (channels, channels), "mean": (channels,)}
    if "fold_second_moment" in arrays:
        folds = (np.shape(arrays["fold_second_moment"]) or (0,))[0]
        wanted.update(fold_second_moment=(folds, channels, channels), fold_mean=(folds, channels))
    for name, shape in wanted.items():
        if name in arrays and np.shape(arrays[name]) != shape:
            raise EigpipeError(f"{where}: array {name} has shape {list(np.shape(arrays[name]))}, not {list(shape)}")
