"""A run folder: snapshots, final model, metrics log, and the resume state that survives a kill.

Snakemake deletes a job's declared outputs before re-running it, so everything needed to resume lives
in ``<run>/resume/`` (never a declared output): the training state, the metrics written so far, and
hard links to the snapshots already published (re-linked into place after a restart). A finished run
keeps no resume state: rerunning it trains afresh.

A state is resumed only when everything it stands on checks out: its own checksum, its fingerprint (config,
input contents, code and library versions), an iteration inside the schedule, every snapshot up to it with the
content it had, and a metrics log with one record per logged iteration up to it. Anything else is said in one
line and the run starts afresh, its folder cleared of the older run's files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from eigpipe.models.checkpoint import FORMAT, save_torch_file
from eigpipe.outputs import Kind, is_temp, only_files, torch_archive_strings
from eigpipe.provenance import missing_folders, publish, remove, remove_empty, sha256_file

# every file a run folder may hold, relative to it; checkpoints carry FORMAT, the resume state a fingerprint
RUN_FILES = re.compile(r"(resume/)?(metrics\.jsonl|snapshots/\d+\.pt)|final\.pt|resume/state\.pt")
ZIP_MAGIC = b"PK\x03\x04"  # every torch.save archive starts with it, also one cut short


def is_run_folder(path: Path) -> bool:
    """Whether every file under ``path`` is one a training run writes (temp litter of killed runs aside): its
    checkpoints carry FORMAT, its resume state a fingerprint, its metrics log training records. Under resume/,
    eigpipe's own by their place, a torch archive cut short (a full disk, a copy) is one too: it is dropped."""
    if not only_files(path, RUN_FILES):
        return False
    for file in (f for f in path.rglob("*") if f.is_file() and not is_temp(f.name)):
        relative = file.relative_to(path).as_posix()
        marker = "fingerprint" if relative == "resume/state.pt" else FORMAT
        if file.suffix == ".pt" and not _is_own_archive(file, marker, relative.startswith("resume/")):
            return False
        if relative == "metrics.jsonl" and not _is_metrics_log(file):
            return False
    return True


def _is_own_archive(file: Path, marker: str, in_resume: bool) -> bool:
    try:
        return marker in torch_archive_strings(file)
    except Exception:  # no whole torch archive: under resume/, one cut short or zeroed (a power loss) is eigpipe's
        return in_resume and _torn_archive(file)


def _torn_archive(file: Path, block: int = 1 << 20) -> bool:
    with file.open("rb") as handle:
        head = handle.read(len(ZIP_MAGIC))
        if head == ZIP_MAGIC:
            return True
        while head:
            if head.strip(b"\0"):
                return False
            head = handle.read(block)
    return True  # empty, or zeros only


def _is_metrics_log(path: Path) -> bool:
    """Whether every line is a training record (a JSON object with its iteration)."""
    try:
        return _records(path.read_text().splitlines()) is not None
    except UnicodeDecodeError:
        return False


def _records(lines: list[str]) -> list[dict] | None:
    try:
        records = [json.loads(line) for line in lines if line.strip()]
    except json.JSONDecodeError:
        return None
    return records if all(isinstance(r, dict) and isinstance(r.get("iteration"), int) for r in records) else None


RUN_FOLDER = Kind("an eigpipe training run folder (final.pt, snapshots/, metrics.jsonl, resume/)", is_run_folder, True)


class Unresumable(Exception):
    """Why a saved state is not resumed (said in the warning)."""


def content_digest(value: Any) -> str:
    """A checksum of a training state's contents (tensor bytes, numbers, keys), which torch's archive lacks."""
    digest = hashlib.sha256()
    _digest_into(digest, value)
    return digest.hexdigest()


def _digest_into(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"T{flat.dtype}{tuple(value.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy())
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}".encode())
        for key, item in value.items():
            digest.update(repr(key).encode())
            _digest_into(digest, item)
    elif isinstance(value, list | tuple):
        digest.update(f"L{len(value)}".encode())
        for item in value:
            _digest_into(digest, item)
    elif value is None or isinstance(value, bool | int | float | str):
        digest.update(repr(value).encode())
    else:  # an object a scheduler keeps: only its type is stable from one process to the next
        digest.update(type(value).__qualname__.encode())


class RunFolder:
    def __init__(self, out: str | Path, fingerprint: str):
        self.out = Path(out)
        self.resume_dir = self.out / "resume"
        self.fingerprint = fingerprint
        self.kept: dict[int, str] = {}  # snapshot iteration -> sha256 of its resume copy
        self.made: list[Path] = []  # the run folder and those above it that this run created

    @property
    def state_path(self) -> Path:
        return self.resume_dir / "state.pt"

    @property
    def metrics_log(self) -> Path:
        return self.resume_dir / "metrics.jsonl"

    def snapshot_path(self, iteration: int) -> Path:
        return self.out / "snapshots" / f"{iteration}.pt"

    def kept_path(self, iteration: int) -> Path:
        return self.resume_dir / "snapshots" / f"{iteration}.pt"

    @property
    def final_path(self) -> Path:
        return self.out / "final.pt"

    def prepare(self, schedule: dict) -> dict[str, Any] | None:
        """The saved state when it is this run's and sound (see the module's doc); else None, with the folder
        cleared of every earlier run's file (resume state, snapshots, final model, metrics)."""
        self.made = missing_folders(self.out)
        if self.state_path.is_file():
            try:
                state = self._sound_state(schedule)
                self._restore_outputs(state["iteration"])
                return state
            except Unresumable as why:
                print(f"warning: {self.resume_dir}: {why}; training afresh", file=sys.stderr)
        self.clear()
        self.resume_dir.mkdir(parents=True, exist_ok=True)
        return None

    def kept_state(self) -> dict[str, Any] | None:
        """The state that prepare() kept (on another rank of a distributed run), else None."""
        if not self.state_path.is_file():
            return None
        return torch.load(self.state_path, map_location="cpu", weights_only=False)

    def _sound_state(self, schedule: dict) -> dict[str, Any]:
        try:
            state = self.kept_state()
        except Exception as exc:  # eigpipe's own state, damaged (a full disk, a copy cut short)
            raise Unresumable(f"damaged resume state ({type(exc).__name__})") from None
        if not isinstance(state, dict) or "digest" not in state:
            raise Unresumable("the resume state is of an older eigpipe (it has no checksum)")
        digest = state.pop("digest")
        if digest != content_digest(state):
            raise Unresumable("damaged resume state (its checksum does not match its contents)")
        if state.get("fingerprint") != self.fingerprint:
            raise Unresumable("the resume state is of another config, input file, code or library version")
        iteration = state["iteration"]
        if not 0 < iteration < schedule["steps"]:
            raise Unresumable(f"the resume state's iteration {iteration} is outside 1..{schedule['steps'] - 1}")
        self._check_kept_snapshots(state["snapshots"], [s for s in schedule["snapshots"] if s <= iteration])
        self._check_metrics_log(iteration, schedule["log_every"])
        return state

    def _check_kept_snapshots(self, digests: dict[int, str], expected: list[int]) -> None:
        for iteration in expected:
            kept = self.kept_path(iteration)
            if not kept.is_file() or sha256_file(kept) != digests.get(iteration):
                how = "damaged" if kept.is_file() else "missing"
                raise Unresumable(f"damaged resume state (its copy of snapshot {iteration} is {how})")
        self.kept = {iteration: digests[iteration] for iteration in expected}

    def _check_metrics_log(self, iteration: int, log_every: int) -> None:
        """One record per logged iteration up to ``iteration``, in order; a last line a kill tore is dropped."""
        text = self.metrics_log.read_text(errors="replace") if self.metrics_log.is_file() else ""
        lines = text.splitlines()
        if lines and not text.endswith("\n"):
            lines.pop()
        records, expected = _records(lines), list(range(log_every, iteration + 1, log_every))
        kept = (records or [])[: len(expected)]
        if records is None or [record["iteration"] for record in kept] != expected:
            raise Unresumable("damaged resume state (its metrics log does not match it)")
        with publish(self.metrics_log) as tmp:  # a kill while it is rewritten keeps the sound log
            tmp.write_text("".join(f"{json.dumps(record, sort_keys=True)}\n" for record in kept))

    def _restore_outputs(self, iteration: int) -> None:
        for kept in (self.resume_dir / "snapshots").glob("*.pt"):
            target = self.snapshot_path(int(kept.stem))
            if int(kept.stem) > iteration:  # made after the state: training makes it again
                kept.unlink()
            elif not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(kept, target)

    def clear(self) -> None:
        """Remove every file of an earlier run (the folder was recognised as a run folder before any work)."""
        for path in (self.resume_dir, self.out / "snapshots", self.final_path, self.out / "metrics.jsonl"):
            remove(path)
        self.kept = {}

    def save_state(self, state: dict[str, Any]) -> None:
        state = {**state, "fingerprint": self.fingerprint, "snapshots": dict(self.kept)}
        save_torch_file({**state, "digest": content_digest(state)}, self.state_path)

    def keep_snapshot(self, iteration: int) -> None:
        """Link a published snapshot into the resume folder so a Snakemake re-run cannot lose it."""
        kept = self.kept_path(iteration)
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.unlink(missing_ok=True)
        _link_or_copy(self.snapshot_path(iteration), kept)
        self.kept[iteration] = sha256_file(kept)

    def log(self, record: dict[str, Any]) -> None:
        with self.metrics_log.open("a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")

    def publish_metrics(self) -> None:
        with publish(self.out / "metrics.jsonl") as tmp:
            shutil.copyfile(self.metrics_log, tmp)

    def finished(self) -> None:
        """After final.pt: drop the resume state, so that a rerun (new code, --forcerun) trains afresh."""
        shutil.rmtree(self.resume_dir, ignore_errors=True)

    def prune_empty(self) -> None:
        """After a failure: remove the folders this run made that hold nothing (a run that failed at once)."""
        remove_empty([self.resume_dir / "snapshots", self.resume_dir, self.out / "snapshots", *self.made])


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
