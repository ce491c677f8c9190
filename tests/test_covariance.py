"""Streaming accumulator against a float64 NumPy reference; layer selection, hooks and extraction."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import zarr

from eigpipe.errors import EigpipeError, NumericalError
from eigpipe.spectral import buffers, extract, hooks, store
from eigpipe.spectral.accumulator import CovarianceAccumulator, NonFiniteFeature
from eigpipe.spectral.features import crop_valid
from eigpipe.spectral.layers import select_layers
from tests.helpers import SMALL_MODEL, covariance_args

torch.set_num_threads(1)


# ---- reference ------------------------------------------------------------------------------------


def reference(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two-pass float64: (second moment, per-image-weighted mean, covariance about that mean)."""
    flat = [np.asarray(f, dtype=np.float64).reshape(f.shape[0], -1) for f in images]
    second = sum(f @ f.T / f.shape[1] for f in flat) / len(flat)
    mean = sum(f.mean(axis=1) for f in flat) / len(flat)
    cov = sum((f - mean[:, None]) @ (f - mean[:, None]).T / f.shape[1] for f in flat) / len(flat)
    return second, mean, cov


def rel(a: torch.Tensor | np.ndarray, b: np.ndarray) -> float:
    a = a.numpy() if isinstance(a, torch.Tensor) else a
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def features(n: int, c: int, h: int, w: int, offset: float = 0.0, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scale = torch.rand(c, 1, 1, generator=gen) + 0.5
    return (torch.randn(n, c, h, w, generator=gen) * scale + offset).float()


def assert_matches(acc: CovarianceAccumulator, images: list[np.ndarray], tol: float = 1e-10) -> None:
    second, mean, cov = reference(images)
    assert acc.count == len(images)
    assert rel(acc.second_moment, second) < tol
    assert rel(acc.mean, mean) < tol
    assert rel(acc.covariance, cov) < tol


# ---- accumulator ------------------------------------------------------------------------------------


def test_random_batches_match_reference() -> None:
    acc = CovarianceAccumulator(12)
    batches = [features(4, 12, 5, 7, seed=s) for s in range(3)]
    for batch in batches:
        acc.update(batch)
    assert_matches(acc, [img.numpy() for b in batches for img in b])
    assert acc.second_moment.dtype == torch.float64
    assert acc.positions == 12 * 35


def test_large_offset_keeps_precision() -> None:
    """Mean 1e3, std 1: a one-pass E[FF^T] - mu mu^T loses about 6 digits of the covariance."""
    acc = CovarianceAccumulator(16)
    batches = [features(3, 16, 16, 16, offset=1e3, seed=s) for s in range(4)]
    for batch in batches:
        acc.update(batch)
    images = [img.numpy() for b in batches for img in b]
    assert_matches(acc, images)
    _, _, cov = reference(images)
    assert np.diag(cov).min() > 0.2 and np.diag(cov).max() < 3  # the test really is about the small part


def test_unequal_image_sizes_weight_each_image_equally() -> None:
    sizes = [(4, 9), (8, 8), (4, 9), (1, 3), (16, 5)]
    images = [features(1, 6, h, w, offset=50.0, seed=i)[0] for i, (h, w) in enumerate(sizes)]
    acc = CovarianceAccumulator(6)
    acc.update(images[:2])
    acc.update(images[2:])
    assert_matches(acc, [f.numpy() for f in images])


@pytest.mark.parametrize("channels", [200, 600])
def test_wide_layer_panel_triangular_gram_matches_reference(channels: int) -> None:
    """Wide layers take the lower panel-triangle path: 200 = three panels of 64 rows and a partial one,
    600 = four panels of 128 and a partial one."""
    shared = buffers.Workspace()
    acc = CovarianceAccumulator(channels, workspace=shared)
    assert acc.panel_rows(channels) < channels
    batches = [features(3, channels, 3, 4, offset=1e3, seed=s) for s in range(3)]
    for batch in batches:
        acc.update(batch)
    assert_matches(acc, [img.numpy() for b in batches for img in b])
    assert torch.equal(acc.second_moment, acc.second_moment.T)


def test_batched_equals_one_by_one() -> None:
    batch = features(6, 10, 6, 6, offset=3.0)
    together, single = CovarianceAccumulator(10), CovarianceAccumulator(10)
    together.update(batch)
    for img in batch:
        single.update(img)
    assert rel(together.second_moment, single.second_moment.numpy()) < 1e-13
    assert rel(together.covariance, single.covariance.numpy()) < 1e-13


def test_merge_of_halves_equals_whole() -> None:
    batches = [features(3, 8, 4, 4, offset=1e3, seed=s) for s in range(4)]
    whole, first, second = CovarianceAccumulator(8), CovarianceAccumulator(8), CovarianceAccumulator(8)
    for i, batch in enumerate(batches):
        whole.update(batch)
        (first if i < 1 else second).update(batch)
    first.merge(second)
    assert first.count == whole.count == 12
    assert rel(first.covariance, whole.covariance.numpy()) < 1e-12
    assert rel(first.second_moment, whole.second_moment.numpy()) < 1e-12
    assert_matches(first, [img.numpy() for b in batches for img in b])
    restored = CovarianceAccumulator.from_state_dict(first.state_dict())
    assert torch.equal(restored.second_moment, first.second_moment)
    empty = CovarianceAccumulator(8).merge(first)
    assert torch.allclose(empty.covariance, first.covariance, rtol=1e-14, atol=0)


def test_filled_under_inference_mode_merges_outside_it() -> None:
    shared = buffers.Workspace()
    with torch.inference_mode():
        first, second = CovarianceAccumulator(5, workspace=shared), CovarianceAccumulator(5, workspace=shared)
        first.update(features(2, 5, 3, 3, seed=1))
    second.update(features(2, 5, 3, 3, seed=2))
    first.merge(second)
    assert first.count == 4


def test_non_finite_feature_names_the_image_and_changes_nothing() -> None:
    acc = CovarianceAccumulator(4)
    acc.update(features(2, 4, 3, 3))
    before = acc.second_moment.clone()
    bad = features(3, 4, 3, 3)
    bad[2, 1, 0, 0] = float("nan")
    with pytest.raises(NonFiniteFeature) as info:
        acc.update(bad)
    assert info.value.index == 2
    ragged = [features(1, 4, 2, 2)[0], features(1, 4, 3, 3)[0], features(1, 4, 2, 2)[0]]
    ragged[2][0, 0, 0] = float("inf")
    with pytest.raises(NonFiniteFeature) as info:
        acc.update(ragged)
    assert info.value.index == 2
    assert acc.count == 2 and torch.equal(acc.second_moment, before)


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_a_batch_of_no_images_changes_nothing(precision: str) -> None:
    """An empty batch (a detector's images with no regions, a last empty batch) adds nothing: its batch mean
    would be NaN and, merged, would turn the whole state into NaN while the count stayed the same."""
    acc = CovarianceAccumulator(16, precision=precision)
    acc.update(features(3, 16, 4, 4))
    state = {key: value.clone() for key, value in acc.state_dict().items() if isinstance(value, torch.Tensor)}
    acc.update(features(3, 16, 4, 4)[:0])
    acc.update([])
    assert acc.count == 3 and acc.positions == 48
    for key, value in state.items():
        assert torch.equal(acc.state_dict()[key], value), key


def test_crop_valid_removes_batch_padding() -> None:
    feats = torch.zeros(2, 3, 8, 8)
    crops = crop_valid(feats, [(128, 96), (100, 128)], (128, 128))
    assert [tuple(c.shape) for c in crops] == [(3, 8, 6), (3, math.ceil(100 * 8 / 128), 8)]
    assert crop_valid(feats, [(128, 128), (128, 128)], (128, 128)) is feats


# ---- layer selection and hooks ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def detector() -> torch.nn.Module:
    from eigpipe.models import build_detector

    torch.manual_seed(0)
    model = build_detector("faster_rcnn", SMALL_MODEL, num_classes=3).eval()
    with torch.no_grad():  # random norm affines, so that no feature is trivially zero (zero-init residuals)
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.normal_(1.0, 0.5)
                module.bias.normal_(0.0, 0.5)
    return model


def expected_default(prefix: str, with_fpn: bool) -> list[str]:
    """The default preset's layers in forward order, written out from the architecture."""
    names = [f"{prefix}conv1"]
    for stage in range(1, 5):
        block = f"{prefix}layer{stage}.0"
        names += [f"{block}.downsample.0", f"{block}.conv1", f"{block}.conv2", f"{block}.conv3", block]
    if with_fpn:  # the FPN runs top-down: P5 first
        names += [f"backbone.fpn.layer_blocks.{i}" for i in (3, 2, 1, 0)]
    return names


DETECTOR_META = {"task": "detection", "model_config": SMALL_MODEL, "run": "faster_rcnn-scratch"}


def images(n: int = 2, size: tuple[int, int] = (64, 64), seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(3, *size, generator=gen) for _ in range(n)]


def test_default_layers_taps_and_forward_order(detector: torch.nn.Module) -> None:
    layers = select_layers(detector, ["default"])
    taps = {layer.name: layer.tap for layer in layers}
    b = "backbone.body."
    assert taps[b + "conv1"] == b + "relu"
    assert taps[b + "layer1.0.conv1"] == b + "layer1.0.relu1"
    assert taps[b + "layer1.0.conv2"] == b + "layer1.0.relu2"
    assert taps[b + "layer1.0.conv3"] == b + "layer1.0.bn3"
    assert taps[b + "layer1.0.downsample.0"] == b + "layer1.0.downsample.1"
    assert taps[b + "layer2.0"] == b + "layer2.0"
    ordered, accs = hooks.accumulate(detector, DETECTOR_META, layers, [(images(), [1, 2])], "cpu")
    assert [layer.name for layer in ordered] == expected_default(b, with_fpn=True)
    assert [layer.forward_index for layer in ordered] == list(range(len(ordered)))
    assert set(accs) == set(taps) and all(acc.count == 2 for acc in accs.values())


def test_hooks_capture_the_post_activation_features(detector: torch.nn.Module) -> None:
    body = detector.backbone.body
    names = ["conv1", "layer1.0.conv2", "layer1.0.conv3", "layer1.0"]
    layers = select_layers(detector, [f"backbone.body.{n}" for n in names])
    img = images(1)
    _, accs = hooks.accumulate(detector, DETECTOR_META, layers, [(img, [7])], "cpu")
    with torch.inference_mode():
        x = detector.transform(img)[0].tensors
        stem = body.relu(body.bn1(body.conv1(x)))
        block = body.layer1[0]
        h1 = block.relu1(block.bn1(block.conv1(body.maxpool(stem))))
        h2 = block.relu2(block.bn2(block.conv2(h1)))
        h3 = block.bn3(block.conv3(h2))
        out = block(body.maxpool(stem))
    assert h3.min() < 0  # conv3's tap is before the residual ReLU
    for name, feat in zip(names, [stem, h2, h3, out], strict=True):
        acc = accs[f"backbone.body.{name}"]
        want = feat[0].double().mean(dim=(1, 2))
        assert torch.allclose(acc.mean, want, rtol=1e-6, atol=1e-7), name


def test_classifier_default_skips_fpn_and_runs_only_the_body() -> None:
    from eigpipe.models import Classifier, build_body

    torch.manual_seed(0)
    model = Classifier(build_body(SMALL_MODEL), 5).eval()
    layers = select_layers(model, ["default"])
    meta = {"task": "classification", "model_config": SMALL_MODEL}
    ordered, _ = hooks.accumulate(model, meta, layers, [(images(), [1, 2])], "cpu")
    assert [layer.name for layer in ordered] == expected_default("body.", with_fpn=False)


def test_selectors_by_type_and_glob(detector: torch.nn.Module) -> None:
    names = [layer.name for layer in select_layers(detector, ["Bottleneck:*layer3*", "*fpn.layer_blocks.0"])]
    assert names == ["backbone.body.layer3.0", "backbone.fpn.layer_blocks.0"]
    with pytest.raises(EigpipeError, match=r"'Linear:\*body\*'"):
        select_layers(detector, ["Linear:*body*"])
    with pytest.raises(EigpipeError, match="nothing.here"):
        select_layers(detector, ["default", "nothing.here"])


def test_module_running_per_pyramid_level_is_kept_apart_per_call(detector: torch.nn.Module) -> None:
    """The RPN head's conv runs once per FPN level in each forward pass: each call is its own layer, #0 to #4."""
    layers = select_layers(detector, ["rpn.head.conv"])
    ordered, accs = hooks.accumulate(detector, DETECTOR_META, layers, [(images(2), [1, 2])], "cpu")
    names = [f"rpn.head.conv#{k}" for k in range(5)]
    assert [layer.name for layer in ordered] == names and list(accs) == names
    sides = [layer.feature_shape[1] for layer in ordered]
    assert sides == [16, 8, 4, 2, 1] and all(acc.count == 2 for acc in accs.values())  # P2 (stride 4) .. pool


def test_unequal_images_are_cropped_to_their_valid_region(detector: torch.nn.Module) -> None:
    layers = select_layers(detector, ["backbone.body.layer1.0"])
    batch = images(1, (64, 48), seed=1) + images(1, (48, 64), seed=2)
    ordered, accs = hooks.accumulate(detector, DETECTOR_META, layers, [(batch, [1, 2])], "cpu")
    # both resized to 64 x 48 / 48 x 64, padded to 64 x 64; layer1 is at stride 4
    assert accs["backbone.body.layer1.0"].positions == 2 * 16 * 12
    assert ordered[0].feature_shape[1:] == [16, 12]


# ---- the extraction stage --------------------------------------------------------------------------


class FakeCoco:
    """Stands in for eigpipe.data.coco.CocoDetection: sorted ids, (image, {"image_id"}) items."""

    nan_id: int | None = None

    def __init__(self, annotations: Path, images_dir: Path, train: bool = False) -> None:
        self.ids = [101, 205, 310, 402, 517]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict]:
        img = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i))
        if self.ids[i] == self.nan_id:
            img[:, :8, :8] = float("nan")
        return img, {"image_id": torch.tensor(self.ids[i])}


@pytest.fixture
def stage(tmp_path: Path, detector: torch.nn.Module, monkeypatch: pytest.MonkeyPatch, stage_cfg) -> dict:
    """Everything ``extract`` needs, with the checkpoint loader and dataset replaced by stand-ins."""
    import eigpipe.models

    meta = {
        **DETECTOR_META,
        "model_name": "faster_rcnn",
        "iteration": 40,
        "init": "scratch",
        "num_classes": 3,
        "sha256": "ab" * 32,
        "provenance": {},
    }
    monkeypatch.setattr(eigpipe.models, "load_checkpoint", lambda path, device: (detector, dict(meta)))
    fake = types.ModuleType("eigpipe.data.coco")
    fake.CocoDetection = FakeCoco
    monkeypatch.setitem(sys.modules, "eigpipe.data.coco", fake)
    monkeypatch.setattr(FakeCoco, "nan_id", None)
    ann = tmp_path / "val.json"
    ann.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    cfg = {"covariance": {"images": 4, "batch_size": 3, "layers": ["default"]}, "runtime": {"threads": 1}}
    return {
        "cfg": stage_cfg(**cfg),
        "checkpoint": tmp_path / "final.pt",
        "annotations": ann,
        "images": tmp_path,
        "out": tmp_path / "cov" / "40.zarr",
    }


def test_extract_writes_a_plain_zarr_store(stage: dict) -> None:
    out = extract.extract(**stage)
    assert out == stage["out"]
    root = zarr.open_group(str(out), mode="r")
    attrs = root.attrs.asdict()
    assert attrs["run"] == "faster_rcnn-scratch" and attrs["iteration"] == 40 and attrs["init"] == "scratch"
    assert attrs["n_images"] == 4 and attrs["dataset"]["n_images"] == 4
    assert len(attrs["dataset"]["annotations_sha256"]) == 64 and attrs["checkpoint_sha256"] == "ab" * 32
    assert attrs["layers"] == expected_default("backbone.body.", with_fpn=True)
    prov = attrs["provenance"]
    assert {"torch", "torchvision", "zarr", "eigpipe"} <= set(prov["versions"]) and prov["config_hash"]
    layer = root["backbone.body.layer2.0.conv2"]
    assert layer.attrs["tap"] == "backbone.body.layer2.0.relu2" and layer.attrs["count"] == 4
    assert layer.attrs["channels"] == 16 and layer.attrs["feature_shape"] == [16, 8, 8]
    assert layer["second_moment"].dtype == np.float64 and layer["second_moment"].shape == (16, 16)
    assert layer["mean"].shape == (16,)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_float32_store_records_its_precision(stage: dict) -> None:
    """covariance.precision float32: the root attribute says so, and the statistics agree with float64."""
    exact = extract.extract(**{**stage, "out": stage["out"].with_name("exact.zarr")})
    stage["cfg"]["covariance"]["precision"] = "float32"
    fast = extract.extract(**stage)
    arrays = ("second_moment", "mean")
    attrs_64, layers_64 = store.read_store(exact, store.COVARIANCE_KIND, arrays)
    attrs_32, layers_32 = store.read_store(fast, store.COVARIANCE_KIND, arrays)
    assert attrs_64["precision"] == "float64" and attrs_32["precision"] == "float32"
    for name, (data, _) in layers_64.items():
        second = data["second_moment"]
        assert np.linalg.norm(layers_32[name][0]["second_moment"] - second) <= 1e-6 * np.linalg.norm(second), name


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_folds_leave_the_merged_statistics_bitwise_and_keep_each_fold(stage: dict, precision: str) -> None:
    """covariance.folds 2 on 4 images in batches of 3 (the first batch straddles the folds): the merged arrays are
    the bytes of an extraction without folds; the folds hold 2 images each and pool to the merged statistics."""
    stage["cfg"]["covariance"]["precision"] = precision
    plain = extract.extract(**{**stage, "out": stage["out"].with_name("plain.zarr")})
    stage["cfg"]["covariance"]["folds"] = 2
    folded = extract.extract(**stage)
    folds = ("fold_second_moment", "fold_mean")
    _, without = store.read_store(plain, store.COVARIANCE_KIND, ("second_moment", "mean"), optional=folds)
    attrs, layers = store.read_store(folded, store.COVARIANCE_KIND, ("second_moment", "mean"), optional=folds)
    assert attrs["folds"]["count"] == 2 and attrs["folds"]["sizes"] == [2, 2]
    for name, (data, layer_attrs) in layers.items():
        assert set(without[name][0]) == {"second_moment", "mean"}  # no fold arrays without folds
        for key in ("second_moment", "mean"):
            assert np.array_equal(data[key], without[name][0][key]), (name, key)  # bitwise
        assert layer_attrs["folds"] == 2 and layer_attrs["fold_counts"] == [2, 2]
        assert data["fold_second_moment"].shape == (2, *data["second_moment"].shape)
        pooled = data["fold_second_moment"].mean(axis=0)  # equal folds: the plain average (float32: its products)
        tolerance = 1e-12 if precision == "float64" else 1e-6
        assert np.abs(pooled - data["second_moment"]).max() <= tolerance * np.abs(pooled).max(), name


def test_killed_extraction_leaves_no_store(stage: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    original = hooks.Extractor.run

    def dying(self: hooks.Extractor, *args: object) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        original(self, *args)

    monkeypatch.setattr(hooks.Extractor, "run", dying)
    with pytest.raises(KeyboardInterrupt):
        extract.extract(**stage)
    assert not stage["out"].exists()
    assert not stage["out"].parent.exists() or not list(stage["out"].parent.iterdir())


def test_failed_store_write_leaves_nothing(stage: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import zarr.core.group

    calls = {"n": 0}
    original = zarr.core.group.Group.create_array

    def failing(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full")
        return original(*args, **kwargs)

    monkeypatch.setattr(zarr.core.group.Group, "create_array", failing)
    with pytest.raises(OSError, match="disk full"):
        extract.extract(**stage)
    assert not stage["out"].exists() and not stage["out"].parent.exists()  # nor the folder made for it


def test_nan_feature_names_layer_and_image_id(stage: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FakeCoco, "nan_id", 402)
    with pytest.raises(NumericalError, match=r"layer backbone\.body\.conv1: non-finite feature in image id 402"):
        extract.extract(**stage)
    assert not stage["out"].exists()


# ---- end to end, through the CLI, on real checkpoints and synthetic data ----------------------------


def test_cli_covariance_spectrum_dimensions_report(on_disk: dict, tmp_path: Path) -> None:
    from eigpipe import cli

    cfg = json.dumps({"covariance": {"images": 4, "batch_size": 3}, "runtime": {"threads": 1}, "spectrum": {}})
    dims = []
    for run, task in [("faster_rcnn-scratch", "detection"), ("classifier", "classification")]:
        cov = tmp_path / "cov" / run / "30.zarr"
        assert cli.main(covariance_args(on_disk, run, cfg, cov)) == 0
        attrs = zarr.open_group(str(cov), mode="r").attrs
        assert attrs["n_images"] == 4 and attrs["task"] == task and attrs["run"] == run
        spec = tmp_path / "spectra" / run / "30.parquet"
        assert cli.main(["spectrum", "--config-json", cfg, str(cov), "--out", str(spec)]) == 0
        dims.append(tmp_path / "dims" / f"{run}.parquet")
        assert cli.main(["dimensions", "--spectra", str(spec), "--out", str(dims[-1])]) == 0
    eigs = [str(tmp_path / "spectra" / run / "30.eigenvalues.zarr") for run in ("faster_rcnn-scratch", "classifier")]
    report_args = ["report", "--config-json", json.dumps({"report": {}}), "--dimensions", *map(str, dims)]
    report_args += ["--eigenvalues", *eigs]
    assert cli.main([*report_args, "--out-dir", str(tmp_path / "report")]) == 0
    summary = pd.read_csv(tmp_path / "report" / "spectra.csv")
    assert sorted(summary["run"]) == ["classifier", "faster_rcnn-scratch"]
    assert list(summary["layers"]) == [len(expected_default("body.", False)), len(expected_default("b.", True))]


def test_cli_precision_override_reaches_the_store(on_disk: dict, tmp_path: Path) -> None:
    from eigpipe import cli

    cfg = json.dumps({"covariance": {"images": 3, "batch_size": 2}, "runtime": {"threads": 1}})
    cov = tmp_path / "30.zarr"
    args = covariance_args(on_disk, "classifier", cfg, cov)
    assert cli.main([*args, "--precision", "float16"]) == 1 and not cov.exists()
    assert cli.main([*args, "--precision", "float32"]) == 0
    assert zarr.open_group(str(cov), mode="r").attrs["precision"] == "float32"


def test_spectrum_of_a_float32_store_with_rank_deficient_layers(on_disk: dict, tmp_path: Path) -> None:
    from eigpipe import cli

    cfg = json.dumps(
        {
            "covariance": {"images": 3, "batch_size": 2, "precision": "float32"},
            "runtime": {"threads": 1},
            "spectrum": {},
        }
    )
    cov, spec = tmp_path / "covariance" / "30.zarr", tmp_path / "30.csv"  # eigenvalues: 30.eigenvalues.zarr
    assert cli.main(covariance_args(on_disk, "classifier", cfg, cov)) == 0
    assert cli.main(["spectrum", "--config-json", cfg, str(cov), "--out", str(spec)]) == 0
    assert set(pd.read_csv(spec)["precision"]) == {"float32"}


@pytest.mark.slow
def test_torchrun_ranks_share_images_and_merge(on_disk: dict, tmp_path: Path) -> None:
    """Two CPU ranks (gloo), 5 images split 3 + 2: the same store as one process (folds of images included: each
    rank's share of a fold merges into it), written once."""
    import os
    import shutil
    import subprocess

    from eigpipe import cli
    from eigpipe.spectral import store

    section = {"images": 5, "batch_size": 2, "folds": 2}
    cfg = json.dumps({"covariance": section, "runtime": {"threads": 1, "device": "cpu"}})
    single, ddp = tmp_path / "single.zarr", tmp_path / "ddp.zarr"
    assert cli.main(covariance_args(on_disk, "faster_rcnn-scratch", cfg, single)) == 0
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    command = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "eigpipe.cli"]
    command += covariance_args(on_disk, "faster_rcnn-scratch", cfg, ddp)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    arrays, folds = ("second_moment", "mean"), ("fold_second_moment", "fold_mean")
    attrs_1, layers_1 = store.read_store(single, store.COVARIANCE_KIND, arrays, folds)
    attrs_2, layers_2 = store.read_store(ddp, store.COVARIANCE_KIND, arrays, folds)
    assert attrs_2["provenance"]["world_size"] == 2 and attrs_2["layers"] == attrs_1["layers"]
    for name, (data, lattrs) in layers_1.items():
        assert layers_2[name][1]["count"] == lattrs["count"] == 5
        assert layers_2[name][1]["fold_counts"] == lattrs["fold_counts"] == [3, 2] and len(data) == 4
        for key, value in data.items():
            assert np.allclose(layers_2[name][0][key], value, rtol=1e-5, atol=1e-7 * np.abs(value).max()), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp.zarr", "single.zarr"]
