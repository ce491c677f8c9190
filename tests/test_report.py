"""Report: plots and tables from synthetic dimension tables, eigenvalue stores and evaluations."""

from __future__ import annotations

import functools
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from eigpipe import cli, config, intervals, report
from eigpipe.errors import EigpipeError
from eigpipe.report import comparison, inputs
from eigpipe.spectral import store

BODY = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv3", "layer2.1.conv2", "layer2.1.conv3"]
BODY += ["layer3.0.conv3", "layer4.0.conv2", "layer4.0.conv3", "layer4.0"]
FPN = ["backbone.fpn.layer_blocks.3", "backbone.fpn.layer_blocks.0"]
RUNS = {
    "classifier": ("synthetic", "classification", "classifier", [0, 800], "body.", BODY),
    "faster_rcnn-pretrained": ("pretrained", "detection", "faster_rcnn", [0, 100, 200], "backbone.body.", BODY + FPN),
    "faster_rcnn-scratch": ("scratch", "detection", "faster_rcnn", [0, 100, 200], "backbone.body.", BODY + FPN),
}


REPORT = {"report": config.validate({}, "test", config.schema()["properties"]["report"])}


def dimension_tables(tmp_path: Path, runs: dict = RUNS) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for run, (init, task, model, iterations, prefix, layers) in runs.items():
        rows = []
        for it in iterations:
            for i, name in enumerate(layers):
                channels = 64 if name.startswith("layer4") else 16
                dim = int(rng.integers(1, channels + 1))
                full = name if name.startswith("backbone.fpn") else prefix + name
                rows.append(
                    {"run": run, "init": init, "task": task, "model_name": model, "iteration": it, "layer": full}
                    | {"canonical": name, "forward_index": i, "channels": channels, "intrinsic_dim": dim}
                    | {"intrinsic_dim_ratio": dim / channels, "soft_dof": dim * 0.9, "effective_rank": dim * 0.5}
                    | {"centered_intrinsic_dim_ratio": dim / channels / 2, "n_negative_clipped": 1, "threshold": 1e-3}
                )
        path = tmp_path / f"{run}.parquet"
        pd.DataFrame(rows).to_parquet(path)
        paths.append(path)
    return paths


def eigenvalue_stores(tmp_path: Path, runs: dict = RUNS) -> list[Path]:
    paths = []
    for run, (init, _task, _model, iterations, prefix, layers) in runs.items():
        eigs = {}
        for name in layers:
            full = name if name.startswith("backbone.fpn") else prefix + name
            values = np.sort(np.exp(-np.arange(16) * 0.8))[::-1]
            values[-2:] = 0.0
            eigs[full] = {"second_moment": values, "covariance": values / 2}
        spectrum = {"threshold": 1e-3, "relative_threshold": 1e-3, "soft_lambda": 1e-3}
        root = {"run": run, "init": init, "iteration": iterations[-1], "spectrum": spectrum}
        paths.append(store.write_store(tmp_path / f"{run}.zarr", store.EIGENVALUE_KIND, eigs, root, {}))
    return paths


def evaluation(
    tmp_path: Path,
    run: str,
    ap: float,
    seed: int = 0,
    body_params: int = 1_400_000,
    widths: str | None = None,
    segm: float | None = None,
) -> Path:
    init = "pretrained" if "pretrained" in run else "scratch"
    stats = {name: ap + i / 100 for i, name in enumerate(("AP", "AP50", "AP75", "APs", "APm", "APl"))}
    record = {
        "run": run,
        "model_name": run.split("-")[0],
        "init": init,
        "seed": seed,
        "widths": widths,
        "bbox": stats,
        "per_class": [1],
        "complexity": {
            "input_size": [128, 128],
            "body_params": body_params,
            "detector_params": 2 * body_params,
            "body_macs": 25_000_000,
            "detector_macs": 79_000_000,
        },
    }
    if segm is not None:
        record["segm"] = {name: segm for name in stats}
    path = tmp_path / "eval" / f"{run}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(record))
    return path


def evaluations(tmp_path: Path) -> list[Path]:
    return [evaluation(tmp_path, "faster_rcnn-scratch", 0.41), evaluation(tmp_path, "faster_rcnn-pretrained", 0.43)]


def derivation_file(tmp_path: Path, name: str = "faster_rcnn-derived") -> Path:
    layers = [
        {"name": n, "d": d, "original": o, "derived": w}
        for n, d, o, w in [
            ("conv1", 5, 8, 8),
            ("layer1.0.conv1", 3, 8, 4),
            ("layer1.out", 20, 32, 24),
            ("layer1.0.downsample.0", 20, 32, None),
        ]
    ]
    record = {
        "measure": "intrinsic_dim",
        "alpha": 1.2,
        "body": {"ratio": {"params": 0.7, "macs": 0.99}},
        "layers": layers,
    }
    path = tmp_path / "widths" / f"{name}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump({"stem": 8, "stages": [], "derivation": record}))
    return path


def is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_full_report(tmp_path: Path) -> None:
    out = tmp_path / "report"
    written = report.make_report(
        REPORT,
        dimension_tables(tmp_path),
        out,
        eigenvalue_stores(tmp_path),
        evaluations(tmp_path),
        [derivation_file(tmp_path)],
    )
    for name in ("eigenvalues.png", "dimensions.png", "dynamics.png", "widths.png"):
        assert is_png(out / name) and (out / name).stat().st_size > 10_000, name
    summary = pd.read_csv(out / "spectra.csv")
    assert list(summary["run"]) == ["classifier", "faster_rcnn-pretrained", "faster_rcnn-scratch"]
    assert list(summary["iteration"]) == [800, 200, 200]
    assert list(summary["role"]) == ["classifier", "pretrained", "scratch"]
    assert list(summary["layers"]) == [10, 12, 12]
    assert summary["intrinsic_dim_ratio_mean"].between(0, 1).all()
    evaluation = pd.read_csv(out / "evaluation.csv")
    assert list(evaluation["run"]) == ["faster_rcnn-pretrained", "faster_rcnn-scratch"]
    assert list(evaluation["bbox_AP"]) == [0.43, 0.41] and "per_class" not in evaluation.columns
    assert set(written) == {
        "eigenvalues",
        "dimensions",
        "dynamics",
        "spectra",
        "evaluation",
        "summary",
        "summary_md",
        "widths",
        "comparisons",
        "dimension_differences",
    }
    assert list(pd.read_csv(out / "summary.csv")["model"]) == ["faster_rcnn-scratch", "faster_rcnn-pretrained"]
    assert (out / "summary.md").read_text().startswith("| model | detector |")
    # one seed, no matching files, no folds: differences without intervals, d/C differences without intervals
    pairs = pd.read_csv(out / "comparisons.csv")
    assert list(pairs["pairing"]) == ["one seed"] and "low" not in pairs
    diffs = pd.read_csv(out / "dimension_differences.csv")
    assert set(diffs["detector"]) == {"faster_rcnn"} and "low" not in diffs and (diffs["seeds"] == "1/1").all()
    assert (out / "summary.md").read_text().endswith("- no two models of one detector with an interval to judge\n")
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_missing_runs_and_inputs_degrade_gracefully(tmp_path: Path) -> None:
    only_scratch = {"faster_rcnn-scratch": RUNS["faster_rcnn-scratch"]}
    out = tmp_path / "report"
    written = report.make_report(REPORT, dimension_tables(tmp_path, only_scratch), out)
    assert all(is_png(out / n) for n in ("eigenvalues.png", "dimensions.png", "dynamics.png"))
    assert "evaluation" not in written and not (out / "evaluation.csv").exists()
    assert len(pd.read_csv(out / "spectra.csv")) == 1


def test_layer_choice() -> None:
    order = BODY + FPN
    assert inputs.chosen_layers(order, []) == ["conv1", "layer2.1.conv3", "layer3.0.conv3", "layer4.0.conv3"]
    assert inputs.chosen_layers(order, ["layer1.0.conv1"]) == ["layer1.0.conv1"]
    with pytest.raises(EigpipeError, match="report.layers: layer9.0.conv2 is not a layer"):
        inputs.chosen_layers(order, ["layer9.0.conv2"])
    assert inputs.chosen_layers(["a", "b", "c", "d", "e", "f", "g", "h"], []) == ["a", "c", "e", "g"]


def test_roles_and_styles() -> None:
    assert inputs.role("classifier") == "classifier"
    assert inputs.role("x", task="classification") == "classifier"
    assert inputs.role("faster_rcnn-pretrained", init="pretrained:results/x/final.pt") == "pretrained"
    assert inputs.role("mask_rcnn-scratch") == "scratch" and inputs.role("faster_rcnn-derived") == "other"
    table = pd.DataFrame(
        {"run": ["classifier", "mask_rcnn-scratch", "faster_rcnn-scratch"], "init": [None, "scratch", "scratch"]}
        | {"task": ["classification", "detection", "detection"], "model_name": ["c", "mask_rcnn", "faster_rcnn"]}
    )
    style = inputs.styles(table)
    assert style["classifier"]["color"] == "black" and style["mask_rcnn-scratch"]["linestyle"] == "--"
    assert len({s["color"] for s in style.values()}) == 3


def test_report_cli(tmp_path: Path) -> None:
    dims = dimension_tables(tmp_path)
    args = ["report", "--config-json", json.dumps({"report": {"layers": ["conv1", "layer4.0"]}})]
    args += ["--dimensions", *map(str, dims), "--out-dir", str(tmp_path / "r")]
    assert cli.main(args) == 0
    assert is_png(tmp_path / "r" / "dynamics.png") and (tmp_path / "r" / "spectra.csv").is_file()
    bad = ["report", "--config-json", json.dumps({"report": {"layers": ["nope"]}})]
    assert cli.main([*bad, "--dimensions", *map(str, dims), "--out-dir", str(tmp_path / "r2")]) == 1


def test_comparison_table_means_spreads_and_deltas(tmp_path: Path) -> None:
    derived = str(tmp_path / "widths" / "faster_rcnn-derived.yaml")
    paths = [
        evaluation(tmp_path, "faster_rcnn-pretrained", 0.68),
        evaluation(tmp_path, "faster_rcnn-pretrained-s1", 0.66, 1),
        evaluation(tmp_path, "faster_rcnn-scratch", 0.66),
        evaluation(tmp_path, "faster_rcnn-scratch-s1", 0.62, 1),
        evaluation(tmp_path, "faster_rcnn-derived", 0.65, 0, 1_000_000, derived),
        evaluation(tmp_path, "faster_rcnn-derived-s1", 0.63, 1, 1_000_000, derived),
        evaluation(tmp_path, "mask_rcnn-scratch", 0.5, segm=0.4),
        evaluation(tmp_path, "mask_rcnn-scratch-s1", 0.5, 1, segm=0.4),
        evaluation(tmp_path, "mask_rcnn-derived", 0.45, 0, 700_000, str(tmp_path / "mask_rcnn-derived.yaml"), 0.42),
    ]
    record = json.loads(paths[7].read_text())  # a Mask R-CNN's detector MACs follow its detections: seeds differ
    record["complexity"]["detector_macs"] = 61_000_000
    paths[7].write_text(json.dumps(record))
    table = comparison.comparison_table(paths).set_index("model")
    assert (
        table.loc["mask_rcnn-scratch", "detector_macs"] == 70_000_000
        and table.loc["mask_rcnn-scratch", "seeds"] == "0 1"
    )
    assert list(table.index) == [
        "faster_rcnn-pretrained",
        "faster_rcnn-scratch",
        "faster_rcnn-derived",
        "mask_rcnn-scratch",
        "mask_rcnn-derived",
    ]
    derived_row = table.loc["faster_rcnn-derived"]
    assert derived_row["AP"] == pytest.approx(0.64) and derived_row["seeds"] == "0 1"
    assert derived_row["AP_min"] == pytest.approx(0.63) and derived_row["AP_max"] == pytest.approx(0.65)
    assert derived_row["delta_AP"] == pytest.approx(0.0) and derived_row["widths_source"] == "faster_rcnn-derived"
    assert derived_row["body_params_ratio"] == pytest.approx(1_000_000 / 1_400_000)
    assert table.loc["faster_rcnn-pretrained", "delta_AP"] == pytest.approx(0.67 - 0.64)
    assert table.loc["mask_rcnn-derived", "delta_segm_AP"] == pytest.approx(0.02)
    assert table.loc["mask_rcnn-derived", "APm"] == pytest.approx(0.45 + 0.04)  # every COCO size column is kept
    text = comparison.markdown(table.reset_index())
    assert "| faster_rcnn-derived |" in text and "+0.000" in text and "0.714x" in text


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 0, 1)])
def test_three_skewed_seeds_give_their_mean_not_their_median(tmp_path: Path, order) -> None:
    """AP 0.60, 0.61, 0.71: the mean 0.64 is not the median 0.61 (two seeds cannot tell them apart)."""
    aps = {0: 0.60, 1: 0.61, 2: 0.71}
    paths = [evaluation(tmp_path, "faster_rcnn-scratch", 0.5)]
    for seed in order:
        run = "mask_rcnn-scratch" + (f"-s{seed}" if seed else "")
        paths.append(evaluation(tmp_path, run, aps[seed], seed, segm=aps[seed] - 0.1))
    paths.append(evaluation(tmp_path, "mask_rcnn-derived", 0.70, 0, 1_000_000, "mask_rcnn-derived.yaml", 0.58))
    table = comparison.comparison_table(paths).set_index("model")
    row = table.loc["mask_rcnn-scratch"]
    assert row["seeds"] == "0 1 2" and row["AP"] == pytest.approx(0.64) and row["segm_AP"] == pytest.approx(0.54)
    assert row["AP50"] == pytest.approx(0.65) and row["APl"] == pytest.approx(0.69)  # every metric: the mean
    assert row["AP_min"] == pytest.approx(0.60) and row["AP_max"] == pytest.approx(0.71)
    assert table.loc["mask_rcnn-derived", "delta_AP"] == pytest.approx(0.70 - 0.64)  # against the mean
    assert table.loc["mask_rcnn-derived", "delta_segm_AP"] == pytest.approx(0.58 - 0.54)


# ---- the report folder is published whole (issue 18, item 3) ---------------------------------------------------


SMALL = {"faster_rcnn-scratch": RUNS["faster_rcnn-scratch"]}


def report_args(root: Path, out: Path, with_comparison: bool = True) -> list[str]:
    """The report of the inputs ``study`` wrote under ``root``."""
    args = ["report", "--config-json", json.dumps({"report": {"layers": []}})]
    args += ["--dimensions", str(root / "faster_rcnn-scratch.parquet")]
    if with_comparison:
        args += ["--eigenvalues", str(root / "faster_rcnn-scratch.zarr")]
        args += ["--evaluations", *(str(root / "eval" / f"faster_rcnn-{i}.json") for i in ("scratch", "pretrained"))]
        args += ["--widths", str(root / "widths" / "faster_rcnn-derived.yaml")]
    return [*args, "--out-dir", str(out)]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small study's report inputs and its finished report (report/), rendered once."""
    root = tmp_path_factory.mktemp("finished")
    dimension_tables(root, SMALL), eigenvalue_stores(root, SMALL), evaluations(root), derivation_file(root)
    assert cli.main(report_args(root, root / "report")) == 0
    return root


@pytest.fixture
def study(finished: Path, tmp_path: Path) -> Path:
    """A copy of ``finished`` to spoil."""
    return Path(__import__("shutil").copytree(finished, tmp_path / "study"))


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` by its path relative to it, with its bytes."""
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def _yaml(path: Path, data: object) -> None:
    path.write_text(yaml.safe_dump(data))


def _no_derived_layer_key(path: Path) -> None:
    data = yaml.safe_load(path.read_text())
    del data["derivation"]["layers"][1]["d"]
    _yaml(path, data)


def _evaluation_without(path: Path, section: str, key: str) -> None:
    record = json.loads(path.read_text())
    del (record[section] if section else record)[key]
    path.write_text(json.dumps(record))


def _evaluation_with(path: Path, section: str, key: str, value: object) -> None:
    record = json.loads(path.read_text())
    record[section][key] = value
    path.write_text(json.dumps(record))


SPOILS = {
    "evaluation not JSON": ("eval/faster_rcnn-scratch.json", lambda p: p.write_text("{'AP': ")),
    "evaluation without bbox": ("eval/faster_rcnn-scratch.json", lambda p: _evaluation_without(p, "", "bbox")),
    "evaluation without a cost": (
        "eval/faster_rcnn-pretrained.json",
        lambda p: _evaluation_without(p, "complexity", "body_macs"),
    ),
    "evaluation without an AP": ("eval/faster_rcnn-scratch.json", lambda p: _evaluation_without(p, "bbox", "APl")),
    "evaluation without its run": ("eval/faster_rcnn-scratch.json", lambda p: _evaluation_without(p, "", "run")),
    "evaluation not UTF-8": ("eval/faster_rcnn-scratch.json", lambda p: p.write_bytes(b"\xff\xfe{}")),
    "evaluation with a text AP": ("eval/faster_rcnn-scratch.json", lambda p: _evaluation_with(p, "bbox", "AP", "high")),
    "evaluation with a text cost": (
        "eval/faster_rcnn-scratch.json",
        lambda p: _evaluation_with(p, "complexity", "body_params", "many"),
    ),
    "widths spec without derivation": ("widths/faster_rcnn-derived.yaml", lambda p: _yaml(p, {"stem": 8})),
    "derivation without layers": (
        "widths/faster_rcnn-derived.yaml",
        lambda p: _yaml(p, {"derivation": {"measure": "m", "alpha": 1, "body": {}}}),
    ),
    "derivation layer without d": ("widths/faster_rcnn-derived.yaml", _no_derived_layer_key),
    "widths spec not YAML": ("widths/faster_rcnn-derived.yaml", lambda p: p.write_text("a: [1,\n")),
    "dimensions table without threshold": (
        "faster_rcnn-scratch.parquet",
        lambda p: pd.read_parquet(p).drop(columns="threshold").to_parquet(p),
    ),
    "eigenvalue store removed": ("faster_rcnn-scratch.zarr", lambda p: __import__("shutil").rmtree(p)),
}


@pytest.mark.parametrize("spoil", SPOILS)
def test_a_bad_input_writes_nothing_and_keeps_the_previous_report(study, capsys, spoil) -> None:
    out = study / "report"
    before = tree(out)
    relative, damage = SPOILS[spoil]
    damage(study / relative)
    assert cli.main(report_args(study, out)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and Path(relative).name in err, err
    assert tree(out) == before
    assert cli.main(report_args(study, study / "new")) == 1
    assert not (study / "new").exists()
    assert [p.name for p in study.iterdir() if p.name.startswith(".")] == []


def test_a_rerun_with_fewer_inputs_leaves_no_stale_files_and_keeps_what_it_did_not_write(study) -> None:
    out = study / "report"
    assert {"summary.csv", "summary.md", "widths.png", "evaluation.csv"} < set(tree(out))
    (out / "report.html").write_text("<html>snakemake --report</html>")
    (out / "notes").mkdir()
    (out / "notes" / "todo.txt").write_text("check layer4")
    assert cli.main(report_args(study, out, with_comparison=False)) == 0
    written = {"eigenvalues.png", "dimensions.png", "dynamics.png", "spectra.csv", report.MARKER}
    assert set(tree(out)) == written | {"report.html", "notes/todo.txt"}
    assert (out / "report.html").read_text() == "<html>snakemake --report</html>"
    assert (out / "notes" / "todo.txt").read_text() == "check layer4"
    marker = json.loads((out / report.MARKER).read_text())
    assert marker["kind"] == report.REPORT_KIND and set(marker["files"]) == written - {report.MARKER}


def test_a_kill_half_way_leaves_the_previous_report(study, monkeypatch) -> None:
    out = study / "report"
    before = tree(out)

    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "plot_dynamics", killed)  # after two figures are written
    assert cli.main(report_args(study, out, with_comparison=False)) == 130
    assert tree(out) == before
    monkeypatch.setattr(report, "plot_eigenvalues", killed)
    assert cli.main(report_args(study, study / "fresh")) == 130
    assert not (study / "fresh").exists()
    assert [p.name for p in study.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("failing", ["matplotlib.figure.Figure.savefig", "pandas.DataFrame.to_csv"])
def test_a_full_disk_names_the_report_folder(study, monkeypatch, capsys, failing) -> None:
    import errno
    import os

    out = study / "report"
    before = tree(out)

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a write() reports it: no file name

    monkeypatch.setattr(failing, full)
    assert cli.main(report_args(study, out, with_comparison=False)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and str(out) in err and ".tmp-" not in err, err
    assert tree(out) == before


def test_a_folder_of_report_files_without_the_marker_is_refused_and_left_whole(study, capsys) -> None:
    """Files named like a report's may be anybody's (a report from before the marker: move it away once)."""
    out = study / "report"
    (out / report.MARKER).unlink()
    before = tree(out)
    assert cli.main(report_args(study, out, with_comparison=False)) == 1
    assert "exists and is not an eigpipe report folder" in capsys.readouterr().err
    assert tree(out) == before


def test_a_file_of_the_users_named_like_a_report_file_is_refused(study, capsys) -> None:
    out = study / "report"
    marker = json.loads((out / report.MARKER).read_text())
    marker["files"].remove("summary.md")  # as after a report without the comparison ...
    (out / report.MARKER).write_text(json.dumps(marker))
    (out / "summary.md").write_text("my summary")  # ... the user wrote a summary.md of their own
    before = tree(out)
    assert cli.main(report_args(study, out)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(out / "summary.md") in err, err
    assert tree(out) == before


# ---- how sure: intervals over seeds and images, verdicts, the d/C differences ----


@functools.cache
def _synthetic_matching(seed: int) -> Any:
    from eigpipe import matching
    from tests.coco_study import evaluate_bbox, scored_study

    return matching.from_evaluator(evaluate_bbox(*scored_study(np.random.default_rng(seed), n_images=20)))


def _matches(tmp_path: Path, run: str, seed: int) -> Path:
    """A per-image matching file of a synthetic evaluation (the same images for every run)."""
    from eigpipe import matching

    return matching.write(tmp_path / "eval" / f"{run}.matches.npz", {"bbox": _synthetic_matching(seed)}, {"run": run})


def test_intervals_and_verdicts_in_the_summary(tmp_path: Path) -> None:
    aps = {"scratch": [0.60, 0.64, 0.68], "derived": [0.65, 0.66, 0.70], "pretrained": [0.70, 0.72]}
    paths, matches = [], []
    for init, values in aps.items():
        for seed, ap in enumerate(values):
            run = f"faster_rcnn-{init}" + (f"-s{seed}" if seed else "")
            widths = str(tmp_path / "faster_rcnn-derived.yaml") if init == "derived" else None
            paths.append(evaluation(tmp_path, run, ap, seed, widths=widths))
            # derived and scratch runs share their per-image results: their difference is 0 on every resample
            matches.append(_matches(tmp_path, run, seed=1 if init == "pretrained" else 0))
    cfg = {**REPORT["report"], "bootstrap": {"resamples": 200, "seed": 0}}
    compared = report._comparison(cfg, paths, matches, pd.DataFrame())  # the tables of make_report, without plots
    table = compared["summary"].set_index("model")
    scratch, derived, pretrained = (table.loc[f"faster_rcnn-{i}"] for i in ("scratch", "derived", "pretrained"))
    half = 4.3026527 * 0.04 / math.sqrt(3)  # t(2) x sd / sqrt(3) of 0.60, 0.64, 0.68
    assert scratch["AP_sd"] == pytest.approx(0.04)
    assert (scratch["AP_seeds_low"], scratch["AP_seeds_high"]) == pytest.approx((0.64 - half, 0.64 + half), abs=1e-6)
    assert scratch["AP_images_low"] < scratch["AP_images_high"]  # the images move each model's own AP
    assert derived["delta_AP_pairing"] == "paired by seed" and pretrained["delta_AP_pairing"] == "unpaired (Welch)"
    assert derived["delta_AP_images_low"] == derived["delta_AP_images_high"] == 0.0  # paired by image
    # differences 0.05, 0.02, 0.02: the images add nothing, so both intervals are the paired t-interval
    sd = float(np.std([0.05, 0.02, 0.02], ddof=1))
    paired = (0.03 - 4.3026527 * sd / math.sqrt(3), 0.03 + 4.3026527 * sd / math.sqrt(3))
    assert (derived["delta_AP_low"], derived["delta_AP_high"]) == pytest.approx(paired, abs=1e-6)
    pairs = compared["comparisons"]
    assert list(zip(pairs["model"], pairs["reference"], strict=True)) == [
        ("faster_rcnn-derived", "faster_rcnn-scratch"),
        ("faster_rcnn-pretrained", "faster_rcnn-scratch"),
        ("faster_rcnn-derived", "faster_rcnn-pretrained"),
    ]
    lines = compared["summary_md"].rstrip("\n").splitlines()
    assert lines[-3].startswith("- faster_rcnn-derived vs faster_rcnn-scratch: AP +0.030 [95% CI ")
    assert "over 3 seeds x 20 images: the interval includes 0" in lines[-3]
    assert "over 2 seeds x 20 images" in lines[-2] and lines[-2].startswith("- faster_rcnn-pretrained vs")


def _eigen_store(tmp_path: Path, run: str, ratios: list[float], loo: list[list[float]] | None) -> Path:
    """A final eigenvalue store whose layer1.0.conv2 (4 channels) has d/C ``ratios[0]`` and, per left-out fold,
    ``loo`` (layer2.0 block output: ``ratios[1]``)."""

    def spectrum_of(ratio: float) -> np.ndarray:
        above = round(ratio * 4)
        return np.array([1.0] * above + [1e-6] * (4 - above))

    layers = {}
    for i, name in enumerate(("backbone.body.layer1.0.conv2", "backbone.body.layer2.0")):
        arrays = {"second_moment": spectrum_of(ratios[i]), "covariance": spectrum_of(ratios[i])}
        if loo is not None:
            stack = np.stack([spectrum_of(fold[i]) for fold in loo])
            arrays.update(second_moment_jackknife=stack, covariance_jackknife=stack)
        layers[name] = arrays
    spectrum = {"threshold": 1e-3, "relative_threshold": 1e-3, "soft_lambda": 1e-3}
    init = "pretrained" if "pretrained" in run else "scratch"
    attrs = {"run": run, "init": init, "spectrum": spectrum}
    return store.write_store(tmp_path / f"{run}.zarr", store.EIGENVALUE_KIND, layers, attrs, {})


def test_pretrained_vs_scratch_d_over_c_with_seeds_and_folds_by_hand(tmp_path: Path) -> None:
    stores = [
        _eigen_store(tmp_path, "faster_rcnn-pretrained", [0.75, 1.0], [[1.0, 1.0], [0.75, 1.0], [0.75, 1.0]]),
        _eigen_store(tmp_path, "faster_rcnn-scratch", [0.5, 1.0], [[0.5, 1.0], [0.5, 1.0], [0.5, 1.0]]),
        _eigen_store(tmp_path, "faster_rcnn-pretrained-s1", [0.75, 1.0], [[0.75, 1.0]] * 3),
        _eigen_store(tmp_path, "faster_rcnn-scratch-s1", [0.75, 1.0], [[0.75, 1.0]] * 3),
    ]
    diffs = report.dimension_diffs.differences(inputs.load_stores(stores)).set_index(["stage", "kind"])
    row = diffs.loc[("s1", "conv2")]
    assert (row["pretrained"], row["scratch"], row["difference"]) == pytest.approx((0.75, 0.625, 0.125))
    assert row["pairing"] == "paired by seed" and row["folds"] == 3
    # seeds: differences 0.25 and 0.0, sd 0.1768, se 0.125, 1 df
    assert (row["seeds_low"], row["seeds_high"]) == pytest.approx(
        (0.125 - 12.7062047 * 0.125, 0.125 + 12.7062047 * 0.125)
    )
    # images: fold k left out of every run, seed-mean difference (0.5 + 0) / 2, (0.25 + 0) / 2, (0.25 + 0) / 2
    loo = np.array([0.25, 0.125, 0.125])
    se = math.sqrt(2 / 3 * ((loo - loo.mean()) ** 2).sum())
    assert se == pytest.approx(1 / 12)
    assert (row["images_low"], row["images_high"]) == pytest.approx((0.125 - 4.3026527 * se, 0.125 + 4.3026527 * se))
    both = intervals.combined(0.125, intervals.paired_interval([0.25, 0.0], [0.0, 0.0]), se, 2)
    assert (row["low"], row["high"]) == pytest.approx((both.low, both.high))
    assert diffs.loc[("s2", "block output"), "difference"] == 0.0
    # stores without folds: an interval over seeds only
    plain = [
        _eigen_store(tmp_path / "plain", r, [0.5, 1.0], None) for r in ("faster_rcnn-pretrained", "faster_rcnn-scratch")
    ]
    unfolded = report.dimension_diffs.differences(inputs.load_stores(plain))
    assert "images_low" not in unfolded and "low" not in unfolded and unfolded["difference"].eq(0).all()


def test_matching_files_of_other_images_are_refused(tmp_path: Path) -> None:
    from eigpipe import matching
    from eigpipe.report import uncertainty
    from tests.coco_study import evaluate_bbox, scored_study

    first = _matches(tmp_path, "faster_rcnn-scratch", seed=0)
    other = matching.from_evaluator(evaluate_bbox(*scored_study(np.random.default_rng(0), n_images=12)))
    second = matching.write(tmp_path / "other.matches.npz", {"bbox": other}, {"run": "faster_rcnn-derived"})
    with pytest.raises(EigpipeError, match="other.matches.npz: evaluated other images than .*a paired bootstrap"):
        uncertainty.bootstrap_runs([first, second], {"resamples": 10, "seed": 0})


def test_a_table_with_two_layers_of_one_canonical_name_in_a_snapshot_is_refused(tmp_path: Path) -> None:
    """Tables written before canonical names kept the body prefix where stripping it merges two layers."""
    path = dimension_tables(tmp_path, SMALL)[0]
    table = pd.read_parquet(path)
    table.loc[table["layer"] == "backbone.body.layer1.0.conv1", "canonical"] = "conv1"
    table.to_parquet(path)
    with pytest.raises(EigpipeError, match=r"run faster_rcnn-scratch, iteration 0: two layers have the canonical name"):
        inputs.load_dimensions([path])


def test_eigenvalue_layers_keep_full_names_where_stripping_the_body_prefix_would_merge_two(tmp_path: Path) -> None:
    values = {"second_moment": np.ones(2), "covariance": np.ones(2)}
    layers = {"conv": values, "body.conv": {**values, "second_moment": np.zeros(2)}}
    path = store.write_store(tmp_path / "s.zarr", store.EIGENVALUE_KIND, layers, {"run": "mine"}, {})
    spectra = inputs.second_moments(inputs.load_stores([path]))
    assert list(spectra["mine"]) == ["conv", "body.conv"] and spectra["mine"]["body.conv"].sum() == 0


def test_one_final_eigenvalue_store_per_run(tmp_path: Path) -> None:
    table = inputs.load_dimensions(dimension_tables(tmp_path, SMALL))
    final = eigenvalue_stores(tmp_path, SMALL)[0]
    assert list(inputs.load_stores([final], table)) == ["faster_rcnn-scratch"]
    again = shutil.copytree(final, tmp_path / "again" / final.name)
    with pytest.raises(EigpipeError, match=r"again/faster_rcnn-scratch.zarr: a second eigenvalue store of run fast"):
        inputs.load_stores([final, again], table)
    init, task, model, _iterations, prefix, layers = SMALL["faster_rcnn-scratch"]
    early = eigenvalue_stores(tmp_path / "early", {"faster_rcnn-scratch": (init, task, model, [100], prefix, layers)})
    with pytest.raises(EigpipeError, match=r"iteration 100 of run faster_rcnn-scratch is not its final .* 200"):
        inputs.load_stores(early, table)
    assert list(inputs.load_stores(early)) == ["faster_rcnn-scratch"]  # no table: nothing to check against
