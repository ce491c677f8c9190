"""Widths spec: the output width of every conv of a bottleneck ResNet, as a readable YAML/JSON file.

Residual additions tie widths: within a stage every block's conv3 and the downsample conv share the
stage's ``out`` width, so a stage is ``out`` plus ``[conv1, conv2]`` widths per block.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from eigpipe.errors import ConfigError
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

    def to_dict(self) -> dict:
        return {
            "stem": self.stem,
            "stages": [{"out": s.out, "blocks": [list(b) for b in s.blocks]} for s in self.stages],
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = "widths") -> WidthSpec:
        def positive(value: object, where: str) -> int:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{source}: {where}: width must be a positive integer, got {value!r}")
            return value

        if not isinstance(data, dict) or "stem" not in data or "stages" not in data:
            raise ConfigError(f"{source}: a widths spec needs the keys 'stem' and 'stages'")
        stages = []
        for i, stage in enumerate(data["stages"]):
            where = f"stages.{i}"
            if not isinstance(stage, dict) or "out" not in stage or "blocks" not in stage:
                raise ConfigError(f"{source}: {where}: a stage needs the keys 'out' and 'blocks'")
            blocks = []
            for j, block in enumerate(stage["blocks"]):
                if not isinstance(block, list | tuple) or len(block) != 2:
                    raise ConfigError(f"{source}: {where}.blocks.{j}: give [conv1, conv2] widths")
                blocks.append(tuple(positive(w, f"{where}.blocks.{j}.{k}") for k, w in enumerate(block)))
            if not blocks:
                raise ConfigError(f"{source}: {where}.blocks: a stage needs at least one block")
            stages.append(Stage(out=positive(stage["out"], f"{where}.out"), blocks=tuple(blocks)))
        if len(stages) != 4:
            raise ConfigError(f"{source}: stages: a ResNet with FPN needs 4 stages, got {len(stages)}")
        return cls(stem=positive(data["stem"], "stem"), stages=tuple(stages))

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
    def load(cls, path: str | Path) -> WidthSpec:
        from eigpipe.config import read_yaml

        return cls.from_dict(read_yaml(path, "widths spec"), source=str(path))


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
        spec = WidthSpec.load(model_cfg["widths"])
        if spec.depths != list(model_cfg["depths"]):
            raise ConfigError(
                f"{model_cfg['widths']}: blocks per stage {spec.depths} differ from model.depths "
                f"{list(model_cfg['depths'])}"
            )
        return spec
    return standard(model_cfg["depths"], model_cfg["width_multiplier"])
