"""The workflow on a real SLURM: a single-node cluster on loopback (tests/slurm/cluster.py) runs the smoke
DAG through the test variant of the slurm profile (tests/slurm/profile) with the same results as a local
run, and a requeued, then cancelled, training job resumes from its resume state to the same weights.

Needs root and apt-get (slurm-wlm and munge are installed when missing); skipped with the reason when
the machine has neither, except under CI=true, where that is a failure. See tests/slurm/README.md.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.slurm import cluster
from tests.workflow_helpers import REPO, SMOKE, SNAKEMAKE, env, make_workdir, write_config

PROFILE = REPO / "tests/slurm/profile"
# Hard limit of one Snakemake run through SLURM: a job-status hang must fail, not wait forever.
TIMEOUT = int(os.environ.get("EIGPIPE_SLURM_TIMEOUT", "900"))
# The SLURM run makes the covariance stores and evaluations of two base runs, one of each detector and each init,
# and the classifier's store (with all they need: data, pre-training, two detector trainings), which is what it is
# compared on. EIGPIPE_SLURM_FULL_DAG=1: the whole smoke DAG (every run, spectra, width derivation, the derived
# retrains, the report too; times in tests/slurm/README.md).
FULL_DAG = os.environ.get("EIGPIPE_SLURM_FULL_DAG", "") not in ("", "0")
COMPARED_RUNS = ("classifier", "faster_rcnn-pretrained", "mask_rcnn-scratch")
RUN = "faster_rcnn-scratch"  # the preempted training run (it needs no pre-training)
RESUMING = re.compile(r"resuming .* from iteration (\d+)")


_capture = None  # pytest's capture manager (set by the `slurm` fixture), to show progress live


def progress(message: str) -> None:
    """Printed (shown with a failure), and live on the terminal: these tests take minutes."""
    line = f"[test_slurm {time.strftime('%H:%M:%S')}] {message}"
    print(line, flush=True)
    if _capture is not None and _capture.is_capturing():
        with _capture.global_and_fixture_disabled():
            print(f"\n{line}", end="", file=sys.stderr, flush=True)


# ---- fixtures ----


@pytest.fixture(scope="module")
def slurm(tmp_path_factory, pytestconfig):
    """The loopback cluster, up for this module's tests; the daemons it started are stopped after."""
    global _capture
    _capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    if reason := cluster.missing_requirements():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true: SLURM must run on this machine, but {reason}")
        pytest.skip(reason)
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:  # a dependency, not a reason to skip
        pytest.fail("snakemake-executor-plugin-slurm is not installed (it is pinned in constraints.txt)")
    root = tmp_path_factory.mktemp("slurm")
    with cluster.exclusive():  # another session's cluster: wait for it to be stopped
        try:
            timings = cluster.up(root)
            progress(f"cluster up in {timings['up_s']} s (apt-get install {timings['install_s']} s)")
            yield root
        finally:
            cluster.down(root)


class Runs:
    """Snakemake runs in the background, each with its log; any still running at the end of the test
    (after a failure) are killed with their children."""

    def __init__(self, frozen_src: Path, logs: Path):
        self.frozen_src, self.logs, self.started = frozen_src, logs, []

    def start(self, name: str, workdir: Path, *args: str, slurm: bool) -> subprocess.Popen:
        if slurm:  # under a hard timeout (TERM, then KILL): a job-status hang fails instead of waiting forever
            argv = ["timeout", "--kill-after=20", str(TIMEOUT), SNAKEMAKE, "--workflow-profile", str(PROFILE)]
        else:  # the default profile, as the session's smoke run
            argv = [SNAKEMAKE, "--cores", "2"]
        # sbatch --export=ALL hands this environment to the jobs: `eigpipe` of this venv, the frozen package.
        environment = env(PYTHONPATH=str(self.frozen_src))
        with self.log(name).open("w") as handle:
            proc = subprocess.Popen(
                [*argv, *args], cwd=workdir, env=environment, stdout=handle, stderr=subprocess.STDOUT
            )
        proc.name = name
        self.started.append(proc)
        return proc

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def finish(self, proc: subprocess.Popen, rc: int = 0) -> str:
        """Wait for the run; its output, which must end with exit status `rc`."""
        try:
            proc.wait(timeout=TIMEOUT + 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        output = self.log(proc.name).read_text()
        assert proc.returncode == rc, f"{proc.name}: rc={proc.returncode}\n{output[-4000:]}\n{squeue()}"
        return output

    def kill_all(self) -> None:
        import psutil

        for proc in self.started:
            if proc.poll() is None:
                with contextlib.suppress(psutil.NoSuchProcess):
                    for child in psutil.Process(proc.pid).children(recursive=True):
                        with contextlib.suppress(psutil.NoSuchProcess):
                            child.kill()
                proc.kill()
                proc.wait()


@pytest.fixture
def runs(frozen_src, tmp_path):  # frozen_src: tests/conftest.py
    runs = Runs(frozen_src, tmp_path)
    yield runs
    runs.kill_all()


# ---- helpers ----


def squeue() -> str:
    return subprocess.run(["squeue", "-t", "all"], capture_output=True, text=True, timeout=20).stdout


def zarr_arrays(store: Path) -> dict[str, np.ndarray]:
    import zarr

    def walk(group, prefix=""):
        for name, member in group.members():
            if isinstance(member, zarr.Array):
                yield prefix + name, member[...]
            else:
                yield from walk(member, f"{prefix}{name}/")

    return dict(walk(zarr.open_group(store, mode="r")))


def state_iteration(path: Path) -> int | None:
    """The iteration of a resume state (published by renaming, so never half-written), None before one."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=False)["iteration"]
    except FileNotFoundError:
        return None


def resumed_from(log: Path) -> int | None:
    match = RESUMING.search(log.read_text()) if log.exists() else None
    return int(match.group(1)) if match else None


def running_job(rule: str) -> str | None:
    """The id of a running job of `rule` (the plugin's job comment is rule_<rule>_wildcards_...)."""
    out = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%i|%k"], capture_output=True, text=True, timeout=20)
    for line in out.stdout.splitlines():
        job, comment = line.split("|", 1)
        if comment.startswith(f"rule_{rule}_"):
            return job
    return None


def job_processes(job: str) -> list[str]:
    """Processes of a SLURM job still running (none may outlive a cancelled job)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if proc.environ().get("SLURM_JOB_ID") == job and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(f"{proc.pid}: {' '.join(proc.info['cmdline'] or [])[:200]}")
    return found


def release(job: str, timeout: float = 60) -> None:
    """slurmctld holds a requeued job back for about 2 minutes (reason BeginTime): start it now. The update
    only sticks once the job is PENDING (while it is COMPLETING, the requeue resets it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T|%r"], capture_output=True, text=True, timeout=20)
        state, _, reason = out.stdout.strip().partition("|")
        if state == "PENDING" and reason == "BeginTime":
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True, timeout=20)
        elif state not in ("COMPLETING", "REQUEUED", "PENDING"):
            return  # running again (or gone: what follows will tell)
        time.sleep(0.2)
    pytest.fail(f"requeued job {job} did not start again within {timeout:.0f} s\n{squeue()}")


def wait_for(what: str, ready, proc: subprocess.Popen, log: Path, timeout: float = 300):
    """Poll ready() until it returns something true (returned); fail if the run ends first."""
    deadline = time.monotonic() + timeout
    while not (value := ready()):
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{what}: not seen before the run ended\n{log.read_text()[-3000:]}\n{squeue()}")
        time.sleep(0.1)
    return value


# ---- tests ----


def test_test_profile_sizes_every_rule_and_avoids_the_status_trap(tmp_path):
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    assert profile["executor"] == "slurm" and profile["slurm-requeue"] is True
    assert profile["slurm-status-command"] == "squeue"  # no slurmdbd: sacct would hang Snakemake
    # the plugin uses squeue only while the cluster's MinJobAge is at least 3 x the first check interval
    assert 3 * profile["slurm-init-seconds-before-status-checks"] <= 300
    assert profile["default-resources"]["slurm_partition"] == "debug"
    rules = subprocess.run(
        [SNAKEMAKE, "--list-rules"], cwd=make_workdir(tmp_path), capture_output=True, text=True, timeout=120
    ).stdout.split()
    assert set(profile["set-resources"]) == set(rules) - {"all"}
    for rule, resources in profile["set-resources"].items():
        assert 0 < resources["mem_mb"] <= 2000 and 0 < resources["runtime"] <= 15, rule


@pytest.mark.slow
def test_smoke_dag_on_slurm_equals_a_local_run(slurm, smoke_run, runs, tmp_path):
    local, remote = smoke_run, make_workdir(tmp_path / "slurm")  # the session's local run of the smoke DAG

    def compared(run: str) -> bool:
        # the other base runs, the seed-1 replicates and the derived runs are more of the same: the whole DAG only
        return FULL_DAG or run in COMPARED_RUNS

    stores = sorted(
        p.relative_to(local) for p in local.glob("results/smoke/covariance/*/*.zarr") if compared(p.parent.name)
    )
    metrics = sorted(p.relative_to(local) for p in local.glob("results/smoke/eval/*.json") if compared(p.stem))
    assert len(stores) >= 5 and len(metrics) >= 2  # 2 base runs x (snapshot 0, final) and the classifier
    # every covariance store and evaluation of the compared runs, with all they need (data, pre-training, training)
    targets = [] if FULL_DAG else [str(p) for p in [*stores, *metrics]]
    began = time.monotonic()
    output = runs.finish(runs.start("slurm", remote, *targets, "--configfile", SMOKE, slurm=True))
    what = "whole smoke DAG" if FULL_DAG else f"smoke DAG up to {len(targets)} covariance stores and evaluations"
    progress(f"{what} through the slurm test profile done in {time.monotonic() - began:.0f} s")

    submitted = re.findall(r"submitted with SLURM jobid \d+", output)
    finished = re.findall(r"Finished jobid: \d+ \(Rule: \w+\)", output)
    local_rules = 1 if FULL_DAG else 0  # `all`
    # every other job ran in SLURM: the targets and what they need (data, pre-training, two trainings)
    needed = 15 if FULL_DAG else len(targets) + 3
    assert len(submitted) == len(finished) - local_rules > needed, output[-3000:]

    assert sorted(p.relative_to(remote) for p in remote.glob("results/smoke/covariance/*/*.zarr")) == stores
    for store in stores:
        expected, got = zarr_arrays(local / store), zarr_arrays(remote / store)
        assert expected and got.keys() == expected.keys(), store
        for name, array in expected.items():
            assert np.array_equal(got[name], array), f"{store}/{name}"
    assert sorted(p.relative_to(remote) for p in remote.glob("results/smoke/eval/*.json")) == metrics
    for name in metrics:
        expected, got = json.loads((local / name).read_text()), json.loads((remote / name).read_text())
        assert got["bbox"] == expected["bbox"], name
        for key in ("segm", "checkpoint_sha256", "n_detections"):  # the same weights, the same detections
            assert got.get(key) == expected.get(key), (name, key)
    progress(f"{len(stores)} covariance stores and {len(metrics)} metric files equal")


@pytest.mark.slow
def test_requeued_then_cancelled_training_resumes_to_the_same_weights(slurm, runs, tmp_path):
    import torch

    # Longer training than the smoke default (a step takes about 0.1 s), so that after each resume state
    # there are seconds of training left to act in.
    longer = {"train.schedule.steps": 60, "train.schedule.checkpoint_every": 10}
    config = write_config(tmp_path / "c.yaml", SMOKE, **longer)
    target = f"results/smoke/train/{RUN}/final.pt"
    args = [target, "--configfile", str(config)]  # target first: --configfile takes several values
    local, remote = make_workdir(tmp_path / "local"), make_workdir(tmp_path / "slurm")
    state = remote / f"results/smoke/train/{RUN}/resume/state.pt"
    train_log = remote / f"results/smoke/logs/train_detector/{RUN}.log"
    began = time.monotonic()
    reference = runs.start("local", local, *args, slurm=False)
    first = runs.start("first", remote, *args, slurm=True)
    progress("uninterrupted local run and first SLURM run started")

    def running_with_state_after(iteration: int):
        def ready():
            job = running_job("train_detector")
            return job and (now := state_iteration(state)) and now > iteration and (job, now)

        return ready

    # 1. Requeue the running job once it has a resume state. SLURM runs it again (the profile sets
    #    slurm-requeue: true, and the cluster allows requeue only then), the plugin keeps waiting for it,
    #    and the training resumes from that state.
    job, requeued_at = wait_for(
        "a running training job with a resume state", running_with_state_after(0), first, runs.log("first")
    )
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=20)
    release(job)
    progress(f"requeued SLURM job {job} at iteration {requeued_at}")
    resumed_at = wait_for("the requeued job resuming", lambda: resumed_from(train_log), first, runs.log("first"))
    assert resumed_at >= requeued_at
    assert first.poll() is None, runs.log("first").read_text()[-3000:]  # Snakemake still waits for the job
    progress(f"requeued job resumed from iteration {resumed_at}")

    # 2. Cancel it once it has saved a later state (as a preemption without requeue, or a time limit,
    #    would): Snakemake fails, no process of the job is left, and the next run resumes from that state.
    job, cancelled_at = wait_for("a later resume state", running_with_state_after(resumed_at), first, runs.log("first"))
    subprocess.run(["scancel", job], check=True, timeout=20)
    progress(f"cancelled SLURM job {job} at iteration {cancelled_at}")
    output = runs.finish(first, rc=1)
    assert "SLURM status is: 'CANCELLED'" in output, output[-3000:]
    deadline = time.monotonic() + 30  # SLURM's KillWait and then some
    while (left := job_processes(job)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, left
    progress(f"first SLURM run failed as it should, {time.monotonic() - began:.0f} s in")

    runs.finish(runs.start("rerun", remote, *args, slurm=True))
    assert (rerun_from := resumed_from(train_log)) is not None and rerun_from >= cancelled_at, train_log.read_text()
    progress(f"rerun resumed from iteration {rerun_from} and finished, {time.monotonic() - began:.0f} s in")

    runs.finish(reference)
    expected = torch.load(local / target, map_location="cpu", weights_only=False)["state_dict"]
    got = torch.load(remote / target, map_location="cpu", weights_only=False)["state_dict"]
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    progress(f"final weights equal the uninterrupted run's ({len(expected)} tensors)")
