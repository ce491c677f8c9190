"""The GPU check (benchmarks/gpu.py, `make gpu-check`) in its dry mode: every section on the CPU at tiny sizes, so
that a GPU machine's scarce minutes go to measuring, not to debugging the script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from gpu_compare import TOLERANCE, compare_trees  # noqa: E402


@pytest.mark.slow
def test_dry_gpu_check_runs_every_section(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        ["make", "gpu-check", f"GPU_ARGS=--dry --out {out}"], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads(out.read_text())
    assert {report[name]["status"] for name in ("extraction", "training", "dag", "cuda_tests")} == {"ok"}
    assert report["dry"] and report["environment"]["torch"] and (tmp_path / "gpu.log").stat().st_size > 0

    extraction = report["extraction"]
    assert set(extraction["images_per_s"]) >= {"plain_tf32", "plain_ieee", "extraction_float64", "extraction_float32"}
    assert all(rate > 0 for rate in extraction["images_per_s"].values())
    errors = extraction["errors"]
    for key in ("second_moment", "covariance"):
        assert 0 < errors["float32_vs_float64"][key]["max_relative"] <= 1e-6  # the float32 budget
        assert errors["tf32_features_vs_ieee"][key]["max_relative"] == 0  # no TF32 on a CPU

    training = report["training"]
    for case in ("float32_ieee", "float32_tf32", "bf16", "fp16"):
        assert training[case]["eigpipe_vs_bare_step_time"] > 0, case
    assert training["speed_up_over_float32_ieee"]["float32_ieee"] == 1.0

    dag = report["dag"]  # on the CPU both runs are the same computation: bitwise equal trees
    assert dag["completed"] and dag["comparison"]["agree"] and dag["gpu_claims"]["every_job_claimed"] is None
    assert dag["comparison"]["equal"] == dag["comparison"]["artifacts"] >= 4
    assert dag["gpu_claims"]["jobs"] == 3  # training, evaluation, covariance of one scratch detector

    tests = report["cuda_tests"]
    assert tests["tests"] == tests["skipped"] >= 4 and tests["failed"] == []


KINDS_OF_ARTIFACT = [
    "pretrain/metrics.jsonl",
    "train/faster_rcnn-scratch/final.pt",
    "covariance/mask_rcnn-scratch/final.zarr",
    "spectrum/mask_rcnn-scratch/final.parquet",
    "spectrum/mask_rcnn-scratch/final.zarr",
    "widths/mask_rcnn-derived.yaml",
    "eval/mask_rcnn-derived.json",
    "eval/faster_rcnn-derived.json",
    "dimensions/mask_rcnn-derived.parquet",
]


def test_tree_comparison_finds_each_kind_of_difference(smoke_run, tmp_path):
    """The comparison the GPU check makes, on the session's smoke study against a copy changed in places."""
    import shutil

    import torch
    import zarr

    study = smoke_run / "results" / "smoke"
    reference, other = tmp_path / "reference", tmp_path / "other"
    for part in KINDS_OF_ARTIFACT:  # one of each kind (the whole tree takes half a minute to compare)
        for root in (reference, other):
            copy = shutil.copytree if (study / part).is_dir() else shutil.copyfile
            (root / part).parent.mkdir(parents=True, exist_ok=True)
            copy(study / part, root / part)
    same = compare_trees(reference, other)
    assert same["agree"] and same["equal"] == same["artifacts"] == len(KINDS_OF_ARTIFACT)

    checkpoint = other / "train" / "faster_rcnn-scratch" / "final.pt"
    state = torch.load(checkpoint, weights_only=False)
    name = next(k for k, v in state["state_dict"].items() if v.is_floating_point() and v.abs().max() > 0)
    tensor = state["state_dict"][name]
    tensor.view(-1)[tensor.abs().argmax()] *= 1 + 10 * TOLERANCE["checkpoint"]
    torch.save(state, checkpoint)
    group = zarr.open_group(other / "covariance" / "mask_rcnn-scratch" / "final.zarr", mode="r+")
    layer = next(iter(dict(group.groups())))
    group[f"{layer}/mean"][0] += 1e-9  # tiny: within the store tolerance
    metrics = other / "pretrain" / "metrics.jsonl"
    first, *rest = metrics.read_text().splitlines()
    row = json.loads(first)
    row["loss"] *= 1.5
    metrics.write_text("\n".join([json.dumps(row), *rest]) + "\n")
    (other / "widths" / "mask_rcnn-derived.yaml").write_text("stem: 8\nstages: []\n")

    found = {row["artifact"]: row for row in compare_trees(reference, other)["rows"]}
    assert found["train/faster_rcnn-scratch/final.pt"]["status"] == "outside tolerance"
    assert found["covariance/mask_rcnn-scratch/final.zarr"]["status"] == "within"
    assert found["pretrain/metrics.jsonl"]["status"] == "outside tolerance"
    assert found["widths/mask_rcnn-derived.yaml"]["status"] == "outside tolerance"
    assert found["eval/mask_rcnn-derived.json"]["status"] == "skipped: derived widths differ"
    assert found["eval/faster_rcnn-derived.json"]["status"] == "equal"
