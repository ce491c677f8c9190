"""Failure classes end in one line and leave nothing behind: unwritable outputs, a full disk, temp litter of
killed jobs, multi-output stages killed half-way, and widths specs of another architecture."""

from __future__ import annotations

import errno
import json
import os
import platform
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from eigpipe import cli, provenance
from eigpipe.errors import ConfigError, EigpipeError
from eigpipe.models import from_model_config, standard
from eigpipe.spectral import spectrum, store
from tests.helpers import one_line_error

SPECTRUM_CFG = json.dumps({"spectrum": {}})
SMOKE = Path(__file__).resolve().parents[1] / "config" / "smoke.yaml"


@pytest.fixture
def covariance_store(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 9))
    layers = {"body.conv1": {"second_moment": a @ a.T / 9, "mean": a.mean(axis=1)}}
    root = {"run": "faster_rcnn-scratch", "iteration": 0, "init": "scratch", "task": "detection", "n_images": 3}
    return store.write_store(tmp_path / "cov.zarr", store.COVARIANCE_KIND, layers, root, {})


def _blocked(tmp_path: Path) -> Path:
    """An output folder that cannot be created: a file stands where it would be (root ignores chmod)."""
    (tmp_path / "file").write_text("x")
    return tmp_path / "file" / "out"


def _checkpoint_stage(stage: str, out_name: str):  # noqa: ANN202
    """Arguments of a stage that reads a checkpoint and a split (their inputs are never reached)."""
    return lambda store_, out: [
        stage,
        "--config-json",
        "{}",
        "--checkpoint",
        str(store_),
        "--data",
        str(store_),
        "--image-dir",
        str(store_),
        "--out",
        str(out / out_name),
    ]


@pytest.mark.parametrize(
    "args",
    [
        lambda store_, out: ["spectrum", "--config-json", SPECTRUM_CFG, str(store_), "--out", str(out / "t.parquet")],
        lambda store_, out: ["dimensions", "--spectra", str(store_), "--out", str(out / "d.parquet")],
        lambda store_, out: [
            "synth-data",
            "--config-json",
            json.dumps({"data": {"source": "synthetic"}}),
            "--out",
            str(out / "data"),
        ],
        lambda store_, out: [
            "report",
            "--config-json",
            json.dumps({"report": {}}),
            "--dimensions",
            str(store_),
            "--out-dir",
            str(out / "report"),
        ],
        _checkpoint_stage("covariance", "c.zarr"),
        _checkpoint_stage("evaluate", "e.json"),
        lambda store_, out: [
            "train",
            "--config",
            str(SMOKE),
            "--data",
            str(store_),
            "--image-dir",
            str(store_),
            "--out",
            str(out / "run"),
        ],
        lambda store_, out: [
            "widths",
            "--config-json",
            "{}",
            "--dimensions",
            str(store_),
            "--checkpoint",
            str(store_),
            "--out",
            str(out / "w.yaml"),
        ],
    ],
)
def test_unwritable_output_is_one_line_naming_the_path(tmp_path, covariance_store, capsys, args):
    blocked = _blocked(tmp_path)
    code = cli.main(args(covariance_store, blocked))
    assert code == 1
    one_line_error(capsys, str(tmp_path / "file"))
    assert not blocked.exists()


def test_a_full_disk_is_one_line_with_the_os_reason(tmp_path, covariance_store, capsys, monkeypatch):
    def full(source: object, target: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))

    monkeypatch.setattr(provenance.os, "replace", full)
    out = tmp_path / "t.parquet"
    assert cli.main(["spectrum", "--config-json", SPECTRUM_CFG, str(covariance_store), "--out", str(out)]) == 1
    one_line_error(capsys, "No space left on device")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp siblings removed


@pytest.mark.parametrize(
    "error", [KeyboardInterrupt(), OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))], ids=["interrupt", "disk-full"]
)
def test_a_failed_publication_leaves_no_folder_it_made(tmp_path, error):
    (tmp_path / "kept").mkdir()  # existed before: never removed
    final = tmp_path / "kept" / "new" / "deeper" / "out.json"
    with pytest.raises(type(error)), provenance.publish(final) as tmp:
        tmp.write_text("half")
        raise error
    assert list(tmp_path.iterdir()) == [tmp_path / "kept"] and not any((tmp_path / "kept").iterdir())


def test_a_folder_made_for_a_publication_is_kept_when_another_process_filled_it(tmp_path):
    final = tmp_path / "new" / "out.json"
    with pytest.raises(KeyboardInterrupt), provenance.publish(final):
        (tmp_path / "new" / "other.json").write_text("another job's output")
        raise KeyboardInterrupt
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["other.json"]


def test_a_stage_that_fails_leaves_no_empty_output_folders(tmp_path, covariance_store, capsys, monkeypatch):
    def full(source: object, target: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))

    monkeypatch.setattr(provenance.os, "replace", full)
    out = tmp_path / "results" / "spectra" / "t.parquet"
    assert cli.main(["spectrum", "--config-json", SPECTRUM_CFG, str(covariance_store), "--out", str(out)]) == 1
    one_line_error(capsys, "No space left on device")
    assert not (tmp_path / "results").exists()


SIGNALLED_STAGE = """
import os, sys, threading, time
from eigpipe import cli

rename = os.replace

def stalled(source, target):  # zarr renames in its own thread; the stage's first publication stalls
    if threading.current_thread() is not threading.main_thread():
        return rename(source, target)
    print("ready", flush=True)  # the output is written to its temp sibling, not yet renamed
    time.sleep(60)

os.replace = stalled
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigterm_is_one_line_exit_143_and_leaves_no_temp_sibling(tmp_path, covariance_store):
    """SIGTERM is how Snakemake and SLURM cancel a job: the publication cleans up as on Ctrl-C."""
    out = tmp_path / "new" / "t.parquet"
    argv = ["spectrum", "--config-json", SPECTRUM_CFG, str(covariance_store), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = subprocess.Popen(
        [sys.executable, "-c", SIGNALLED_STAGE, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert child.stdout.readline() == "ready\n"
    assert [p for p in (tmp_path / "new").iterdir() if provenance.is_temp(p.name)]
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 143 and err == "eigpipe spectrum: terminated\n", err
    assert not (tmp_path / "new").exists()  # the temp sibling and the folder made for it are gone


def test_the_sigterm_handler_is_restored_after_a_stage(tmp_path, covariance_store):
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "t.parquet"
    assert cli.main(["spectrum", "--config-json", SPECTRUM_CFG, str(covariance_store), "--out", str(out)]) == 0
    assert signal.getsignal(signal.SIGTERM) is before


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_stale_temp_siblings_of_killed_processes_are_removed_live_ones_kept(tmp_path, kind):
    final = tmp_path / "final.pt"
    host = platform.node()
    stale = tmp_path / f".final.pt.tmp-{host}-{_dead_pid()}-0badf00d"
    live = tmp_path / f".final.pt.tmp-{host}-{os.getpid()}-c0ffee00"
    other_host = tmp_path / f".final.pt.tmp-elsewhere-{_dead_pid()}-00000000"
    users = tmp_path / f".final.pt.tmp-{host}-{_dead_pid()}-notes"  # not the form eigpipe writes
    for path in (stale, live, other_host, users):
        if kind == "dir":
            path.mkdir()
            (path / "chunk").write_text("x")
        else:
            path.write_text("x")
    provenance.write_json(final, {"a": 1})
    assert final.exists() and not stale.exists()
    assert live.exists() and other_host.exists()  # a live process's, and one of another host (shared disks)
    assert users.exists()


def test_spectrum_killed_between_its_outputs_never_leaves_a_complete_half(
    tmp_path, covariance_store, monkeypatch, complete
):
    out = tmp_path / "spectra" / "0.parquet"

    def killed(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(spectrum, "write_table", killed)
    with pytest.raises(KeyboardInterrupt):
        spectrum.decompose(
            {"spectrum": complete("spectrum")},
            covariance_store,
            out,
        )
    assert not out.exists()
    with pytest.raises(EigpipeError, match="spectrum table .* is missing: the spectrum stage did not finish"):
        spectrum.read_eigenvalues(spectrum.eigenvalue_path(out))
    monkeypatch.undo()
    assert cli.main(["spectrum", "--config-json", SPECTRUM_CFG, str(covariance_store), "--out", str(out)]) == 0
    spectrum.read_eigenvalues(spectrum.eigenvalue_path(out))


@pytest.mark.parametrize("depths", [[2, 4, 6, 3], [3, 4, 6, 2], [1, 1, 1, 1]])
def test_widths_spec_of_other_depths_than_the_model_is_refused(tmp_path, complete, depths):
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump(standard(depths, 0.125).to_dict()))
    with pytest.raises(ConfigError, match=re.escape(f"w.yaml: blocks per stage {depths} differ from model.depths")):
        from_model_config(complete("model", {"widths": str(path)}))


@pytest.mark.parametrize("target", ["eigpipe.spectral.spectrum.eigenvalues", "eigpipe.spectral.spectrum.record"])
def test_an_os_error_that_names_no_file_names_the_output(tmp_path, covariance_store, capsys, monkeypatch, target):
    """An OS error without a file name raised outside a publication (say, a network file system failing while the
    stage works): the line names the stage's output, never just "I/O"."""

    def failing(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(target, failing)
    out = tmp_path / "out.parquet"
    assert cli.main(["spectrum", "--config-json", SPECTRUM_CFG, str(covariance_store), "--out", str(out)]) == 1
    one_line_error(capsys, f"{out}: {os.strerror(errno.EIO)}")


def test_a_temp_name_with_a_pid_no_process_can_have_is_litter_not_a_traceback(tmp_path):
    litter = tmp_path / f".t.csv{provenance.TEMP_MARK}{platform.node()}-{'9' * 20}-deadbeef"
    litter.write_text("left by a killed publication")
    provenance.write_json(tmp_path / "t.csv", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv"]


def test_a_path_with_a_line_break_is_still_one_line(tmp_path, capsys):
    missing = tmp_path / "no\nsuch.zarr"
    assert cli.main(["spectrum", "--config-json", SPECTRUM_CFG, str(missing), "--out", str(tmp_path / "t.csv")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no\\nsuch.zarr" in err, err
