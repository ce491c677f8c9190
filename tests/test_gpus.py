"""Threads and GPUs reach the jobs: Snakemake's `{threads}` becomes torch's thread count, and on a machine with
several GPUs each running job holds a GPU no other job holds (eigpipe.gpus). No test here needs a GPU: the CUDA
devices are faked, and the claims run in subprocesses that import only eigpipe.gpus (no torch)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from eigpipe import cli, gpus, runtime

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SNAKEMAKE = str(BIN / "snakemake") if (BIN / "snakemake").exists() else "snakemake"
SMOKE = "config/smoke.yaml"
GPU_RULES = ("pretrain", "train_detector", "evaluate", "covariance")


# ---- helpers (the same as tests/test_workflow.py's; to move to conftest.py) ----


def make_workdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "workflow").symlink_to(REPO / "workflow")
    (path / "config").symlink_to(REPO / "config")
    return path


def dry_run(workdir: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(
        [SNAKEMAKE, "--dry-run", "--printshellcmds", *args],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


def shell_commands(output: str) -> dict[str, list[str]]:
    """rule -> the shell commands of its jobs in a dry-run with --printshellcmds."""
    found: dict[str, list[str]] = {}
    rule = None
    for line in output.splitlines():
        if m := re.match(r"^(?:local)?rule (\w+):$", line):
            rule = m.group(1)
        elif line.startswith("Shell command: ") and rule is not None:
            found.setdefault(rule, []).append(line.removeprefix("Shell command: ").strip())
            rule = None
    return found


def threads_of(command: str) -> int:
    return int(re.search(r"--threads (\d+)", command).group(1))


# ---- threads ----


@pytest.fixture(scope="module")
def three_thread_study(tmp_path_factory) -> tuple[Path, Path]:
    """A workdir and the smoke study with runtime.threads: 3 (the rules' `threads:` come from it)."""
    root = tmp_path_factory.mktemp("threads")
    config = yaml.safe_load((REPO / SMOKE).read_text())
    config["runtime"]["threads"] = 3
    (root / "c.yaml").write_text(yaml.safe_dump(config))
    return make_workdir(root / "wd"), root / "c.yaml"


def test_jobs_get_the_threads_snakemake_gives_them(three_thread_study):
    """--set-threads and the --cores cap reach every stage that reads the runtime section, as --threads."""
    workdir, config = three_thread_study
    commands = shell_commands(
        dry_run(workdir, "--configfile", str(config), "--cores", "8", "--set-threads", "covariance=1")
    )
    assert set(GPU_RULES) <= set(commands)
    for rule, found in commands.items():
        if rule in GPU_RULES:
            assert {threads_of(c) for c in found} == {1 if rule == "covariance" else 3}, rule
        else:
            assert all("--threads" not in c for c in found), rule
    capped = shell_commands(dry_run(workdir, "--configfile", str(config), "--cores", "1"))
    assert {threads_of(c) for rule in GPU_RULES for c in capped[rule]} == {1}


def test_cli_threads_override_reaches_torch(monkeypatch):
    """`eigpipe <stage> --threads 3` overrides runtime.threads before validation, and runtime.setup applies it."""
    seen = {}

    def fake_extract(cfg, **paths):
        seen["cfg"] = cfg
        runtime.setup(cfg["runtime"], cfg["seed"])
        seen["torch"] = torch.get_num_threads()

    monkeypatch.setattr(type(cli.STAGES["covariance"]), "function", lambda self: fake_extract)
    before = torch.get_num_threads()
    try:
        code = cli.main(
            [
                "covariance",
                "--config-json",
                '{"covariance": {}, "runtime": {"threads": 1, "deterministic": false, "tf32": false}, "seed": 0}',
                "--checkpoint",
                "c.pt",
                "--data",
                "a.json",
                "--image-dir",
                "img",
                "--out",
                "s.zarr",
                "--threads",
                "3",
            ]
        )
    finally:
        torch.set_num_threads(before)
    assert code == 0
    assert seen["cfg"]["runtime"]["threads"] == 3 and seen["torch"] == 3


def test_cli_threads_are_validated_like_the_config():
    code = cli.main(
        [
            "evaluate",
            "--config-json",
            '{"evaluate": {}, "runtime": {}}',
            "--checkpoint",
            "c.pt",
            "--data",
            "a.json",
            "--image-dir",
            "img",
            "--out",
            "m.json",
            "--threads",
            "0",
        ]
    )
    assert code == 1  # runtime.threads: minimum 1, named by the schema's error


# ---- GPUs: which one a process gets ----


@pytest.fixture
def fake_cuda(monkeypatch, tmp_path):
    """Three fake CUDA devices; set_device calls recorded; a fresh lock folder; no claim held by this process."""
    calls: list[int] = []
    props = [SimpleNamespace(uuid=f"0000000{i}-aaaa-bbbb-cccc-dddddddddddd") for i in range(3)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(props))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props[i])
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"Fake GPU {i}")
    monkeypatch.setattr(gpus, "_HELD", {})
    monkeypatch.setenv(gpus.LOCKS_ENV, str(tmp_path / "locks"))
    for name in runtime.TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    before = torch.get_num_threads()
    yield SimpleNamespace(calls=calls, locks=tmp_path / "locks")
    torch.set_num_threads(before)


CUDA = {"device": "cuda", "threads": 1, "deterministic": False, "tf32": False}


def test_setup_claims_a_free_gpu_by_uuid(fake_cuda, capsys):
    assert gpus.visible_gpus() == [f"GPU-0000000{i}-aaaa-bbbb-cccc-dddddddddddd" for i in range(3)]
    env = runtime.setup(CUDA, seed=0)
    assert env.device == torch.device("cuda", 0) and fake_cuda.calls == [0]
    assert capsys.readouterr().err == (
        "eigpipe: running on cuda:0 (Fake GPU 0, GPU-00000000-aaaa-bbbb-cccc-dddddddddddd)\n"
    )  # the job's log says which GPU it held
    assert "pid" in (fake_cuda.locks / "GPU-00000000-aaaa-bbbb-cccc-dddddddddddd.lock").read_text()
    assert runtime.setup(CUDA, seed=0).device == torch.device("cuda", 0)  # a process keeps its GPU


def test_setup_skips_a_gpu_another_process_holds(fake_cuda):
    holder = _claimant(fake_cuda.locks, ["GPU-00000000-aaaa-bbbb-cccc-dddddddddddd"])
    try:
        assert _first_line(holder) == "0"
        assert runtime.setup(CUDA, seed=0).device == torch.device("cuda", 1) and fake_cuda.calls == [1]
    finally:
        _stop(holder)


def test_torchrun_ranks_keep_their_local_rank(fake_cuda, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "1")  # (1: no process group to join in a unit test)
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert runtime.setup(CUDA, seed=0).device == torch.device("cuda", 2) and fake_cuda.calls == [2]
    assert not fake_cuda.locks.exists()  # no claim under torchrun


def test_runtime_tf32_sets_the_float32_precision_of_convolutions_and_matmuls():
    """runtime.tf32 chooses TF32 or IEEE for CUDA's float32 convolutions and matmuls (PyTorch's own default is TF32
    for cuDNN convolutions only): a study computes the same numbers on a CPU and a GPU unless it asks."""
    backends = (torch.backends.cudnn.conv, torch.backends.cuda.matmul)
    saved, threads = [backend.fp32_precision for backend in backends], torch.get_num_threads()
    try:
        for tf32, expected in ((True, "tf32"), (False, "ieee")):
            runtime.setup({"device": "cpu", "threads": 1, "deterministic": False, "tf32": tf32}, seed=0)
            assert [backend.fp32_precision for backend in backends] == [expected, expected]
    finally:
        for backend, value in zip(backends, saved, strict=True):
            backend.fp32_precision = value
        torch.set_num_threads(threads)


def test_claiming_off_uses_device_zero(fake_cuda, monkeypatch):
    monkeypatch.setenv(gpus.LOCKS_ENV, "off")
    assert runtime.setup(CUDA, seed=0).device == torch.device("cuda", 0)


# ---- GPUs: several processes at once ----

CLAIM = """
import sys
from pathlib import Path
from eigpipe import gpus
from eigpipe.errors import EigpipeError
try:
    claim = gpus.claim(sys.argv[2].split(","), Path(sys.argv[1]), wait=float(sys.argv[3]), poll=0.05)
except EigpipeError as exc:
    print(f"error: {exc}", file=sys.stderr, flush=True)
    sys.exit(1)
print(claim.index, flush=True)
sys.stdin.read()  # hold the GPU until the test closes stdin (or kills this process)
"""
UUIDS = [f"GPU-{i}" for i in range(3)]


def _claimant(locks: Path, uuids: list[str] = UUIDS, wait: float = 0.0) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CLAIM, str(locks), ",".join(uuids), str(wait)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _first_line(proc: subprocess.Popen, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    line = proc.stdout.readline().strip()  # blocks until the claim is made (or the process ends)
    assert time.monotonic() < deadline, "claim took too long"
    return line


def _stop(*procs: subprocess.Popen) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.stdin.close()
        proc.wait(timeout=30)


def test_concurrent_claims_get_distinct_gpus_and_a_killed_holders_gpu_is_free_again(tmp_path):
    locks = tmp_path / "locks"
    holders = [_claimant(locks) for _ in UUIDS]  # all start at once
    try:
        claimed = [int(_first_line(p)) for p in holders]
        assert sorted(claimed) == [0, 1, 2]

        late = _claimant(locks, wait=0.5)  # every GPU is held: a clear one-line error after the wait
        _, err = late.communicate(timeout=60)
        assert late.returncode == 1
        waited, error = err.splitlines()  # the progress line when it began to wait, then the error
        assert waited.startswith("eigpipe: waiting for a free GPU")
        assert re.fullmatch(
            r"error: no free GPU after 0.5 s: all 3 visible GPUs are held \(.*pid \d+.*\); "
            r"cap GPU jobs with `--resources gpu=3`.*",
            error,
        ), err

        waiter = _claimant(locks, wait=60)  # waits (with a progress line) until a holder dies
        line = waiter.stderr.readline()
        assert line.startswith("eigpipe: waiting for a free GPU: all 3 visible GPUs are held"), line
        victim = claimed.index(1)
        holders[victim].send_signal(signal.SIGKILL)  # no clean-up: the kernel drops its lock
        holders[victim].wait(timeout=30)
        assert _first_line(waiter) == "1"
        holders.append(waiter)

        other = claimed.index(2)
        _stop(holders[other])  # an ordinary exit frees its GPU too
        again = _claimant(locks, wait=0.5)
        assert _first_line(again) == "2"
        holders.append(again)
    finally:
        _stop(*holders)


HOLD_REAL_GPU = """
import sys
from eigpipe import runtime
env = runtime.setup({"device": "cuda", "threads": 1, "deterministic": False, "tf32": False}, seed=0)
print(env.device.index, flush=True)
sys.stdin.read()
"""


@pytest.mark.cuda
def test_a_real_gpu_is_claimed_by_its_uuid_and_freed_by_exit(tmp_path, monkeypatch):
    """On a real device: a job claims a GPU by its UUID; while every visible GPU is held a second claim fails
    with the one-line error; once the holders exit the GPU is free again."""
    monkeypatch.setenv(gpus.LOCKS_ENV, str(tmp_path / "locks"))
    uuids = gpus.visible_gpus()
    assert all(re.fullmatch(r"GPU-[A-Za-z0-9._-]+", uuid) for uuid in uuids), uuids
    holders = [
        subprocess.Popen(
            [sys.executable, "-c", HOLD_REAL_GPU], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for _ in uuids
    ]
    try:
        assert sorted(int(_first_line(p, timeout=120)) for p in holders) == list(range(len(uuids)))
        assert sorted(path.stem for path in (tmp_path / "locks").glob("*.lock")) == sorted(uuids)
        late = _claimant(tmp_path / "locks", uuids, wait=0.5)
        _, err = late.communicate(timeout=60)
        assert late.returncode == 1 and f"all {len(uuids)} visible GPUs are held" in err, err
    finally:
        _stop(*holders)
    again = _claimant(tmp_path / "locks", uuids)
    try:
        assert _first_line(again) == "0"
    finally:
        _stop(again)


def test_wait_limit_is_read_and_checked(monkeypatch):
    monkeypatch.setenv(gpus.WAIT_ENV, "12.5")
    assert gpus.wait_limit() == 12.5
    monkeypatch.setenv(gpus.WAIT_ENV, "soon")
    with pytest.raises(gpus.EigpipeError, match="EIGPIPE_GPU_WAIT='soon'"):
        gpus.wait_limit()


# ---- the profile ----


def test_default_profile_schedules_gpu_jobs_as_a_gpu_resource():
    profile = yaml.safe_load((REPO / "workflow/profiles/default/config.yaml").read_text())
    assert {rule: res["gpu"] for rule, res in profile["set-resources"].items()} == dict.fromkeys(GPU_RULES, 1)
