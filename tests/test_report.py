"""Report: plots and tables from synthetic dimension tables, eigenvalue stores and evaluations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from eigpipe import cli, report, store
from eigpipe.errors import EigpipeError

BODY = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv3", "layer2.1.conv2", "layer2.1.conv3"]
BODY += ["layer3.0.conv3", "layer4.0.conv2", "layer4.0.conv3", "layer4.0"]
FPN = ["backbone.fpn.layer_blocks.3", "backbone.fpn.layer_blocks.0"]
RUNS = {
    "classifier": ("synthetic", "classification", "classifier", [0, 800], "body.", BODY),
    "faster_rcnn-pretrained": ("pretrained", "detection", "faster_rcnn", [0, 100, 200], "backbone.body.", BODY + FPN),
    "faster_rcnn-scratch": ("scratch", "detection", "faster_rcnn", [0, 100, 200], "backbone.body.", BODY + FPN),
}


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
        root = {"run": run, "init": init, "iteration": iterations[-1]}
        paths.append(store.write_eigenvalue_store(tmp_path / f"{run}.zarr", eigs, root))
    return paths


def evaluations(tmp_path: Path) -> list[Path]:
    paths = []
    for run, ap in [("faster_rcnn-scratch", 0.41), ("faster_rcnn-pretrained", 0.43)]:
        path = tmp_path / f"{run}.json"
        record = {"run": run, "bbox": {"AP": ap, "AP50": ap + 0.2}, "params": 1.4e6, "macs": 7.9e7, "per_class": [1]}
        path.write_text(json.dumps(record))
        paths.append(path)
    return paths


def is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_full_report(tmp_path: Path) -> None:
    out = tmp_path / "report"
    written = report.make_report(
        dimension_tables(tmp_path), eigenvalue_stores(tmp_path), evaluations(tmp_path), out, {"layers": []}
    )
    for name in ("eigenvalues.png", "dimensions.png", "dynamics.png"):
        assert is_png(out / name) and (out / name).stat().st_size > 10_000, name
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["run"]) == ["classifier", "faster_rcnn-pretrained", "faster_rcnn-scratch"]
    assert list(summary["iteration"]) == [800, 200, 200]
    assert list(summary["role"]) == ["classifier", "pretrained", "scratch"]
    assert list(summary["layers"]) == [10, 12, 12]
    assert summary["intrinsic_dim_ratio_mean"].between(0, 1).all()
    evaluation = pd.read_csv(out / "evaluation.csv")
    assert list(evaluation["run"]) == ["faster_rcnn-pretrained", "faster_rcnn-scratch"]
    assert list(evaluation["bbox_AP"]) == [0.43, 0.41] and "per_class" not in evaluation.columns
    assert set(written) == {"eigenvalues", "dimensions", "dynamics", "summary", "evaluation"}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_missing_runs_and_inputs_degrade_gracefully(tmp_path: Path) -> None:
    only_scratch = {"faster_rcnn-scratch": RUNS["faster_rcnn-scratch"]}
    out = tmp_path / "report"
    written = report.make_report(dimension_tables(tmp_path, only_scratch), [], [], out, {})
    assert all(is_png(out / n) for n in ("eigenvalues.png", "dimensions.png", "dynamics.png"))
    assert "evaluation" not in written and not (out / "evaluation.csv").exists()
    assert len(pd.read_csv(out / "summary.csv")) == 1


def test_layer_choice() -> None:
    order = BODY + FPN
    assert report.chosen_layers(order, []) == ["conv1", "layer2.1.conv3", "layer3.0.conv3", "layer4.0.conv3"]
    assert report.chosen_layers(order, ["layer1.0.conv1"]) == ["layer1.0.conv1"]
    with pytest.raises(EigpipeError, match="report.layers: layer9.0.conv2 is not a layer"):
        report.chosen_layers(order, ["layer9.0.conv2"])
    assert report.chosen_layers(["a", "b", "c", "d", "e", "f", "g", "h"], []) == ["a", "c", "e", "g"]


def test_roles_and_styles() -> None:
    assert report.role("classifier") == "classifier"
    assert report.role("x", task="classification") == "classifier"
    assert report.role("faster_rcnn-pretrained", init="pretrained:results/x/final.pt") == "pretrained"
    assert report.role("mask_rcnn-scratch") == "scratch" and report.role("faster_rcnn-derived") == "other"
    table = pd.DataFrame(
        {"run": ["classifier", "mask_rcnn-scratch", "faster_rcnn-scratch"], "init": [None, "scratch", "scratch"]}
        | {"task": ["classification", "detection", "detection"], "model_name": ["c", "mask_rcnn", "faster_rcnn"]}
    )
    style = report.styles(table)
    assert style["classifier"]["color"] == "black" and style["mask_rcnn-scratch"]["linestyle"] == "--"
    assert len({s["color"] for s in style.values()}) == 3


def test_report_cli(tmp_path: Path) -> None:
    dims = dimension_tables(tmp_path)
    args = ["report", "--config-json", json.dumps({"report": {"layers": ["conv1", "layer4.0"]}})]
    args += ["--dimensions", *map(str, dims), "--out-dir", str(tmp_path / "r")]
    assert cli.main(args) == 0
    assert is_png(tmp_path / "r" / "dynamics.png") and (tmp_path / "r" / "summary.csv").is_file()
    bad = ["report", "--config-json", json.dumps({"report": {"layers": ["nope"]}})]
    assert cli.main([*bad, "--dimensions", *map(str, dims), "--out-dir", str(tmp_path / "r2")]) == 1
