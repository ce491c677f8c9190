"""Covariance and eigenvalue stores: round trip, plain-zarr readability, atomic publication."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import zarr

from eigpipe import store
from eigpipe.errors import EigpipeError


def fake_layers(seed: int = 0) -> dict[str, SimpleNamespace]:
    rng = np.random.default_rng(seed)
    layers = {}
    sizes = [("backbone.body.conv1", 8), ("backbone.body.layer1.0.conv2", 600), ("backbone.fpn.layer_blocks.0", 5)]
    for name, c in sizes:
        a = rng.normal(size=(c, c + 3))
        layers[name] = SimpleNamespace(second_moment=a @ a.T / c, mean=rng.normal(size=c), count=7, channels=c)
    return layers


ROOT = {
    "run": "faster_rcnn-pretrained",
    "iteration": 100,
    "init": "pretrained",
    "n_images": 7,
    "provenance": {"seed": 0},
}


def test_covariance_store_round_trip(tmp_path: Path) -> None:
    layers = fake_layers()
    layer_attrs = {name: {"module_type": "Conv2d", "forward_index": i} for i, name in enumerate(layers)}
    path = store.write_covariance_store(tmp_path / "100.zarr", layers, ROOT, layer_attrs)
    attrs, read = store.read_covariance_store(path)
    assert attrs["kind"] == store.COVARIANCE_KIND and attrs["run"] == ROOT["run"]
    assert attrs["layers"] == list(layers) == list(read)
    for name, layer in layers.items():
        second, mean, lattrs = read[name]
        assert np.array_equal(second, layer.second_moment) and np.array_equal(mean, layer.mean)
        assert lattrs["channels"] == layer.channels and lattrs["count"] == 7 and lattrs["module_type"] == "Conv2d"
    assert [name for name, *_ in store.iter_covariance_store(path)] == list(layers)


def test_store_is_chunked_compressed_consolidated(tmp_path: Path) -> None:
    path = store.write_covariance_store(tmp_path / "s.zarr", fake_layers(), ROOT)
    meta = json.loads((path / "zarr.json").read_text())
    assert meta["zarr_format"] == 3 and meta["consolidated_metadata"]["metadata"]
    arr = zarr.open_group(str(path), mode="r")["backbone.body.layer1.0.conv2/second_moment"]
    assert arr.chunks == (512, 512)
    assert any("zstd" in type(c).__name__.lower() for c in arr.compressors)


def test_store_opens_with_plain_zarr_without_eigpipe(tmp_path: Path) -> None:
    path = store.write_covariance_store(tmp_path / "s.zarr", fake_layers(), ROOT)
    code = (
        "import sys, zarr\n"
        f"g = zarr.open_group({str(path)!r}, mode='r')\n"
        "print(g.attrs['run'], g['backbone.body.conv1']['second_moment'][:].shape)\n"
        "assert not any(m.startswith('eigpipe') for m in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["faster_rcnn-pretrained", "(8,", "8)"]


def test_failed_write_leaves_nothing_and_keeps_the_old_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = store.write_covariance_store(tmp_path / "s.zarr", fake_layers(seed=1), ROOT)
    calls = {"n": 0}
    original = store._add_array

    def failing(*args: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] % 6 == 3:  # half-way through each of the two writes below
            raise KeyboardInterrupt
        original(*args, **kwargs)

    monkeypatch.setattr(store, "_add_array", failing)
    with pytest.raises(KeyboardInterrupt):
        store.write_covariance_store(tmp_path / "new.zarr", fake_layers(), ROOT)
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        store.write_covariance_store(path, fake_layers(seed=2), ROOT)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]
    _, read = store.read_covariance_store(path)
    assert np.array_equal(read["backbone.body.conv1"][1], fake_layers(seed=1)["backbone.body.conv1"].mean)


def test_eigenvalue_store_round_trip(tmp_path: Path) -> None:
    eigs = {"body.conv1": {"second_moment": np.array([3.0, 1.0, 0.0]), "covariance": np.array([2.0, 0.5, 0.0])}}
    path = store.write_eigenvalue_store(tmp_path / "e.zarr", eigs, ROOT, {"body.conv1": {"channels": 3}})
    attrs, read = store.read_eigenvalue_store(path)
    assert attrs["kind"] == store.EIGENVALUE_KIND and attrs["layers"] == ["body.conv1"]
    second, cov, lattrs = read["body.conv1"]
    assert np.array_equal(second, [3.0, 1.0, 0.0]) and np.array_equal(cov, [2.0, 0.5, 0.0])
    assert lattrs == {"channels": 3}


def test_wrong_or_missing_store_is_a_named_error(tmp_path: Path) -> None:
    with pytest.raises(EigpipeError, match="nope.zarr: store not found"):
        store.read_covariance_store(tmp_path / "nope.zarr")
    eig = store.write_eigenvalue_store(tmp_path / "e.zarr", {}, ROOT)
    with pytest.raises(EigpipeError, match="not an eigpipe.covariance store"):
        store.read_covariance_store(eig)
    (tmp_path / "junk.zarr").mkdir()
    with pytest.raises(EigpipeError, match="junk.zarr"):
        store.read_covariance_store(tmp_path / "junk.zarr")
