"""Eigen-decomposition and dimension measures, against eigvalsh and planted spectra."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from eigpipe.errors import EigpipeError, NumericalError
from eigpipe.spectral import dimensions, spectrum, store

CFG = {
    "threshold": 1e-3,
    "relative_threshold": 1e-3,
    "soft_lambda": 1e-3,
    "saturation_threshold": 0.99,
    "alpha_ranks": [6, 100],
}


def planted(values: list[float], seed: int = 0) -> np.ndarray:
    """Q diag(values) Q^T with a random orthogonal Q."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(len(values), len(values))))
    return q @ np.diag(values) @ q.T


def write_store(path: Path, layers: dict[str, tuple[np.ndarray, np.ndarray]], run: str, iteration: int) -> Path:
    arrays = {n: {"second_moment": s, "mean": m} for n, (s, m) in layers.items()}
    attrs = {n: {"forward_index": i, "module_type": "Conv2d", "count": 9} for i, n in enumerate(layers)}
    root = {"run": run, "iteration": iteration, "init": "scratch", "task": "detection", "n_images": 9}
    return store.write_store(path, store.COVARIANCE_KIND, arrays, root, attrs)


def decompose(cov: Path, out: Path, eigenvalues_out: Path | None = None, **cfg: float) -> pd.DataFrame:
    return spectrum.decompose({"spectrum": {**CFG, **cfg}}, cov, out, eigenvalues_out)


def read_eigenvalues(path: Path) -> tuple[dict, dict[str, tuple[np.ndarray, np.ndarray]]]:
    attrs, layers = store.read_store(path, store.EIGENVALUE_KIND, spectrum.EIGENVALUE_ARRAYS)
    return attrs, {name: (data["second_moment"], data["covariance"]) for name, (data, _) in layers.items()}


def test_planted_spectrum_gives_known_measures() -> None:
    values = [4.0, 2.0, 1.0, 0.5, 2e-3, 5e-4, 1e-6, 0.0]
    found, clipped = spectrum.eigenvalues(planted(values))
    assert np.allclose(found, values, atol=1e-12)
    m = spectrum.measures(found, CFG)
    assert m["intrinsic_dim"] == 5 and m["intrinsic_dim_ratio"] == 5 / 8
    assert m["relative_dim"] == 4  # above 1e-3 x 4.0
    assert spectrum.measures(found, {**CFG, "relative_threshold": 0.2})["relative_dim"] == 3  # above 0.8
    want_soft = sum(v / (v + 1e-3) for v in values)
    assert m["soft_dof"] == pytest.approx(want_soft, rel=1e-9)
    assert m["top_eigenvalue"] == pytest.approx(4.0) and m["trace"] == pytest.approx(sum(values))
    flat = spectrum.measures(np.array([2.0, 2.0, 2.0, 2.0, 0.0]), CFG)
    assert flat["effective_rank"] == pytest.approx(4.0)  # equal eigenvalues: exactly their number
    assert spectrum.measures(np.array([5.0, 0.0, 0.0]), CFG)["effective_rank"] == pytest.approx(1.0)
    assert spectrum.measures(np.zeros(3), CFG)["effective_rank"] == 0.0
    assert spectrum.measures(np.zeros(3), CFG)["relative_dim"] == 0
    # scale-free: the relative count does not change when the features are scaled, the absolute one does
    small = np.array(values) * 1e-3
    assert spectrum.measures(small, CFG)["relative_dim"] == 4 and spectrum.measures(small, CFG)["intrinsic_dim"] == 2


@pytest.mark.parametrize("scale", [1.0, 4.0, 2.0**-10])
def test_measures_at_their_boundaries_by_hand(scale) -> None:
    """Powers of two, so every product is exact: a value equal to a threshold does not count (strictly above)."""
    values = np.array([1.0, 0.5, 0.25, 0.125, 0.0]) * scale
    cfg = {**CFG, "threshold": 0.25 * scale, "relative_threshold": 0.25, "soft_lambda": 0.5 * scale}
    m = spectrum.measures(values, cfg)
    assert m["intrinsic_dim"] == 2 and m["intrinsic_dim_ratio"] == 2 / 5  # 0.25 is not above 0.25
    assert m["relative_dim"] == 2  # 0.25 x top is not above 0.25 x top
    assert spectrum.measures(values, {**cfg, "relative_threshold": 0.125})["relative_dim"] == 3
    assert spectrum.measures(values, {**cfg, "relative_threshold": 1.0})["relative_dim"] == 0  # not even the top
    assert spectrum.measures(values, {**cfg, "threshold": 0.125 * scale})["intrinsic_dim"] == 3
    # soft: 1/1.5 + 0.5/1 + 0.25/0.75 + 0.125/0.625 + 0 = 2/3 + 1/2 + 1/3 + 1/5
    assert m["soft_dof"] == pytest.approx(1.7, rel=1e-12)
    p = np.array([8, 4, 2, 1]) / 15  # the shares of the trace 1.875 (x scale)
    assert m["effective_rank"] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-12)
    assert m["top_eigenvalue"] == scale and m["trace"] == 1.875 * scale


def test_round_off_negatives_are_clipped_and_counted_real_ones_raise() -> None:
    values, clipped = spectrum.eigenvalues(planted([1.0, 0.5, -1e-15, -3e-16]))
    assert clipped == 2 and values.min() == 0.0 and list(values) == sorted(values, reverse=True)
    with pytest.raises(NumericalError, match="layer x: .*far below zero"):
        spectrum.eigenvalues(planted([1.0, -0.1]), what="layer x")
    bad = np.eye(3)
    bad[0, 1] = np.nan
    with pytest.raises(NumericalError, match="non-finite"):
        spectrum.eigenvalues(bad)


def test_decompose_store_matches_eigvalsh(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    layers = {}
    sizes = [("backbone.body.conv1", 6), ("backbone.body.layer1.0.conv2", 10), ("backbone.fpn.layer_blocks.0", 4)]
    for name, c in sizes:
        x = rng.normal(size=(c, 3 * c)) * rng.uniform(0.01, 2, size=(c, 1)) + 1.0
        mean = x.mean(axis=1)
        layers[name] = (x @ x.T / x.shape[1], mean)
    cov = write_store(tmp_path / "cov" / "40.zarr", layers, "faster_rcnn-scratch", 40)
    out = tmp_path / "spectra" / "40.parquet"
    table = decompose(cov, out, threshold=0.05, soft_lambda=0.01)
    assert (tmp_path / "spectra" / "40.eigenvalues.zarr").is_dir()
    read = pd.read_parquet(out)
    assert list(read["layer"]) == list(layers) and len(read) == 3
    assert list(read["canonical"]) == ["conv1", "layer1.0.conv2", "backbone.fpn.layer_blocks.0"]
    _, eigs = read_eigenvalues(tmp_path / "spectra" / "40.eigenvalues.zarr")
    for row in read.itertuples():
        second, mean = layers[row.layer]
        ref = np.clip(np.linalg.eigvalsh(second)[::-1], 0, None)
        ref_c = np.clip(np.linalg.eigvalsh(second - np.outer(mean, mean))[::-1], 0, None)
        assert np.allclose(eigs[row.layer][0], ref, rtol=1e-10, atol=1e-12)
        assert np.allclose(eigs[row.layer][1], ref_c, rtol=1e-10, atol=1e-12)
        assert row.intrinsic_dim == (ref > 0.05).sum() and row.centered_intrinsic_dim == (ref_c > 0.05).sum()
        assert row.relative_dim == (ref > 1e-3 * ref[0]).sum()
        assert row.soft_dof == pytest.approx((ref / (ref + 0.01)).sum(), rel=1e-9)
        assert row.top_eigenvalue == pytest.approx(ref[0]) and row.trace == pytest.approx(np.trace(second))
        assert row.centered_trace == pytest.approx(np.trace(second) - mean @ mean)
        assert row.channels == len(mean) and row.intrinsic_dim_ratio == row.intrinsic_dim / len(mean)
        assert row.run == "faster_rcnn-scratch" and row.iteration == 40 and row.threshold == 0.05
    assert set(spectrum.MEASURES) <= set(table.columns)
    assert {"centered_" + m for m in spectrum.MEASURES} <= set(table.columns)


def test_csv_table_and_explicit_eigenvalue_path(tmp_path: Path) -> None:
    cov = write_store(tmp_path / "c.zarr", {"body.conv1": (planted([1.0, 0.1, 1e-5]), np.zeros(3))}, "classifier", 5)
    decompose(cov, tmp_path / "t.csv", tmp_path / "eig" / "x.zarr")
    table = pd.read_csv(tmp_path / "t.csv")
    assert table.loc[0, "intrinsic_dim"] == 2 and table.loc[0, "threshold"] == 1e-3
    attrs, _ = read_eigenvalues(tmp_path / "eig" / "x.zarr")
    assert attrs["run"] == "classifier" and attrs["source_store"] == str(cov)


def test_dimensions_table_orders_snapshots(tmp_path: Path) -> None:
    paths = []
    for it in (200, 0, 100):
        layers = {
            "body.layer1.0": (planted([1.0, 0.5]), np.zeros(2)),
            "body.conv1": (planted([1.0, 1e-4]), np.zeros(2)),
        }
        cov = write_store(tmp_path / "cov" / f"{it}.zarr", layers, "classifier", it)
        decompose(cov, tmp_path / f"{it}.parquet")
        paths.append(tmp_path / f"{it}.parquet")
    table = dimensions.dimensions({}, paths, tmp_path / "dim.parquet")
    assert list(table["iteration"]) == [0, 0, 100, 100, 200, 200]
    assert list(table["forward_index"]) == [0, 1] * 3
    assert pd.read_parquet(tmp_path / "dim.parquet").shape == table.shape
    with pytest.raises(EigpipeError, match="more than one table"):
        dimensions.dimensions({}, [paths[0], paths[0]], tmp_path / "dup.parquet")
    assert not (tmp_path / "dup.parquet").exists()


def test_dimensions_refuses_tables_of_two_runs(tmp_path: Path) -> None:
    paths = []
    for run in ("faster_rcnn-scratch", "faster_rcnn-pretrained"):
        cov = write_store(tmp_path / "cov" / f"{run}.zarr", {"body.conv1": (planted([1.0, 0.5]), np.zeros(2))}, run, 0)
        paths.append(decompose(cov, tmp_path / f"{run}.parquet") is not None and tmp_path / f"{run}.parquet")
    with pytest.raises(EigpipeError, match="runs faster_rcnn-pretrained, faster_rcnn-scratch"):
        dimensions.dimensions({}, paths, tmp_path / "d.parquet")
    assert not (tmp_path / "d.parquet").exists()


@pytest.mark.parametrize("content", [b"", b"not a parquet file", b"PAR1\x00\x00PAR1"])
def test_unreadable_spectrum_table_is_one_line(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(content)
    with pytest.raises(EigpipeError) as info:
        dimensions.dimensions({}, [bad], tmp_path / "d.parquet")
    assert "\n" not in str(info.value) and str(bad) in str(info.value)


# each stage of the list in one Python whose torch and torchvision imports fail
WITHOUT_TORCH = """
import json, sys
sys.modules.update(torch=None, torchvision=None)
from eigpipe import cli
for args in json.loads(sys.argv[1]):
    if cli.main(args) != 0:
        sys.exit(f"eigpipe {args[0]} failed")
"""


def test_table_stages_run_without_torch(tmp_path: Path) -> None:
    """spectrum, dimensions and report read stores and tables only. Each of their jobs would otherwise spend
    seconds importing torch (the demo DAG runs dozens of them)."""
    layers = {"backbone.body.conv1": (planted([1.0, 0.1, 1e-5]), np.zeros(3))}
    cfg = json.dumps({"spectrum": CFG})
    stages, dims, eigs = [], [], []
    for it in (0, 10):
        cov = write_store(tmp_path / f"cov/{it}.zarr", layers, "faster_rcnn-scratch", it)
        table, eig = tmp_path / f"spec/{it}.parquet", tmp_path / f"eig/{it}.zarr"
        stages.append(["spectrum", "--config-json", cfg, str(cov), "--out", str(table), "--eigenvalues", str(eig)])
        eigs.append(str(eig))
        dims.append(str(table))
    stages.append(["dimensions", "--spectra", *dims, "--out", str(tmp_path / "dims.parquet")])
    report = ["report", "--config-json", json.dumps({"report": {}}), "--dimensions", str(tmp_path / "dims.parquet")]
    stages.append([*report, "--eigenvalues", eigs[-1], "--out-dir", str(tmp_path / "report")])  # the final model's
    done = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, json.dumps(stages)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "report" / "spectra.csv").exists()


@pytest.mark.parametrize(
    ("table", "eigenvalues"),
    [
        ("results/spectrum/run/0.parquet", None),  # the default: the store beside its table
        ("results/spectrum/run/0.csv", "results/eigenvalues/run/0.zarr"),  # in another folder
        ("results/t.parquet", "results/deep/er/e.zarr"),
    ],
)
def test_an_eigenvalue_store_finds_its_table_wherever_the_results_are(tmp_path, monkeypatch, table, eigenvalues):
    monkeypatch.chdir(tmp_path)
    cov = write_store(Path("cov.zarr"), {"body.conv1": (planted([1.0, 0.1]), np.zeros(2))}, "classifier", 0)
    decompose(cov, Path(table), eigenvalues and Path(eigenvalues))  # relative paths, as the workflow's jobs give
    store_path = Path(eigenvalues or spectrum.eigenvalue_path(table))
    (tmp_path / "moved").mkdir()
    (tmp_path / "results").rename(tmp_path / "moved" / "results")  # the results copied or moved elsewhere
    spectrum.read_eigenvalues(tmp_path / "moved" / store_path)  # read from another folder
    monkeypatch.chdir(tmp_path / "moved")
    spectrum.read_eigenvalues(store_path)
    # the table really missing, though a file of that name exists relative to where the job ran
    (tmp_path / "moved" / table).rename(tmp_path / "moved" / "kept")
    (tmp_path / table).parent.mkdir(parents=True)
    (tmp_path / table).write_text("x")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(EigpipeError, match=f"{Path(table).name} is missing: the spectrum stage did not finish"):
        spectrum.read_eigenvalues(tmp_path / "moved" / store_path)


def test_stores_that_named_their_table_from_the_job_folder_find_it_beside_them(tmp_path, monkeypatch):
    """Eigenvalue stores written before the table was named relative to the store recorded it relative to the job's
    folder (``table``): it is looked for beside the store, wherever the job ran."""
    values = {"second_moment": np.ones(2), "covariance": np.ones(2)}
    legacy = {"table": "results/spectrum/0.parquet"}
    path = store.write_store(tmp_path / "moved" / "0.zarr", store.EIGENVALUE_KIND, {"l": values}, legacy, {})
    (tmp_path / "results" / "spectrum").mkdir(parents=True)
    (tmp_path / "results" / "spectrum" / "0.parquet").write_text("x")  # where the job ran: not beside the store
    monkeypatch.chdir(tmp_path)
    with pytest.raises(EigpipeError, match="did not finish"):
        spectrum.read_eigenvalues(path)
    (tmp_path / "moved" / "0.parquet").write_text("x")
    spectrum.read_eigenvalues(path)
    monkeypatch.chdir(tmp_path / "moved")
    spectrum.read_eigenvalues(Path("0.zarr"))


@pytest.mark.parametrize(
    ("layers", "canonical"),
    [
        (["body.conv", "fc"], ["conv", "fc"]),  # the body prefix goes where no two names merge
        (["conv", "body.conv"], ["conv", "body.conv"]),  # else every layer keeps its full name
        (["backbone.body.conv", "body.conv", "fc"], ["backbone.body.conv", "body.conv", "fc"]),
    ],
)
def test_canonical_names_never_merge_two_layers(tmp_path: Path, layers: list[str], canonical: list[str]) -> None:
    cov = write_store(tmp_path / "cov.zarr", {n: (planted([1.0, 0.1]), np.zeros(2)) for n in layers}, "mine", 0)
    table = decompose(cov, tmp_path / "t.parquet")
    assert list(table["canonical"]) == canonical and list(pd.read_parquet(tmp_path / "t.parquet")) == list(table)
    assert list(table.columns[:8]) == ["run", "init", "task", "model_name", "iteration", "layer", "canonical"] + [
        "forward_index"
    ]


@pytest.mark.parametrize("bad", ["missing", "damaged"])
def test_a_bad_input_leaves_the_earlier_outputs_as_they_were(tmp_path: Path, monkeypatch, capsys, bad: str) -> None:
    from eigpipe import cli

    monkeypatch.chdir(tmp_path)
    layers = {"conv": (planted([1.0, 0.1]), np.zeros(2))}
    good, typo = write_store(Path("good.zarr"), layers, "mine", 0), Path("typo.zarr")
    cfg = json.dumps({"spectrum": CFG})
    assert cli.main(["spectrum", "--config-json", cfg, str(good), "--out", "good.csv"]) == 0
    if bad == "damaged":
        write_store(typo, layers, "mine", 0)
        (typo / "conv" / "second_moment" / "c" / "0" / "0").write_bytes(b"damaged")
    before = {p: p.read_bytes() for p in Path().rglob("*") if p.is_file()}
    assert cli.main(["spectrum", "--config-json", cfg, str(typo), "--out", "good.csv"]) == 1
    assert "typo.zarr" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in Path().rglob("*") if p.is_file()} == before
    assert Path("good.csv").is_file() and Path("good.eigenvalues.zarr").is_dir()
