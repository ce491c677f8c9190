"""Shared test fixtures: complete (schema-validated) config sections and the tiny models the tests build."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest

from eigpipe import config

TINY_MODEL = {
    "width_multiplier": 0.0625, "norm": "gn", "gn_groups": 4, "fpn_channels": 16, "min_size": 64, "max_size": 64,
    "anchor_sizes": [4, 8, 16, 32, 64], "box_head": {"type": "mlp", "representation_size": 32},
    "mask_head_layers": [16, 16], "rpn_pre_nms_top_n_train": 100, "rpn_post_nms_top_n_train": 50,
    "rpn_pre_nms_top_n_test": 50, "rpn_post_nms_top_n_test": 30, "box_batch_size_per_image": 16,
}


def _complete(section: str, partial: dict | None = None) -> dict:
    """A config section with the schema's defaults filled in (what stages receive)."""
    sub = config.schema()["properties"][section]
    return config.validate(copy.deepcopy(partial or {}), f"test {section}", subschema=sub)


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
