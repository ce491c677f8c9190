"""Mixed-precision training (train.amp / pretrain.schedule.amp): autocast, the GradScaler, and exact resume."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from eigpipe.train import loop
from tests.helpers import crash_at, metrics, states_equal, train_classifier

INIT_SCALE = 2.0**14


@pytest.fixture
def amp_study(study):
    """amp_study(amp) -> the test study file with pretrain.schedule.amp set."""

    def make(amp: str) -> Path:
        path = study(steps=5, snapshots=(0, 4))
        config = yaml.safe_load(path.read_text())
        config["pretrain"]["schedule"]["amp"] = amp
        path.write_text(yaml.safe_dump(config))
        return path

    return make


def watch(monkeypatch: pytest.MonkeyPatch, seen: dict) -> None:
    """Record each run's scaler and whether the loss ran under autocast; fp16 gets a fast-growing scaler so
    that its state changes every two steps (and a resume that lost it would diverge)."""
    original_mp, original_loss = loop.mixed_precision, loop._classification_loss

    def mixed_precision(amp: str, device: torch.device) -> tuple:
        autocast, scaler = original_mp(amp, device)
        if amp == "fp16":
            scaler = torch.amp.GradScaler(device.type, init_scale=INIT_SCALE, growth_interval=2)
        seen.setdefault("scalers", []).append(scaler)
        return autocast, scaler

    def loss(*args: object) -> tuple:
        seen.setdefault("autocast", set()).add(
            torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        )
        return original_loss(*args)

    monkeypatch.setattr(loop, "mixed_precision", mixed_precision)
    monkeypatch.setattr(loop, "_classification_loss", loss)


def test_amp_is_off_by_default_and_then_a_pass_through(complete) -> None:
    schedule = complete("pretrain", {"source": "synthetic", "schedule": {"steps": 1, "batch_size": 1, "lr": 1}})
    assert schedule["schedule"]["amp"] == "off"
    autocast, scaler = loop.mixed_precision("off", torch.device("cpu"))
    loss = torch.tensor(2.0)
    assert not scaler.is_enabled() and scaler.scale(loss) is loss and scaler.state_dict() == {}
    with autocast():
        assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_resume_with_amp_equals_uninterrupted(tmp_path, image_folder, monkeypatch, amp_study, amp):
    config, seen = amp_study(amp), {}
    watch(monkeypatch, seen)
    assert train_classifier(config, image_folder, tmp_path / "whole") == 0
    whole_scaler = seen["scalers"][-1].state_dict()
    assert seen["autocast"] == {loop.AMP_DTYPES[amp]}
    crash_at(monkeypatch, "_classification_loss", 4)
    assert train_classifier(config, image_folder, tmp_path / "killed") == 130
    saved = torch.load(tmp_path / "killed" / "resume" / "state.pt", weights_only=False)
    assert saved["iteration"] == 3
    if amp == "fp16":
        assert saved["scaler"]["scale"] != INIT_SCALE and saved["scaler"] != whole_scaler  # it changed, and goes on
    else:
        assert saved["scaler"] == {}  # bf16 needs no loss scaling
    shutil.rmtree(tmp_path / "killed" / "snapshots")
    monkeypatch.undo()
    watch(monkeypatch, seen)
    assert train_classifier(config, image_folder, tmp_path / "killed") == 0
    assert seen["scalers"][-1].state_dict() == whole_scaler
    for name in ("final.pt", "snapshots/0.pt", "snapshots/4.pt"):
        assert states_equal(tmp_path / "whole" / name, tmp_path / "killed" / name), name
    assert metrics(tmp_path / "whole" / "metrics.jsonl") == metrics(tmp_path / "killed" / "metrics.jsonl")
