"""Helpers several test modules use (plain functions and constants; the fixtures are in conftest.py), so that no
test module imports another."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from eigpipe import cli, config
from eigpipe.models import build_detector, load_checkpoint, save_checkpoint, standard
from eigpipe.train import loop

SMALL_MODEL = {  # completed by the schema below (complete_section), as every stage receives it
    "depths": [1, 1, 1, 1],
    "width_multiplier": 0.125,
    "norm": "gn",
    "gn_groups": 4,
    "fpn_channels": 16,
    "box_head": {"type": "mlp", "representation_size": 32},
    "anchor_sizes": [8, 16, 32, 64, 128],
    "min_size": 64,
    "max_size": 64,
}


def complete_section(section: str, partial: dict | None = None) -> dict:
    """A config section with the schema's defaults filled in (what stages receive)."""
    sub = config.schema()["properties"][section]
    return config.validate(copy.deepcopy(partial or {}), f"test {section}", subschema=sub)


SMALL_MODEL = complete_section("model", SMALL_MODEL)


def covariance_args(on_disk: dict, run: str, cfg: str, out: Path) -> list[str]:
    """``eigpipe covariance`` arguments for a checkpoint of the ``on_disk`` fixture."""
    args = ["covariance", "--config-json", cfg, "--checkpoint", str(on_disk["checkpoints"][run])]
    return [*args, "--data", str(on_disk["annotations"]), "--image-dir", str(on_disk["images"]), "--out", str(out)]


def detector_checkpoint(tmp_path: Path, name: str, dataset, model_cfg: dict, task: str = "detection") -> Path:
    """A randomly initialised detector for ``dataset``, saved as an eigpipe checkpoint."""
    model = build_detector(name, model_cfg, dataset.num_classes)
    meta = {
        "task": task,
        "model_name": name,
        "model_config": model_cfg,
        "widths": standard(multiplier=0.0625).to_dict(),
        "num_classes": dataset.num_classes,
        "category_ids": dataset.category_ids,
        "iteration": 3,
        "run": name,
    }
    save_checkpoint(tmp_path / f"{name}.pt", model, meta)
    return tmp_path / f"{name}.pt"


def states_equal(a: Path, b: Path) -> bool:
    sa, sb = load_checkpoint(a)[0].state_dict(), load_checkpoint(b)[0].state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def metrics(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "s_per_it"} for line in path.read_text().splitlines()]


def train_classifier(config_path: Path, data: Path, out: Path) -> int:
    return cli.main(["pretrain", "--config", str(config_path), "--data", str(data), "--out", str(out)])


def crash_at(monkeypatch, name: str, iteration: int) -> dict:
    """Make the loss function raise when it is called for ``iteration`` (a stand-in for a kill)."""
    original, calls = getattr(loop, name), {"n": 0}

    def failing(*args):
        if calls["n"] == iteration:
            raise KeyboardInterrupt
        calls["n"] += 1
        return original(*args)

    monkeypatch.setattr(loop, name, failing)
    return calls


def one_line_error(capsys, *fragments: str) -> str:
    """The captured stderr: exactly one line, no traceback, holding every fragment."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err
