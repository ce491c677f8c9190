"""Stores: round trip, plain-zarr readability, atomic publication, integrity verified on every read."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from eigpipe.errors import EigpipeError
from eigpipe.spectral import store

ARRAYS = ("second_moment", "mean")
COV = store.COVARIANCE_KIND


def fake_layers(seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    layers = {}
    sizes = [("backbone.body.conv1", 8), ("backbone.body.layer1.0.conv2", 600), ("backbone.fpn.layer_blocks.0", 5)]
    for name, c in sizes:
        a = rng.normal(size=(c, c + 3))
        layers[name] = {"second_moment": a @ a.T / c, "mean": rng.normal(size=c)}
    return layers


def write(path: Path, layers: dict | None = None, kind: str = COV, layer_attrs: dict | None = None) -> Path:
    return store.write_store(path, kind, fake_layers() if layers is None else layers, ROOT, layer_attrs or {})


ROOT = {
    "run": "faster_rcnn-pretrained",
    "iteration": 100,
    "init": "pretrained",
    "n_images": 7,
    "provenance": {"seed": 0},
}


def test_store_round_trip_in_forward_order(tmp_path: Path) -> None:
    layers = fake_layers()
    layer_attrs = {name: {"module_type": "Conv2d", "forward_index": i} for i, name in enumerate(layers)}
    path = write(tmp_path / "100.zarr", layers, layer_attrs=layer_attrs)
    attrs, read = store.read_store(path, COV, ARRAYS)
    assert attrs["kind"] == COV and attrs["run"] == ROOT["run"] and attrs["layers"] == list(layers) == list(read)
    for name, arrays in layers.items():
        data, lattrs = read[name]
        assert all(np.array_equal(data[key], arrays[key]) for key in ARRAYS)
        assert lattrs == layer_attrs[name]  # the stage's attributes, as given (integrity kept apart)
    assert [name for name, *_ in store.iter_layers(path, COV, ARRAYS)] == list(layers)


def test_store_is_chunked_compressed_consolidated(tmp_path: Path) -> None:
    path = write(tmp_path / "s.zarr")
    meta = json.loads((path / "zarr.json").read_text())
    assert meta["zarr_format"] == 3 and meta["consolidated_metadata"]["metadata"]
    arr = zarr.open_group(str(path), mode="r")["backbone.body.layer1.0.conv2/second_moment"]
    assert arr.chunks == (512, 512)
    assert any("zstd" in type(c).__name__.lower() for c in arr.compressors)


def test_store_opens_with_plain_zarr_without_eigpipe(tmp_path: Path) -> None:
    path = write(tmp_path / "s.zarr")
    code = (
        "import sys, zarr\n"
        f"g = zarr.open_group({str(path)!r}, mode='r')\n"
        "print(g.attrs['run'], g['backbone.body.conv1']['second_moment'][:].shape)\n"
        "assert not any(m.startswith('eigpipe') for m in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["faster_rcnn-pretrained", "(8,", "8)"]


def test_failed_write_leaves_nothing_and_keeps_the_old_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import zarr.core.group

    path = write(tmp_path / "s.zarr", fake_layers(seed=1))
    calls = {"n": 0}
    original = zarr.core.group.Group.create_array

    def failing(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] % 6 == 3:  # half-way through each of the two writes below
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(zarr.core.group.Group, "create_array", failing)
    with pytest.raises(KeyboardInterrupt):
        write(tmp_path / "new.zarr")
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        write(path, fake_layers(seed=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]
    _, read = store.read_store(path, COV, ARRAYS)
    assert np.array_equal(read["backbone.body.conv1"][0]["mean"], fake_layers(seed=1)["backbone.body.conv1"]["mean"])


def test_an_interrupt_while_zarr_writes_on_its_own_thread_leaves_no_temp_store(tmp_path, monkeypatch) -> None:
    """zarr runs the writes on its I/O thread: an interrupt of the main thread (Ctrl-C, SIGTERM) must wait for
    them, or they go on writing into the temp store after publish removed it."""
    import asyncio
    import os
    import signal
    import time

    from zarr.storage import LocalStore

    original, calls = LocalStore.set, {"n": 0}

    async def interrupted_set(self, key, value):
        calls["n"] += 1
        if calls["n"] == 3:  # Ctrl-C reaches the main thread, which waits for this write on zarr's thread
            os.kill(os.getpid(), signal.SIGINT)
        await asyncio.sleep(0.3)
        return await original(self, key, value)

    monkeypatch.setattr(LocalStore, "set", interrupted_set)
    # Python leaves SIGINT ignored when it started so (a background job of a shell script): Ctrl-C's own handler
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            write(tmp_path / "new.zarr")
    finally:
        signal.signal(signal.SIGINT, previous)
    time.sleep(1.0)  # what zarr's thread would write by now
    assert list(tmp_path.iterdir()) == []


def test_eigenvalue_store_round_trip(tmp_path: Path) -> None:
    eigs = {"body.conv1": {"second_moment": np.array([3.0, 1.0, 0.0]), "covariance": np.array([2.0, 0.5, 0.0])}}
    path = write(tmp_path / "e.zarr", eigs, store.EIGENVALUE_KIND, {"body.conv1": {"channels": 3}})
    attrs, read = store.read_store(path, store.EIGENVALUE_KIND, ("second_moment", "covariance"))
    assert attrs["kind"] == store.EIGENVALUE_KIND and attrs["layers"] == ["body.conv1"]
    data, lattrs = read["body.conv1"]
    assert np.array_equal(data["second_moment"], [3.0, 1.0, 0.0]) and np.array_equal(data["covariance"], [2.0, 0.5, 0])
    assert lattrs == {"channels": 3}


def test_wrong_or_missing_store_is_a_named_error(tmp_path: Path) -> None:
    with pytest.raises(EigpipeError, match="nope.zarr: store not found"):
        store.read_store(tmp_path / "nope.zarr", COV, ARRAYS)
    eig = write(tmp_path / "e.zarr", {}, store.EIGENVALUE_KIND)
    with pytest.raises(EigpipeError, match="not an eigpipe.covariance store"):
        store.read_store(eig, COV, ARRAYS)
    (tmp_path / "junk.zarr").mkdir()
    with pytest.raises(EigpipeError, match="junk.zarr"):
        store.read_store(tmp_path / "junk.zarr", COV, ARRAYS)


# ---- integrity: zarr reads a missing chunk as its fill value; every read is verified --------------------


def _chunks(path: Path, layer: str, array: str) -> list[Path]:
    return sorted(p for p in (path / layer / array / "c").rglob("*") if p.is_file())


def _delete_chunks(path: Path, layer: str, array: str) -> None:
    for chunk in _chunks(path, layer, array):
        chunk.unlink()


def _truncate_chunk(path: Path, layer: str, array: str) -> None:
    chunk = _chunks(path, layer, array)[0]
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])


def _corrupt_chunk(path: Path, layer: str, array: str) -> None:
    chunk = _chunks(path, layer, array)[-1]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))


def _drop_array(path: Path, layer: str, array: str) -> None:
    import shutil

    shutil.rmtree(path / layer / array)


def _zero_chunk(path: Path, layer: str, array: str) -> None:
    chunk = _chunks(path, layer, array)[0]
    chunk.write_bytes(b"")


@pytest.mark.parametrize("damage", [_delete_chunks, _truncate_chunk, _corrupt_chunk, _drop_array, _zero_chunk])
@pytest.mark.parametrize(
    ("layer", "array"),
    [
        ("backbone.body.conv1", "mean"),
        ("backbone.body.layer1.0.conv2", "second_moment"),
        ("backbone.fpn.layer_blocks.0", "second_moment"),
    ],
)
def test_damaged_array_is_one_line_naming_store_layer_and_array(tmp_path: Path, damage, layer, array) -> None:
    path = write(tmp_path / "s.zarr")
    damage(path, layer, array)
    with pytest.raises(EigpipeError) as info:
        store.read_store(path, COV, ARRAYS)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and f"layer {layer}" in message and f"array {array}" in message


def test_store_without_checksums_is_read_with_one_warning(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write(tmp_path / "old.zarr")
    for name in fake_layers():
        meta_file = path / name / "zarr.json"
        meta = json.loads(meta_file.read_text())
        meta["attributes"].pop(store.INTEGRITY)
        meta_file.write_text(json.dumps(meta))
    root_meta = json.loads((path / "zarr.json").read_text())
    for key, entry in root_meta["consolidated_metadata"]["metadata"].items():
        if "/" not in key:
            entry["attributes"].pop(store.INTEGRITY, None)
    (path / "zarr.json").write_text(json.dumps(root_meta))
    _, read = store.read_store(path, COV, ARRAYS)
    assert np.array_equal(read["backbone.body.conv1"][0]["mean"], fake_layers()["backbone.body.conv1"]["mean"])
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "before integrity checksums" in warnings[0] and str(path) in warnings[0]


# ---- stores that are not what they claim: refused in one line, nothing written (issue 18, item 8) --------------


def _small(path: Path) -> Path:
    rng = np.random.default_rng(3)
    layers = {}
    for name, c in (("body.conv1", 4), ("body.layer1.0.conv1", 5), ("body.layer1.0.conv2", 3)):
        a = rng.normal(size=(c, 2 * c))
        layers[name] = {"second_moment": a @ a.T / c, "mean": a.mean(axis=1)}
    attrs = {name: {"count": 6, "forward_index": i} for i, name in enumerate(layers)}
    return write(path, layers, layer_attrs=attrs)


def _edit(path: Path, root: dict | None = None, layer: int | None = None, **changes: object) -> None:
    """Set (or, with None, delete) attributes of the root or of the layer at that position; reconsolidate."""
    import warnings

    group = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    target = group if layer is None else group[group.attrs["layers"][layer]]
    attrs = {**dict(target.attrs), **(root or {}), **changes}
    target.attrs.put({k: v for k, v in attrs.items() if v is not None})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(path))


def _asymmetric(path: Path, layer: int) -> None:
    group = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    name = group.attrs["layers"][layer]
    second = group[name]["second_moment"][...]
    second[0, -1] += 0.1 * np.abs(second).max()
    group[name]["second_moment"][...] = second
    integrity = {**group[name].attrs[store.INTEGRITY], "second_moment": store.fingerprint(second)}
    _edit(path, layer=layer, **{store.INTEGRITY: integrity})  # checksums that match: only the matrix is wrong


def _reshaped(path: Path, layer: int, **arrays: np.ndarray) -> None:
    """Arrays of another shape in place of (or beside) a layer's own, with checksums that match."""
    group = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    name = group.attrs["layers"][layer]
    integrity = dict(group[name].attrs[store.INTEGRITY])
    for array, data in arrays.items():
        group[name].create_array(array, data=data, overwrite=True)
        integrity[array] = store.fingerprint(data)
    _edit(path, layer=layer, **{store.INTEGRITY: integrity})


BROKEN = {
    "one layer without checksums": (lambda p: _edit(p, layer=1, **{store.INTEGRITY: None}), "no integrity checksums"),
    "last layer without checksums": (lambda p: _edit(p, layer=2, **{store.INTEGRITY: None}), "no integrity checksums"),
    "a layer listed twice": (
        lambda p: _edit(p, root={"layers": ["body.conv1", "body.layer1.0.conv1", "body.conv1"]}),
        "listed twice",
    ),
    "a layer name that is no string": (lambda p: _edit(p, root={"layers": ["body.conv1", 7]}), "layer names"),
    "count 0": (lambda p: _edit(p, layer=0, count=0), "count 0"),
    "count -2": (lambda p: _edit(p, layer=2, count=-2), "count -2"),
    "count 1.5": (lambda p: _edit(p, layer=1, count=1.5), "count 1.5"),
    "format_version 2": (lambda p: _edit(p, root={"format_version": 2}), "format_version 2"),
    "format_version '1'": (lambda p: _edit(p, root={"format_version": "1"}), "format_version '1'"),
    "format_version true": (lambda p: _edit(p, root={"format_version": True}), "format_version True"),
    "no format_version": (lambda p: _edit(p, root={"format_version": None}), "format_version None"),
    "asymmetric second moment": (lambda p: _asymmetric(p, 1), "not symmetric"),
    "asymmetric first layer": (lambda p: _asymmetric(p, 0), "not symmetric"),
    "a second moment not square": (
        lambda p: _reshaped(p, 1, second_moment=np.eye(5)[:, :4]),
        "layer body.layer1.0.conv1: array second_moment has shape [5, 4], not [4, 4]",
    ),
    "a mean of another width": (
        lambda p: _reshaped(p, 0, mean=np.zeros(3)),
        "layer body.conv1: array mean has shape [3], not [4]",
    ),
    "fold means of another width": (
        lambda p: _reshaped(p, 2, fold_second_moment=np.zeros((2, 3, 3)), fold_mean=np.zeros((2, 4))),
        "layer body.layer1.0.conv2: array fold_mean has shape [2, 4], not [2, 3]",
    ),
    "fold second moments not a stack": (
        lambda p: _reshaped(p, 2, fold_second_moment=np.zeros((3, 3)), fold_mean=np.zeros((3, 3))),
        "array fold_second_moment has shape [3, 3], not [3, 3, 3]",
    ),
    "iteration 'abc'": (lambda p: _edit(p, root={"iteration": "abc"}), "root attribute iteration: 'abc' is not a"),
    "iteration 3.5": (lambda p: _edit(p, root={"iteration": 3.5}), "root attribute iteration: 3.5 is not a whole"),
    "no iteration": (lambda p: _edit(p, root={"iteration": None}), "root attribute iteration: None is not a whole"),
    "no run": (lambda p: _edit(p, root={"run": None}), "root attribute run: None is not a run name"),
    "an empty run": (lambda p: _edit(p, root={"run": ""}), "root attribute run: '' is not a run name"),
}


@pytest.mark.parametrize("broken", BROKEN)
def test_a_store_that_is_not_what_it_claims_is_refused_in_one_line(tmp_path, capsys, broken) -> None:
    from eigpipe import cli

    path = _small(tmp_path / "s.zarr")
    damage, words = BROKEN[broken]
    damage(path)
    out = tmp_path / "t.parquet"
    assert cli.main(["spectrum", "--config-json", json.dumps({"spectrum": {}}), str(path), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and str(path) in err and words in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]


def test_a_store_with_every_checksum_and_a_sound_matrix_is_read(tmp_path, capsys) -> None:
    _, read = store.read_store(_small(tmp_path / "s.zarr"), COV, ARRAYS)
    assert len(read) == 3 and "warning" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "name",
    ["zarr.json", "a" * 256, "\u00e9" * 128, "conv\x00x", ".", ".."],
    ids=["zarr.json", "256 bytes", "256 bytes of UTF-8", "NUL", "dot", "dot-dot"],
)
def test_a_layer_name_that_cannot_be_a_folder_name_is_refused_before_anything_is_created(tmp_path, name) -> None:
    layers = {"conv": fake_layers()["backbone.body.conv1"]}
    layers[name] = layers["conv"]
    with pytest.raises(EigpipeError, match=r"^layer .*: not usable as a zarr group name"):
        write(tmp_path / "new" / "s.zarr", layers)
    assert list(tmp_path.iterdir()) == []
    write(tmp_path / "s.zarr", {"a" * 255: layers["conv"]})  # the longest name a file system takes
