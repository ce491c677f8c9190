"""The whole DAG beyond one clean run: SIGKILL during covariance extraction, reproducibility, the output cache.

One extra smoke run serves every test here: it runs with the between-workflow output cache on, is killed
(Snakemake and its jobs, SIGKILL) while a covariance job extracts or writes its store, then unlocked and rerun.
Every one of its artifacts then comes from a complete job execution, so comparing it with the session's clean
smoke run (`smoke_run`) checks both that a killed-and-resumed run equals an uninterrupted one and that two runs
give the same bytes. The cache it filled then serves the cache tests (no training there).
"""

from __future__ import annotations

import contextlib
import filecmp
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.workflow_helpers import (
    BASE_RUNS,
    DERIVED_RUNS,
    SMOKE,
    SNAKEMAKE,
    dry_run,
    env,
    failure,
    make_workdir,
    snakemake,
    write_config,
)

# What must be identical: every covariance store (arrays and metadata: no timestamps in them), the spectrum tables
# and eigenvalue stores, the dimension tables, the derived widths, the metrics and the report's tables.
COMPARED = [
    "covariance",
    "spectrum",
    "dimensions",
    "widths",
    "eval",
    "report/spectra.csv",
    "report/evaluation.csv",
    "report/summary.csv",
    "report/summary.md",
]
CACHE_LINE = re.compile(r"^Output file (\S+) will be (obtained from|written to) global between-workflow cache\.$")


# ---- the killed run ----


def _commands(parent: psutil.Process) -> list[tuple[psutil.Process, str]]:
    found = []
    for child in parent.children(recursive=True):
        with contextlib.suppress(psutil.Error):  # (ended meanwhile)
            found.append((child, " ".join(child.cmdline())))
    return found


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _training(commands: list[tuple[psutil.Process, str]]) -> bool:
    return any(re.search(r"eigpipe (train|pretrain)\b", command) for _, command in commands)


def _kill_during_covariance(proc: subprocess.Popen, root: Path, timeout: float = 900) -> dict:
    """SIGKILL Snakemake and all its jobs (its process group, in one call, like a lost node) once a covariance job
    has begun extracting (its progress bar is in its log) or writing (its temp store exists), has not yet
    published its store, and no training job runs. Returns what was interrupted."""
    parent = psutil.Process(proc.pid)
    deadline = time.monotonic() + timeout
    tried = set()
    while proc.poll() is None and time.monotonic() < deadline:
        tree = _commands(parent)
        jobs = [(p, m.group(1)) for p, c in tree if (m := re.search(r"eigpipe covariance .*--out (\S+)", c))]
        jobs = [(p, out) for p, out in jobs if out not in tried]
        if not jobs or _training(tree):
            time.sleep(0.1)
            continue
        process, out = jobs[0]
        tried.add(out)
        store = Path(out)  # results/<study>/covariance/<run>/<iteration>.zarr, its log in results/<study>/logs/
        log = root / store.parents[2] / "logs/covariance" / store.parent.name / f"{store.stem}.log"
        checked = time.monotonic()
        while _alive(process) and time.monotonic() < deadline:
            if time.monotonic() - checked > 0.2:  # (the process tree is slow to list: not at every poll)
                tree, checked = _commands(parent), time.monotonic()
                if _training(tree):
                    break  # a training job started meanwhile: wait for another covariance job
            temps = list((root / store.parent).glob(f".{store.name}.tmp-*"))
            phase = (
                "writing"
                if temps
                else "extracting"
                if log.exists() and "img" in log.read_text(errors="replace")
                else None
            )
            if phase is not None:
                os.killpg(proc.pid, signal.SIGSTOP)  # freeze Snakemake and every job, then decide on a still state
                if (root / store).exists():  # already published (the job was only exiting): too late for it
                    os.killpg(proc.pid, signal.SIGCONT)
                    break
                os.killpg(proc.pid, signal.SIGKILL)  # no one gets to react
                proc.wait()
                return {"store": out, "phase": phase, "killed": [c for _, c in tree]}
            time.sleep(0.01)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    pytest.fail("no covariance job was caught mid-extraction before the run ended")


@pytest.fixture(scope="module")
def output_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("output-cache")


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory, frozen_src, output_cache) -> tuple[Path, dict]:
    """The smoke study with --cache: killed during covariance extraction, unlocked, and rerun to the end."""
    root = make_workdir(tmp_path_factory.mktemp("killed"))
    extra = {"PYTHONPATH": str(frozen_src), "SNAKEMAKE_OUTPUT_CACHE": str(output_cache)}
    args = ["--cores", "2", "--cache", "--configfile", SMOKE]
    log = root / "first.log"
    with log.open("w") as handle:
        proc = subprocess.Popen(
            [SNAKEMAKE, *args],
            cwd=root,
            env=env(**extra),
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: one killpg reaches Snakemake and every job
        )
    try:
        killed = _kill_during_covariance(proc, root)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    killed["finished_before_rerun"] = (root / killed["store"]).exists()
    killed["temps_after_kill"] = [str(p) for p in (root / "results").rglob("*.tmp-*")]
    unlock = snakemake(root, "--unlock", "--configfile", SMOKE)
    assert unlock.returncode == 0, unlock.output[-2000:]
    start = time.monotonic()
    rerun = snakemake(root, *args, extra_env=extra)  # the default profile's rerun-incomplete: what a user gets
    print(f"\nrerun after the kill: {time.monotonic() - start:.1f} s wall")
    assert rerun.returncode == 0, failure(rerun, root)
    killed["rerun"] = rerun.output
    return root, killed


def _files(root: Path) -> dict[str, Path]:
    return (
        {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()} if root.is_dir() else {"": root}
    )


@pytest.mark.slow
def test_kill_during_covariance_then_rerun_gives_the_bytes_of_an_uninterrupted_run(killed_run, smoke_run, frozen_src):
    root, killed = killed_run
    assert killed["store"].startswith("results/smoke/covariance/") and killed["phase"] in ("extracting", "writing")
    assert any("eigpipe covariance" in c for c in killed["killed"])
    assert not any(re.search(r"eigpipe (train|pretrain)\b", c) for c in killed["killed"])
    assert not killed["finished_before_rerun"]  # a killed job never leaves a store that looks finished
    assert killed["temps_after_kill"] or killed["phase"] == "extracting"  # killed mid-write: its temp sibling
    assert f"output: {killed['store']}" in killed["rerun"]  # ... and it ran again
    assert not list((root / "results").rglob("*.tmp-*"))  # no temp litter survives the rerun

    compared = 0
    for name in COMPARED:
        ours, theirs = root / "results/smoke" / name, smoke_run / "results/smoke" / name
        mine, reference = _files(ours), _files(theirs)
        assert mine.keys() == reference.keys(), name
        for key, path in mine.items():
            assert filecmp.cmp(path, reference[key], shallow=False), f"{name}/{key} differs"
        compared += len(mine)
    assert compared > 15 * 10  # every store's arrays and metadata, every table, every metrics file

    nothing = dry_run(root, "--configfile", SMOKE, extra_env={"PYTHONPATH": str(frozen_src)})
    assert "Nothing to be done" in nothing  # outputs that are links into the cache count as done


def _cache_plan(output: str) -> dict[str, str]:
    """Output path -> 'obtained from' | 'written to' (the cache), from a dry-run with --cache."""
    return {m.group(1): m.group(2) for line in output.splitlines() if (m := CACHE_LINE.match(line.strip()))}


def _cached_outputs(study: str) -> dict[str, list[str]]:
    """Per cached rule, the first output of each of its jobs in a smoke-shaped study (how dry-runs name jobs)."""
    return {
        "synth_data": [f"results/{study}/data"],
        "pretrain": [f"results/{study}/pretrain/final.pt"],
        "base": [f"results/{study}/train/{run}/final.pt" for run in BASE_RUNS + [f"{r}-s1" for r in BASE_RUNS]],
        "derived": [
            f"results/{study}/train/{run}/final.pt" for run in DERIVED_RUNS + [f"{r}-s1" for r in DERIVED_RUNS]
        ],
    }


def _job_logs(root: Path, study: str) -> list[Path]:
    """Non-empty logs of the cached rules' jobs: those that ran (a cache hit leaves an empty log file)."""
    logs = root / "results" / study / "logs"
    ran = [p for p in logs.glob("**/*") if p.is_file() and p.stat().st_size > 0]
    ran = [p for p in ran if p.relative_to(logs).parts[0] in ("synth_data.log", "pretrain.log", "train_detector")]
    return ran + list((root / "results" / study / "train").glob("*/resume"))  # a training stage that started


def _fetch_models(root: Path, study: str, config: str, extra: dict) -> str:
    targets = [f"results/{study}/train/{run}/snapshots/0.pt" for run in BASE_RUNS]
    proc = snakemake(root, *targets, "--cores", "2", "--cache", "--configfile", config, extra_env=extra)
    assert proc.returncode == 0, failure(proc, root)
    return proc.output


@pytest.mark.slow
def test_a_new_workdir_of_the_study_takes_data_and_models_from_the_cache(
    killed_run, frozen_src, output_cache, tmp_path
):
    killed_root, _ = killed_run
    root = make_workdir(tmp_path / "again")
    extra = {"PYTHONPATH": str(frozen_src), "SNAKEMAKE_OUTPUT_CACHE": str(output_cache)}
    plan = _cache_plan(dry_run(root, "--cache", "--configfile", SMOKE, extra_env=extra))
    expected = _cached_outputs("smoke")
    assert plan == {out: "obtained from" for outs in expected.values() for out in outs}

    output = _fetch_models(root, "smoke", SMOKE, extra)
    assert not _job_logs(root, "smoke")  # nothing was generated or trained
    for run in BASE_RUNS:
        final = root / f"results/smoke/train/{run}/final.pt"
        assert f"Symlinking output file results/smoke/train/{run}/final.pt from cache" in output
        assert final.is_symlink() and final.resolve().parent == output_cache.resolve()
        assert final.resolve() == (killed_root / f"results/smoke/train/{run}/final.pt").resolve()


@pytest.mark.slow
def test_a_study_differing_only_in_the_analysis_reuses_the_trained_models(
    killed_run, frozen_src, output_cache, tmp_path
):
    """Another study (its own name) that changes only spectrum.threshold: data, classifier and the four trained
    detectors come from the cache; the derived detectors (their widths follow the threshold) are trained anew."""
    killed_root, _ = killed_run
    config = write_config(tmp_path / "t.yaml", SMOKE, **{"study": "smoke-t", "spectrum.threshold": 0.01})
    root = make_workdir(tmp_path / "t")
    extra = {"PYTHONPATH": str(frozen_src), "SNAKEMAKE_OUTPUT_CACHE": str(output_cache)}
    plan = _cache_plan(dry_run(root, "--cache", "--configfile", str(config), extra_env=extra))
    expected = _cached_outputs("smoke-t")
    reused = expected["synth_data"] + expected["pretrain"] + expected["base"]
    assert plan == {**dict.fromkeys(reused, "obtained from"), **dict.fromkeys(expected["derived"], "written to")}

    output = _fetch_models(root, "smoke-t", str(config), extra)
    assert not _job_logs(root, "smoke-t")  # nothing was generated or trained
    for run in BASE_RUNS:
        assert f"Symlinking output file results/smoke-t/train/{run}/final.pt from cache" in output
        final = root / f"results/smoke-t/train/{run}/final.pt"
        assert final.resolve() == (killed_root / f"results/smoke/train/{run}/final.pt").resolve()
