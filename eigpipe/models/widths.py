"""Widths spec: the output width of every conv of a bottleneck ResNet, as a readable YAML/JSON file.

Residual additions tie widths: within a stage every block's conv3 and the downsample conv share the
stage's ``out`` width, so a stage is ``out`` plus ``[conv1, conv2]`` widths per block.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from eigpipe import config
from eigpipe.provenance import publish

STANDARD_DEPTHS = (3, 4, 6, 3)


@dataclass(frozen=True)
class Stage:
    out: int
    blocks: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class WidthSpec:
    stem: int
    stages: tuple[Stage, ...] = field(default_factory=tuple)

    @property
    def depths(self) -> list[int]:
        return [len(s.blocks) for s in self.stages]

    @property
    def stage_outs(self) -> list[int]:
        return [s.out for s in self.stages]

    def each_width(self, change: Callable[[int], int]) -> WidthSpec:
        """The spec with ``change`` applied to every width (stem, block convs, stage outputs)."""
        stages = tuple(
            Stage(out=change(s.out), blocks=tuple((change(w1), change(w2)) for w1, w2 in s.blocks)) for s in self.stages
        )
        return WidthSpec(stem=change(self.stem), stages=stages)

    def to_dict(self) -> dict:
        return {
            "stem": self.stem,
            "stages": [{"out": s.out, "blocks": [list(b) for b in s.blocks]} for s in self.stages],
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = "widths") -> WidthSpec:
        """A spec from its mapping, checked against the schema's ``$defs/widths_spec`` (one line naming the key)."""
        config.validate(data, source, subschema=config.schema()["$defs"]["widths_spec"])
        stages = tuple(
            Stage(out=stage["out"], blocks=tuple(tuple(block) for block in stage["blocks"])) for stage in data["stages"]
        )
        return cls(stem=data["stem"], stages=stages)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        text = (
            json.dumps(self.to_dict(), indent=1)
            if path.suffix == ".json"
            else yaml.safe_dump(self.to_dict(), default_flow_style=None, sort_keys=False)
        )
        with publish(path) as tmp:
            tmp.write_text(text)

    @classmethod
    def load(cls, path: str | Path, depths: list[int] | None = None) -> WidthSpec:
        """The spec of a widths file (with ``depths``: checked against ``model.depths``)."""
        return cls.from_dict(config.widths_spec(path, depths), source=str(path))


def width_floor(original: int, multiple: int, min_width: int, min_ratio: float) -> int:
    """The narrowest width the derivation gives a conv of width ``original``: ``min_width`` and ``min_ratio`` x
    ``original``, each rounded up to ``multiple`` (widths.multiple, min_width, min_ratio)."""
    return multiple * max(math.ceil(min_width / multiple), math.ceil(min_ratio * original / multiple))


def standard(depths: list[int] | tuple[int, ...] = STANDARD_DEPTHS, multiplier: float = 1.0) -> WidthSpec:
    """ResNet-50-style widths (64, 128, 256, 512 planes, expansion 4) scaled by ``multiplier``."""

    def scale(width: int) -> int:
        return max(1, int(round(width * multiplier)))

    stages = []
    for i, depth in enumerate(depths):
        planes = 64 * 2**i
        stages.append(Stage(out=scale(planes * 4), blocks=tuple((scale(planes), scale(planes)) for _ in range(depth))))
    return WidthSpec(stem=scale(64), stages=tuple(stages))


def from_model_config(model_cfg: dict) -> WidthSpec:
    """The spec a model section asks for: its widths file, else the standard widths times the multiplier."""
    if model_cfg["widths"]:
        return WidthSpec.load(model_cfg["widths"], model_cfg["depths"])
    return standard(model_cfg["depths"], model_cfg["width_multiplier"])
