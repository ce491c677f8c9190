"""The study of published checkpoints (config/published.yaml): its DAG, and a smoke version of it end to end.

The smoke version is config/published.yaml itself with its paths pointed at stand-ins: full-width random-weight
files in the upstream formats (tests/upstream_files.py), a COCO-format split of a few small synthetic images with
COCO's 80 categories, and sizes that fit a CPU (64 px, a few proposals, one training step of the retrain).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image, ImageDraw

from eigpipe import config, runs
from eigpipe.errors import ConfigError
from eigpipe.models.published.presets import PRESETS
from tests import upstream_keys
from tests.upstream_files import random_arrays, write_caffe2, write_detectron2
from tests.workflow_helpers import REPO, dry_run, failure, make_workdir, snakemake, write_config

PUBLISHED = "config/published.yaml"
RULE_ORDER = ["import_checkpoint", "covariance", "spectrum", "dimensions", "evaluate", "derive_widths", "report"]


def _placeholders(root: Path) -> dict:
    """config/published.yaml's paths, pointed at empty stand-ins under ``root`` (dry runs only)."""
    config = yaml.safe_load((REPO / PUBLISHED).read_text())
    changes = {}
    for split in ("train", "val"):
        (root / f"{split}2017").mkdir(parents=True, exist_ok=True)
        (root / f"{split}.json").write_text("{}")
        changes[f"data.coco.{split}_annotations"] = str(root / f"{split}.json")
        changes[f"data.coco.{split}_images"] = str(root / f"{split}2017")
    (root / "R-50-GN.pkl").write_text("")
    changes["pretrain.weights"] = str(root / "R-50-GN.pkl")
    imports = config["imports"]
    for entry in imports.values():
        placeholder = root / Path(entry["weights"]).name
        placeholder.write_text("")
        entry["weights"] = str(placeholder)
    changes["imports"] = imports
    return changes


def test_published_study_plans_import_to_report(tmp_path):
    """snakemake -n --configfile config/published.yaml, with placeholder files at the configured paths."""
    config = write_config(tmp_path / "published.yaml", PUBLISHED, **_placeholders(tmp_path / "files"))
    output = dry_run(make_workdir(tmp_path / "wd"), "--configfile", str(config))
    counts = {rule: output.count(f"rule {rule}:") for rule in RULE_ORDER + ["train_detector", "check_data"]}
    imports = yaml.safe_load(config.read_text())["imports"]
    assert counts["import_checkpoint"] == len(imports) + 1  # + Detectron's R-50-GN, the classifier reference
    assert counts["covariance"] == counts["spectrum"] == counts["dimensions"] == len(imports) + 2  # + derived
    assert counts["evaluate"] == len(imports) + 1 and counts["derive_widths"] == counts["train_detector"] == 1
    assert counts["report"] == 1 and counts["check_data"] == 2
    # the chain: each rule reads what the one before it writes
    assert "--checkpoint results/published/import/mask_rcnn-scratch.pt" in output  # covariance of an import
    assert "results/published/covariance/mask_rcnn-scratch/final.zarr --out results/published/spectrum" in output
    assert "--spectra results/published/spectrum/mask_rcnn-scratch/final.parquet" in output  # dimensions
    assert "--dimensions results/published/spectrum/mask_rcnn-scratch/final.parquet" in output  # widths
    assert "--checkpoint results/published/import/mask_rcnn-scratch.pt --out results/published/widths" in output
    assert "--preset detectron2/R-50-GN --run classifier" in output
    assert "--run mask_rcnn-scratch --init scratch --schedule 9x --source 'detectron2 model zoo'" in output
    assert (
        "--evaluations results/published/eval/" in output and "results/published/eval/mask_rcnn-derived.json" in output
    )


def test_the_source_of_the_widths_must_be_a_run_of_the_study():
    study = config.load(REPO / PUBLISHED)
    assert runs.source_run(study, "mask_rcnn") == "mask_rcnn-scratch" and study["imports"]["mask_rcnn-scratch"]
    assert [r.name for r in runs.detector_runs(study).values() if r.imported] == list(study["imports"])
    for name, preset in PRESETS.items():  # the run's model label, read off a preset's name without torch
        if preset.model_name != "classifier":
            imported = runs.imported_runs({"seed": 0, "imports": {"r": {"preset": name, "init": "scratch"}}})
            assert imported["r"].model == preset.model_name, name
    study["widths"]["source_run"] = "mask_rcnn-scratch-12x"
    with pytest.raises(ConfigError, match=r"widths\.source_run: mask_rcnn-scratch-12x is no trained or imported run"):
        runs.detector_runs(study)


# ---- the smoke version, end to end ----


def coco_split(root: Path, split: str, images: int, seed: int, size: tuple[int, int] = (80, 64)) -> tuple[Path, Path]:
    """A COCO-format split with COCO's 80 categories: images of ``size`` (width, height) with one or two filled
    rectangles."""
    from torchvision.models._meta import _COCO_CATEGORIES

    categories = [{"id": i, "name": n} for i, n in enumerate(_COCO_CATEGORIES) if i and n != "N/A"]
    rng = np.random.default_rng(seed)
    folder = root / f"{split}2017"
    folder.mkdir(parents=True)
    records, annotations = [], []
    for image_id in range(1, images + 1):
        picture = Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 255, 3)))
        draw = ImageDraw.Draw(picture)
        width, height = size
        for _ in range(int(rng.integers(1, 3))):
            x, y = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
            w, h = int(rng.integers(width // 7, width // 2)), int(rng.integers(height // 5, height // 2))
            draw.rectangle([x, y, x + w, y + h], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
            polygon = [x, y, x + w, y, x + w, y + h, x, y + h]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(rng.choice([1, 3, 18])),
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                    "segmentation": [polygon],
                }
            )
        picture.save(folder / f"{image_id:012d}.png")
        records.append({"id": image_id, "file_name": f"{image_id:012d}.png", "width": width, "height": height})
    path = root / f"instances_{split}2017.json"
    path.write_text(json.dumps({"images": records, "annotations": annotations, "categories": categories}))
    return path, folder


SMOKE_MODEL = {  # the retrain of the derived widths, sized for the CPU
    "min_size": 64,
    "max_size": 64,
    "rpn_pre_nms_top_n_train": 100,
    "rpn_post_nms_top_n_train": 20,
    "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 20,
    "box_batch_size_per_image": 16,
    "box_detections_per_img": 10,
}
IMPORTED_MODEL = {k: v for k, v in SMOKE_MODEL.items() if "train" not in k and k != "box_batch_size_per_image"}


def smoke_config(root: Path) -> Path:
    """config/published.yaml on stand-ins, as few jobs as cover every rule: one import (a random detectron2 GN Mask
    R-CNN file as the 9x scratch preset, the source of the widths), a random R-50-GN.pkl as the classifier
    reference, COCO-format splits of three and two small images."""
    root.mkdir(parents=True, exist_ok=True)
    detector = write_detectron2(root / "model_final.pkl", random_arrays(upstream_keys.detectron2_mask_rcnn_gn()))
    classifier = write_caffe2(root / "R-50-GN.pkl", random_arrays(upstream_keys.caffe2_r50_gn(), seed=1))
    val, val_images = coco_split(root, "val", 3, seed=0)
    train, train_images = coco_split(root, "train", 2, seed=1)
    imports = {
        "mask_rcnn-scratch": {
            "preset": "detectron2/scratch_mask_rcnn_R_50_FPN_9x_gn",
            "init": "scratch",
            "weights": str(detector),
            "model": IMPORTED_MODEL,
        }
    }
    schedule = {
        "steps": 1,
        "batch_size": 1,
        "lr": 0.001,
        "warmup_steps": 0,
        "lr_steps": [0.8],
        "snapshots": [],
        "checkpoint_every": 1,
        "workers": 0,
        "log_every": 1,
    }
    return write_config(
        root / "published-smoke.yaml",
        PUBLISHED,
        **{
            "study": "published-smoke",
            "runtime": {"device": "cpu", "threads": 1, "deterministic": True},
            "data.coco": {
                "train_annotations": str(train),
                "train_images": str(train_images),
                "val_annotations": str(val),
                "val_images": str(val_images),
            },
            "pretrain.weights": str(classifier),
            "imports": imports,
            "train.schedule": schedule,
            **{f"model.{key}": value for key, value in SMOKE_MODEL.items()},
            "covariance": {"images": 2, "batch_size": 2, "layers": ["default"]},
            "evaluate": {"batch_size": 3},
            "widths.input_size": [64, 64],
            "widths.multiple": 8,
        },
    )


@pytest.fixture(scope="module")
def published_smoke(tmp_path_factory, frozen_src) -> Path:
    root = tmp_path_factory.mktemp("published-smoke")
    config = smoke_config(root / "files")
    workdir = make_workdir(root / "wd")
    start = time.monotonic()
    proc = snakemake(workdir, "--cores", "2", "--configfile", str(config), extra_env={"PYTHONPATH": str(frozen_src)})
    print(f"\npublished smoke DAG: {time.monotonic() - start:.1f} s wall")
    assert proc.returncode == 0, failure(proc, workdir)
    return workdir / "results" / "published-smoke"


@pytest.mark.slow
def test_published_smoke_study_runs_end_to_end(published_smoke):
    results = published_smoke
    for name in ("eigenvalues.png", "dimensions.png", "summary.md", "widths.png"):
        assert (results / "report" / name).stat().st_size > 0
    evaluation = pd.read_csv(results / "report" / "evaluation.csv").set_index("run")
    assert evaluation.loc["mask_rcnn-scratch", "published_bbox_AP"] == pytest.approx(0.437)  # beside the measured
    assert evaluation.loc["mask_rcnn-scratch", "published_segm_AP"] == pytest.approx(0.396)
    assert "bbox_AP" in evaluation.columns and pd.isna(evaluation.loc["mask_rcnn-derived", "published_bbox_AP"])
    assert evaluation.loc["mask_rcnn-scratch", ["init", "schedule"]].tolist() == ["scratch", "9x"]
    spectra = pd.read_csv(results / "report" / "spectra.csv").set_index("run")
    assert set(spectra.index) == {"classifier", "mask_rcnn-scratch", "mask_rcnn-derived"}
    full_width = {"classifier": 41_664, "mask_rcnn-scratch": 42_688}  # the body's channels (+ FPN's for a detector)
    assert spectra.loc[list(full_width), "channels_total"].to_dict() == full_width


@pytest.mark.slow
def test_derived_widths_of_an_imported_model_measure_as_recorded(published_smoke):
    """The derived spec of the imported full-width scratch model: the retrained model's measured params and MACs
    (its evaluation) are the derivation record's (at the smoke's 64 px; benchmarks/published.py checks 800 px)."""
    record = yaml.safe_load((published_smoke / "widths" / "mask_rcnn-derived.yaml").read_text())["derivation"]
    assert record["source"]["run"] == "mask_rcnn-scratch" and record["source"]["checkpoint"].endswith(
        "import/mask_rcnn-scratch.pt"
    )
    assert record["body"]["original"]["params"] == 23_508_032  # ResNet-50 with GN affine terms, no fc
    measured = json.loads((published_smoke / "eval" / "mask_rcnn-derived.json").read_text())["complexity"]
    assert measured["input_size"] == record["input_size"] == [64, 64]
    assert measured["body_params"] == record["body"]["derived"]["params"]
    assert measured["body_macs"] == record["body"]["derived"]["macs"]
    assert measured["detector_params"] == record["detector"]["derived"]["params"]
    # (a detector's MACs also count its RoI heads, which run once per proposal: they depend on the weights)
