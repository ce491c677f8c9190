"""The training loop: schedule, deterministic batches, resume == uninterrupted, snapshots, errors, DDP."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from eigpipe import cli, runtime
from eigpipe.models import WidthSpec, load_checkpoint, standard
from eigpipe.train import loop
from eigpipe.train.batches import batch_keys
from eigpipe.train.schedule import lr_factor
from tests.helpers import crash_at, metrics, states_equal, train_classifier


def test_lr_schedule_warmup_step_and_cosine(complete):
    def schedule(**partial):
        return complete("pretrain", {"source": "synthetic", "schedule": {"batch_size": 1, "lr": 1, **partial}})[
            "schedule"
        ]

    step = lr_factor(schedule(steps=100, warmup_steps=10, warmup_factor=0.1, lr_steps=[0.5, 80], gamma=0.1))
    assert step(0) == pytest.approx(0.1) and step(5) == pytest.approx(0.55) and step(10) == 1.0
    assert step(49) == 1.0 and step(50) == pytest.approx(0.1) and step(80) == pytest.approx(0.01)
    cosine = lr_factor(schedule(steps=100, decay="cosine"))
    assert cosine(0) == 1.0 and cosine(50) == pytest.approx(0.5) and cosine(100) == pytest.approx(0.0)


def test_batches_are_a_function_of_seed_and_iteration():
    first = [batch_keys(i, 4, 10, seed=1) for i in range(6)]
    assert first == [batch_keys(i, 4, 10, seed=1) for i in range(6)]
    assert first != [batch_keys(i, 4, 10, seed=2) for i in range(6)]
    epoch0 = [key[0] for batch in first for key in batch][:10]
    assert sorted(epoch0) == list(range(10))


def test_classifier_resume_equals_uninterrupted(tmp_path, image_folder, monkeypatch, study):
    config = study()
    assert train_classifier(config, image_folder, tmp_path / "whole") == 0
    crash_at(monkeypatch, "_classification_loss", 7)
    assert train_classifier(config, image_folder, tmp_path / "killed") == 130
    assert not (tmp_path / "killed" / "final.pt").exists()
    shutil.rmtree(tmp_path / "killed" / "snapshots")  # what Snakemake does to an incomplete job's outputs
    monkeypatch.undo()
    assert train_classifier(config, image_folder, tmp_path / "killed") == 0
    for name in ("final.pt", "snapshots/0.pt", "snapshots/4.pt"):
        assert states_equal(tmp_path / "whole" / name, tmp_path / "killed" / name), name
    assert metrics(tmp_path / "whole" / "metrics.jsonl") == metrics(tmp_path / "killed" / "metrics.jsonl")
    meta = load_checkpoint(tmp_path / "whole" / "final.pt")[1]
    assert meta["iteration"] == 8 and "val_accuracy" in meta and meta["provenance"]["seed"] == 3
    assert meta["run"] == "classifier" and meta["task"] == "classification"


@pytest.fixture(scope="module")
def detection_split(tmp_path_factory):
    from eigpipe.data import synthetic

    root = tmp_path_factory.mktemp("detection") / "data"
    small = {"image_size": 64, "train_images": 6, "val_images": 1, "max_objects": 3}
    small["classification"] = {"image_size": 16, "train_per_class": 1, "val_per_class": 1}
    synthetic.generate({"data": {"source": "synthetic", "synthetic": small}, "seed": 0}, out=root)
    return root / "detection"


def test_detector_resume_equals_uninterrupted(tmp_path, detection_split, monkeypatch, study):
    """Detector training draws from torch's RNG (the RPN and box samplers): a resume must restore it. The kill
    lands after metrics lines newer than the saved state (state at 2, lines up to 3): the rerun drops them."""
    config = yaml.safe_load(study(steps=5, snapshots=(0, 2)).read_text())
    config["train"]["schedule"].update(batch_size=1, warmup_steps=0, checkpoint_every=2, log_every=1)
    config["train"]["steps_by_init"] = {}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    args = ["train", "--config", str(tmp_path / "c.yaml"), "--data", str(detection_split / "instances_train.json")]
    args += ["--image-dir", str(detection_split / "train")]
    assert cli.main([*args, "--out", str(tmp_path / "whole")]) == 0
    crash_at(monkeypatch, "_detection_loss", 3)
    assert cli.main([*args, "--out", str(tmp_path / "killed")]) == 130
    logged = metrics(tmp_path / "killed" / "resume" / "metrics.jsonl")
    assert [line["iteration"] for line in logged] == [1, 2, 3]  # 3 is newer than the saved state
    shutil.rmtree(tmp_path / "killed" / "snapshots")
    monkeypatch.undo()
    assert cli.main([*args, "--out", str(tmp_path / "killed")]) == 0
    for name in ("final.pt", "snapshots/0.pt", "snapshots/2.pt"):
        assert states_equal(tmp_path / "whole" / name, tmp_path / "killed" / name), name
    assert metrics(tmp_path / "whole" / "metrics.jsonl") == metrics(tmp_path / "killed" / "metrics.jsonl")


def test_resume_state_of_another_config_is_not_used(tmp_path, image_folder, monkeypatch, capsys, study):
    crash_at(monkeypatch, "_classification_loss", 7)
    assert train_classifier(study(), image_folder, tmp_path / "run") == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert train_classifier(study(steps=9), image_folder, tmp_path / "run") == 0
    assert "resuming" not in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "run" / "final.pt")[1]["iteration"] == 9


def _rewrite_widths(config, data):
    study = yaml.safe_load(config.read_text())
    spec = standard([3, 4, 6, 3], study["model"]["width_multiplier"])
    path = config.parent / "widths.yaml"
    spec.save(path)
    study["model"]["widths"] = str(path)
    config.write_text(yaml.safe_dump(study))
    return lambda: WidthSpec.from_dict({**spec.to_dict(), "stem": spec.stem * 2}).save(path)


def _rewrite_data(config, data):
    return lambda: shutil.copy(data / "train" / "dark" / "0.png", data / "train" / "dark" / "extra.png")


@pytest.mark.parametrize("setup", [_rewrite_widths, _rewrite_data], ids=["widths-file", "dataset"])
def test_resume_state_of_other_input_content_is_not_used(tmp_path, image_folder, monkeypatch, capsys, study, setup):
    """An input rewritten in place between a kill and the rerun (a re-derived widths file at the same path, a
    regenerated dataset) starts the run anew instead of resuming a state of other shapes or other data."""
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    config = study()
    rewrite = setup(config, data)
    crash_at(monkeypatch, "_classification_loss", 7)
    assert train_classifier(config, data, tmp_path / "run") == 130
    monkeypatch.undo()
    rewrite()
    capsys.readouterr()
    assert train_classifier(config, data, tmp_path / "run") == 0
    assert "resuming" not in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "run" / "final.pt")[1]["iteration"] == 8


def test_an_unreadable_image_of_the_classifier_is_named(tmp_path, image_folder, capsys, study):
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    bad = data / "train" / "light" / "3.png"
    bad.write_bytes(bad.read_bytes()[:100])  # cut short
    assert train_classifier(study(), data, tmp_path / "run") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert str(bad) in err[-1] and "cannot be read as an image" in err[-1] and "Traceback" not in "".join(err)
    assert not (tmp_path / "run").exists()  # snapshot 0, published before the image was read, is not left


def test_a_damaged_resume_state_trains_afresh_and_an_unrecognisable_one_is_refused(
    tmp_path, image_folder, monkeypatch, capsys, study
):
    """The resume state is eigpipe's own: a damaged log (a copy cut short, a full disk) is dropped with a warning;
    a state file that is no torch archive at all makes the folder no run folder (refused, kept)."""
    crash_at(monkeypatch, "_classification_loss", 7)
    assert train_classifier(study(), image_folder, tmp_path / "run") == 130
    monkeypatch.undo()
    resume = tmp_path / "run" / "resume"
    shutil.copytree(tmp_path / "run", tmp_path / "cut")
    with (resume / "metrics.jsonl").open("a") as log:
        log.write("garbage\n")
    capsys.readouterr()
    assert train_classifier(study(), image_folder, tmp_path / "run") == 0
    err = capsys.readouterr().err
    assert "damaged resume state" in err and "resuming" not in err
    assert load_checkpoint(tmp_path / "run" / "final.pt")[1]["iteration"] == 8
    state = tmp_path / "cut" / "resume" / "state.pt"
    state.write_text("my notes\n")
    assert train_classifier(study(), image_folder, tmp_path / "cut") == 1
    assert "exists and is not an eigpipe training run folder" in capsys.readouterr().err
    assert state.read_text() == "my notes\n"


def test_non_finite_loss_stops_with_the_iteration(tmp_path, image_folder, monkeypatch, capsys, study):
    original = loop._classification_loss
    calls = {"n": 0}

    def exploding(*args):
        loss, parts = original(*args)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 4 else loss), parts

    monkeypatch.setattr(loop, "_classification_loss", exploding)
    assert train_classifier(study(), image_folder, tmp_path / "run") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "non-finite loss at iteration 3" in err[-1] and "Traceback" not in "".join(err)
    assert not (tmp_path / "run" / "final.pt").exists()


def test_init_rejects_bad_values(tmp_path):
    with pytest.raises(Exception, match="expected 'scratch' or 'pretrained"):
        loop.parse_init("imagenet")
    with pytest.raises(Exception, match="not found"):
        loop.parse_init(f"pretrained:{tmp_path / 'none.pt'}")


def test_slurm_variables_alone_do_not_mean_distributed(monkeypatch, complete):
    for name in runtime.TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert not runtime.launched_by_torchrun()
    assert runtime.setup(complete("runtime", {"threads": 1, "device": "cpu"}), seed=0).world_size == 1


def test_cuda_asked_without_a_gpu_is_a_clear_error(monkeypatch, complete):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(Exception, match="runtime.device: cuda"):
        runtime.setup(complete("runtime", {"device": "cuda"}), seed=0)


@pytest.mark.slow
def test_torchrun_ddp_on_cpu(tmp_path, image_folder, study):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        torchrun,
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "eigpipe.cli",
        "pretrain",
        "--config",
        str(study(steps=4, snapshots=())),
        "--data",
        str(image_folder),
        "--out",
        str(tmp_path / "ddp"),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert load_checkpoint(tmp_path / "ddp" / "final.pt")[1]["iteration"] == 4
