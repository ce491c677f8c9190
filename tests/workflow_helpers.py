"""Helpers for the tests that run Snakemake: working directories, runs, dry-runs and edited study files.

Every Snakemake call runs in a temporary working directory holding symlinks to workflow/ and config/, so
nothing is written to the repository's results/ or .snakemake/.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SNAKEMAKE = str(BIN / "snakemake") if (BIN / "snakemake").exists() else "snakemake"
SMOKE = "config/smoke.yaml"
BASE_RUNS = [f"{model}-{init}" for model in ("faster_rcnn", "mask_rcnn") for init in ("pretrained", "scratch")]
DERIVED_RUNS = ["faster_rcnn-derived", "mask_rcnn-derived"]
# the smoke study trains every detector with seeds 0 (the study seed: plain names) and 1 (<run>-s1)
REPLICATE_RUNS = [f"{run}-s1" for run in BASE_RUNS + DERIVED_RUNS]


def make_workdir(path: Path, copy_config: bool = False) -> Path:
    """A working directory with workflow/ linked and config/ linked (or copied, to edit the demo config)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "workflow").symlink_to(REPO / "workflow")
    if copy_config:
        shutil.copytree(REPO / "config", path / "config")
    else:
        (path / "config").symlink_to(REPO / "config")
    return path


def env(**extra: str) -> dict[str, str]:
    # Jobs call `eigpipe`: the console script of the environment that runs the tests.
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra}


def snakemake(workdir: Path, *args: str, extra_env: dict | None = None, timeout: float = 900):
    proc = subprocess.run(
        [SNAKEMAKE, *args], cwd=workdir, env=env(**(extra_env or {})), capture_output=True, text=True, timeout=timeout
    )
    proc.output = proc.stdout + proc.stderr
    return proc


def dry_run(workdir: Path, *args: str, extra_env: dict | None = None) -> str:
    proc = snakemake(workdir, "--dry-run", "--printshellcmds", *args, extra_env=extra_env)
    assert proc.returncode == 0, proc.output[-4000:]
    return proc.output


def write_config(path: Path, base: str, **changes) -> Path:
    """A copy of config `base` with dotted keys changed, e.g. {"train.schedule.lr": -1}."""
    config = yaml.safe_load((REPO / base).read_text())
    for dotted, value in changes.items():
        *parents, key = dotted.split(".")
        node = config
        for name in parents:
            node = node.setdefault(name, {})
        node[key] = value
    path.write_text(yaml.safe_dump(config))
    return path


def failure(proc, root: Path) -> str:
    """The end of Snakemake's output and of the three newest job logs."""
    logs = sorted((root / "results").rglob("*.log"), key=lambda p: p.stat().st_mtime)
    tails = "\n".join(f"--- {p.relative_to(root)}\n{p.read_text()[-1500:]}" for p in logs[-3:])
    return f"{proc.output[-3000:]}\n{tails}"
