"""Shared test fixtures: complete (schema-validated) config sections, the tiny models the tests build, and one
run of the whole smoke DAG per session."""

from __future__ import annotations

import copy
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from eigpipe import codehash, config
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


def _complete(section: str, partial: dict | None = None) -> dict:
    """A config section with the schema's defaults filled in (what stages receive)."""
    sub = config.schema()["properties"][section]
    return config.validate(copy.deepcopy(partial or {}), f"test {section}", subschema=sub)


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
    return _complete


@pytest.fixture(scope="session")
def tiny_model() -> dict:
    """A 1/16-width ResNet-50 FPN detector on 64 px images: the model section most tests build."""
    return _complete("model", TINY_MODEL)


@pytest.fixture(scope="session")
def stage_cfg() -> Callable[..., dict]:
    """stage_cfg(seed=0, section=partial, ...) -> the validated sections a stage function takes."""

    def build(seed: int = 0, **sections: dict) -> dict:
        return {"seed": seed, **{name: _complete(name, partial) for name, partial in sections.items()}}

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
