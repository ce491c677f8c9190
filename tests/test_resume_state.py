"""A training state is resumed only when it is sound and this run's; else the run starts afresh on a clean
folder, saying why in one line. A finished run keeps no state, so a rerun (new code, --forcerun) trains anew."""

import errno
import os
import shutil
import subprocess
import zipfile

import pytest
import torch

from eigpipe.models import load_checkpoint, save_checkpoint
from eigpipe.train import loop, state
from tests.helpers import crash_at, metrics, train_classifier


def _flip_middle_byte(path, member=None):
    """Change one byte inside the largest entry of a torch archive (a tensor's data), keeping the file's size."""
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size) if member is None else archive.getinfo(member)
    data = bytearray(path.read_bytes())
    at = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + info.file_size // 2
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def _rewrite_state(path, **changes):
    saved = torch.load(path, weights_only=False)
    saved.pop("digest")
    saved.update(changes)
    torch.save({**saved, "digest": state.content_digest(saved)}, path)


def _zero(path):
    """What a power loss can leave of a file renamed before its data reached the disk."""
    path.write_bytes(bytes(path.stat().st_size))


def _torn_last_line(run):
    with (run / "resume" / "metrics.jsonl").open("a") as log:
        log.write('{"iteration": 8, "lo')


def _record_missing(run):
    log = run / "resume" / "metrics.jsonl"
    log.write_text("".join(log.read_text().splitlines(keepends=True)[1:]))


def _record_out_of_place(run):
    log = run / "resume" / "metrics.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join([*lines[:2], '{"iteration": 7, "loss": 0.5}\n', *lines[2:]]))


DAMAGES = {  # name: (damage to the killed run's folder, what the rerun says: None = it resumes)
    "torn-last-metrics-line": (_torn_last_line, None),
    "metrics-record-missing": (_record_missing, "its metrics log does not match it"),
    "metrics-record-out-of-place": (_record_out_of_place, "its metrics log does not match it"),
    "state-cut-short": (lambda run: (run / "resume/state.pt").write_bytes(b"PK\x03\x04" + bytes(60)), "damaged"),
    "state-emptied": (lambda run: (run / "resume/state.pt").write_bytes(b""), "damaged resume state"),
    "state-zeroed": (lambda run: _zero(run / "resume/state.pt"), "damaged resume state"),
    "snapshot-copy-zeroed": (lambda run: _zero(run / "resume/snapshots/4.pt"), "snapshot 4 is damaged"),
    "state-byte-changed": (lambda run: _flip_middle_byte(run / "resume/state.pt"), "damaged resume state"),
    "snapshot-copy-deleted": (lambda run: (run / "resume/snapshots/4.pt").unlink(), "snapshot 4 is missing"),
    "snapshot-copy-damaged": (lambda run: _flip_middle_byte(run / "resume/snapshots/4.pt"), "snapshot 4 is damaged"),
    "iteration-past-the-end": (lambda run: _rewrite_state(run / "resume/state.pt", iteration=20), "outside 1..7"),
    "code-changed": (lambda run: setattr(loop, "code_hash", lambda stage: "other"), "code or library version"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_only_a_sound_state_is_resumed(tmp_path, image_folder, monkeypatch, capsys, study, damage):
    run = tmp_path / "run"
    crash_at(monkeypatch, "_classification_loss", 7)  # the state is at 6, snapshots 0 and 4 are kept
    assert train_classifier(study(), image_folder, run) == 130
    monkeypatch.undo()
    shutil.rmtree(run / "snapshots")  # what Snakemake does to an incomplete job's outputs
    change, said = DAMAGES[damage]
    monkeypatch.setattr(loop, "code_hash", loop.code_hash)  # undone after the test, as the damage may change it
    change(run)
    capsys.readouterr()
    assert train_classifier(study(), image_folder, run) == 0
    err = capsys.readouterr().err
    if said is None:
        assert "resuming" in err and "warning" not in err
    else:
        warning = next(line for line in err.splitlines() if line.startswith("warning:"))
        assert said in warning and warning.endswith("training afresh") and "resuming" not in err
    assert [line["iteration"] for line in metrics(run / "metrics.jsonl")] == [2, 4, 6, 8, 8]
    assert load_checkpoint(run / "final.pt")[1]["iteration"] == 8
    assert sorted(os.listdir(run / "snapshots")) == ["0.pt", "4.pt"]


def test_a_finished_run_keeps_no_state_and_a_rerun_clears_the_older_run(
    tmp_path, image_folder, monkeypatch, capsys, study
):
    """A rerun of a finished run trains afresh; with another schedule (or after a restart for one) no snapshot,
    model or metrics line of the older run is left beside the new run's."""
    run = tmp_path / "run"
    assert train_classifier(study(), image_folder, run) == 0
    assert not (run / "resume").exists()
    capsys.readouterr()
    assert train_classifier(study(steps=6, snapshots=(0, 2)), image_folder, run) == 0
    assert "resuming" not in capsys.readouterr().err
    assert sorted(os.listdir(run / "snapshots")) == ["0.pt", "2.pt"]
    assert [line["iteration"] for line in metrics(run / "metrics.jsonl")] == [2, 4, 6, 6]
    crash_at(monkeypatch, "_classification_loss", 7)
    assert train_classifier(study(), image_folder, run) == 130  # the state is at 6, snapshots 0 and 4 are kept
    assert not (run / "final.pt").exists() and sorted(os.listdir(run / "snapshots")) == ["0.pt", "4.pt"]
    monkeypatch.undo()
    assert train_classifier(study(snapshots=(0, 2)), image_folder, run) == 0
    assert "the resume state is of another config" in capsys.readouterr().err
    assert sorted(os.listdir(run / "snapshots")) == ["0.pt", "2.pt"]
    assert not (run / "resume").exists()


@pytest.fixture
def full_disk(tmp_path):
    """A 256 KiB file system (tmpfs; needs root, as on the CI machine): any checkpoint fills it."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    yield mount
    subprocess.run(["umount", "--lazy", str(mount)], check=True)  # torch may leave the failed file open


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_no_folders(full_disk, image_folder, capsys, study):
    with pytest.raises(OSError) as raised:
        save_checkpoint(full_disk / "m.pt", torch.nn.Linear(300, 300), {})  # 360 kB
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(full_disk / "m.pt")
    run = full_disk / "runs" / "classifier"
    capsys.readouterr()
    assert train_classifier(study(), image_folder, run) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"eigpipe pretrain: error: {run / 'snapshots' / '0.pt'}: No space left on device"]
    assert os.listdir(full_disk) == []  # neither the run folder nor the folder above it, which it made


def test_sigterm_to_the_job_with_loader_workers_is_one_line_and_leaves_nothing(tmp_path, image_folder, study):
    """scancel and Snakemake signal the whole process group, loader workers included: one line, exit 143, and a
    run stopped before its first resume state leaves no run folder."""
    import signal
    import sys
    import time
    from pathlib import Path

    import yaml

    config = yaml.safe_load(study(steps=4000).read_text())
    config["pretrain"]["schedule"].update(workers=2, checkpoint_every=4000, log_every=1)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    run = tmp_path / "new" / "run"
    argv = ["pretrain", "--config", str(tmp_path / "c.yaml"), "--data", str(image_folder), "--out", str(run)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = subprocess.Popen(
        [sys.executable, "-m", "eigpipe.cli", *argv], stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    assert child.stderr.readline().startswith("it 1/4000"), "training did not start"
    time.sleep(1)
    os.killpg(child.pid, signal.SIGTERM)
    err = child.stderr.read()
    assert child.wait(timeout=60) == 143 and err.splitlines()[-1:] == ["eigpipe pretrain: terminated"], err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert not (tmp_path / "new").exists()


def test_a_child_ending_as_sigterm_lands_reports_nothing(monkeypatch):
    """A loader worker's SIGCHLD caught (under torch's Python handler) but not yet handled when SIGTERM lands: the
    stage stops with Terminated and no "Signal 17 ignored due to race condition" is reported (a loaded machine)."""
    import signal
    import sys

    from eigpipe import cli

    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    both = {signal.SIGCHLD, signal.SIGTERM}
    torch_handler = signal.signal(signal.SIGCHLD, lambda *_: None)  # torch's DataLoader sets a Python handler
    try:
        with pytest.raises(cli.Terminated), cli._sigterm_raises():
            signal.pthread_sigmask(signal.SIG_BLOCK, both)  # both caught at once, SIGTERM handled first
            os.kill(os.getpid(), signal.SIGCHLD)
            os.kill(os.getpid(), signal.SIGTERM)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, both)
            sum(range(1000))  # Python runs the pending handlers: SIGTERM's first
        sum(range(1000))  # and the SIGCHLD left pending, if not yet
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, both)
        signal.signal(signal.SIGCHLD, torch_handler)
    assert [str(u.exc_value) for u in unraisable] == []


def test_an_image_rewritten_in_place_at_the_same_size_is_not_resumed_over(
    tmp_path, image_folder, monkeypatch, capsys, study
):
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    crash_at(monkeypatch, "_classification_loss", 7)
    assert train_classifier(study(), data, tmp_path / "run") == 130
    monkeypatch.undo()
    image = next((data / "train").rglob("*.png"))
    content = image.read_bytes()
    image.write_bytes(content[:-1] + bytes([content[-1] ^ 1]))  # same name, same size, other content
    capsys.readouterr()
    assert train_classifier(study(), data, tmp_path / "run") == 0
    assert "another config, input file" in capsys.readouterr().err
