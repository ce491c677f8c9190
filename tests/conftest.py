"""Shared test fixtures: complete (schema-validated) config sections, the tiny models the tests build, small data
and checkpoints on disk, and one run of the whole smoke DAG per session. Plain helpers are in tests/helpers.py."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from eigpipe import codehash
from tests.helpers import SMALL_MODEL, complete_section
from tests.workflow_helpers import SMOKE, failure, make_workdir, snakemake

TINY_MODEL = {
    "width_multiplier": 0.0625,
    "norm": "gn",
    "gn_groups": 4,
    "fpn_channels": 16,
    "min_size": 64,
    "max_size": 64,
    "anchor_sizes": [4, 8, 16, 32, 64],
    "box_head": {"type": "mlp", "representation_size": 32},
    "mask_head_layers": [16, 16],
    "rpn_pre_nms_top_n_train": 100,
    "rpn_post_nms_top_n_train": 50,
    "rpn_pre_nms_top_n_test": 50,
    "rpn_post_nms_top_n_test": 30,
    "box_batch_size_per_image": 16,
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `cuda` are skipped where no CUDA device is available."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def complete() -> Callable[..., dict]:
    """complete(section, partial) -> the validated section."""
    return complete_section


@pytest.fixture(scope="session")
def tiny_model() -> dict:
    """A 1/16-width ResNet-50 FPN detector on 64 px images: the model section most tests build."""
    return complete_section("model", TINY_MODEL)


@pytest.fixture(scope="session")
def stage_cfg() -> Callable[..., dict]:
    """stage_cfg(seed=0, section=partial, ...) -> the validated sections a stage function takes."""

    def build(seed: int = 0, **sections: dict) -> dict:
        return {"seed": seed, **{name: complete_section(name, partial) for name, partial in sections.items()}}

    return build


@pytest.fixture(scope="session")
def frozen_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the package, first on PYTHONPATH for the slow runs: the jobs run it and the code
    hashes read it, so edits others make to the working tree meanwhile cannot trigger reruns."""
    src = tmp_path_factory.mktemp("src")
    shutil.copytree(codehash.PACKAGE_ROOT, src / "eigpipe", ignore=shutil.ignore_patterns("__pycache__"))
    return src


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory, frozen_src: Path) -> Path:
    """The whole smoke DAG, once per session, in a working directory of its own."""
    root = make_workdir(tmp_path_factory.mktemp("smoke"))
    start = time.monotonic()
    proc = snakemake(root, "--cores", "2", "--configfile", SMOKE, extra_env={"PYTHONPATH": str(frozen_src)})
    print(f"\nsmoke DAG: {time.monotonic() - start:.1f} s wall")
    assert proc.returncode == 0, failure(proc, root)
    return root


SMALL_SPLIT = {
    "image_size": 64,
    "train_images": 6,
    "val_images": 4,
    "classification": {"image_size": 32, "train_per_class": 1, "val_per_class": 1},
}


@pytest.fixture(scope="session")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The detection folder of a small synthetic dataset (4 val images of 64 px)."""
    from eigpipe.data import synthetic

    root = tmp_path_factory.mktemp("synthetic") / "data"
    synthetic.generate({"data": {"source": "synthetic", "synthetic": SMALL_SPLIT}, "seed": 0}, out=root)
    return root / "detection"


@pytest.fixture(scope="session")
def on_disk(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A small synthetic val split and two saved checkpoints (detector and classifier)."""
    from eigpipe.data import synthetic
    from eigpipe.models import Classifier, build_body, build_detector, save_checkpoint

    root = tmp_path_factory.mktemp("on_disk")
    synth = {"image_size": 64, "train_images": 1, "val_images": 5}
    synth["classification"] = {"image_size": 16, "train_per_class": 1, "val_per_class": 1}
    synthetic.generate({"data": {"source": "synthetic", "synthetic": synth}, "seed": 0}, out=root / "data")
    widths = {"stem": 8, "stages": [{"out": w * 4, "blocks": [[w, w]]} for w in (8, 16, 32, 64)]}
    base = {"model_config": SMALL_MODEL, "widths": widths, "num_classes": 4, "provenance": {}, "iteration": 30}
    torch.manual_seed(0)
    models = {
        "faster_rcnn-scratch": (build_detector("faster_rcnn", SMALL_MODEL, 4), "detection", "faster_rcnn"),
        "classifier": (Classifier(build_body(SMALL_MODEL), 4), "classification", "classifier"),
    }
    checkpoints = {}
    for run, (model, task, name) in models.items():
        checkpoints[run] = root / run / "final.pt"
        save_checkpoint(
            checkpoints[run], model, {**base, "task": task, "model_name": name, "run": run, "init": "scratch"}
        )
    return {
        "root": root,
        "annotations": root / "data/detection/instances_val.json",
        "images": root / "data/detection/val",
        "checkpoints": checkpoints,
    }


@pytest.fixture
def study(tmp_path: Path, tiny_model: dict) -> Callable[..., Path]:
    """study(steps, snapshots) -> a whole study file around the tiny model."""

    def make(steps: int = 8, snapshots: tuple[int, ...] = (0, 4)) -> Path:
        schedule = {
            "steps": steps,
            "batch_size": 4,
            "lr": 0.02,
            "warmup_steps": 2,
            "snapshots": list(snapshots),
            "checkpoint_every": 3,
            "log_every": 2,
        }
        config = {
            "study": "t",
            "seed": 3,
            "runtime": {"threads": 2},
            "data": {"source": "synthetic"},
            "model": tiny_model,
            "pretrain": {"source": "synthetic", "schedule": {**schedule, "batch_size": 8, "lr": 0.05}},
            "train": {"models": ["faster_rcnn"], "inits": ["scratch"], "schedule": schedule},
        }
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    return make


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ImageFolder root (train/ and val/) of two classes of 32 px noise images, dark and light."""
    root = tmp_path_factory.mktemp("classes")
    rng = np.random.default_rng(0)
    for split, count in (("train", 10), ("val", 3)):
        for label, level in (("dark", 60), ("light", 190)):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(rng.normal(level, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root
