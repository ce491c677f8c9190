"""A run folder: snapshots, final model, metrics log, and the resume state that survives a kill.

Snakemake deletes a job's declared outputs before re-running it, so everything needed to resume lives
in ``<run>/resume/`` (never a declared output): the training state, the metrics written so far, and
hard links to the snapshots already published (re-linked into place after a restart).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from eigpipe.models.checkpoint import FORMAT
from eigpipe.outputs import Kind, is_temp, only_files, torch_archive_strings
from eigpipe.provenance import publish

# every file a run folder may hold, relative to it; checkpoints carry FORMAT, the resume state a fingerprint
RUN_FILES = re.compile(r"(resume/)?(metrics\.jsonl|snapshots/\d+\.pt)|final\.pt|resume/state\.pt")


def is_run_folder(path: Path) -> bool:
    """Whether every file under ``path`` is one a training run writes (temp litter of killed runs aside): its
    checkpoints carry FORMAT, its resume state a fingerprint, its metrics log training records."""
    if not only_files(path, RUN_FILES):
        return False
    for file in (f for f in path.rglob("*") if f.is_file() and not is_temp(f.name)):
        relative = file.relative_to(path).as_posix()
        if file.suffix == ".pt":
            marker = "fingerprint" if relative == "resume/state.pt" else FORMAT
            if marker not in torch_archive_strings(file):
                return False
        elif relative == "metrics.jsonl" and not _is_metrics_log(file):
            return False
    return True


def _is_metrics_log(path: Path) -> bool:
    """Whether every line is a training record (a JSON object with its iteration); the resume copy, which a kill
    may leave with a torn last line, is eigpipe's own by its place."""
    try:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return all(isinstance(record, dict) and "iteration" in record for record in records)


RUN_FOLDER = Kind("an eigpipe training run folder (final.pt, snapshots/, metrics.jsonl, resume/)", is_run_folder, True)


class RunFolder:
    def __init__(self, out: str | Path, fingerprint: str):
        self.out = Path(out)
        self.resume_dir = self.out / "resume"
        self.fingerprint = fingerprint

    @property
    def state_path(self) -> Path:
        return self.resume_dir / "state.pt"

    @property
    def metrics_log(self) -> Path:
        return self.resume_dir / "metrics.jsonl"

    def snapshot_path(self, iteration: int) -> Path:
        return self.out / "snapshots" / f"{iteration}.pt"

    @property
    def final_path(self) -> Path:
        return self.out / "final.pt"

    def prepare(self) -> dict[str, Any] | None:
        """Return the saved state when it belongs to this run's config, else start clean."""
        self.resume_dir.mkdir(parents=True, exist_ok=True)
        if self.state_path.is_file():
            try:
                state = torch.load(self.state_path, map_location="cpu", weights_only=False)
                if state.get("fingerprint") == self.fingerprint:
                    self._restore_outputs(state["iteration"])
                    return state
            except Exception as exc:  # eigpipe's own state, damaged (a full disk, a copy cut short): start afresh
                print(
                    f"warning: {self.resume_dir}: damaged resume state ({type(exc).__name__}), training afresh",
                    file=sys.stderr,
                )
        shutil.rmtree(self.resume_dir)
        self.resume_dir.mkdir(parents=True)
        return None

    def _restore_outputs(self, iteration: int) -> None:
        for kept in (self.resume_dir / "snapshots").glob("*.pt"):
            target = self.snapshot_path(int(kept.stem))
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(kept, target)
        if self.metrics_log.exists():
            lines = [line for line in self.metrics_log.read_text().splitlines() if line.strip()]
            kept_lines = [line for line in lines if json.loads(line).get("iteration", 0) <= iteration]
            self.metrics_log.write_text("".join(f"{line}\n" for line in kept_lines))

    def save_state(self, state: dict[str, Any]) -> None:
        with publish(self.state_path) as tmp:
            torch.save({**state, "fingerprint": self.fingerprint}, tmp)

    def keep_snapshot(self, iteration: int) -> None:
        """Link a published snapshot into the resume folder so a Snakemake re-run cannot lose it."""
        kept = self.resume_dir / "snapshots" / f"{iteration}.pt"
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.unlink(missing_ok=True)
        _link_or_copy(self.snapshot_path(iteration), kept)

    def log(self, record: dict[str, Any]) -> None:
        with self.metrics_log.open("a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")

    def publish_metrics(self) -> None:
        with publish(self.out / "metrics.jsonl") as tmp:
            shutil.copyfile(self.metrics_log, tmp)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
