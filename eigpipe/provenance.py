"""Provenance records and atomic publication of artifacts (temp sibling, then rename)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from eigpipe import __version__
from eigpipe.errors import EigpipeError


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def section_hash(section: Any) -> str:
    """Hash of a config section, independent of key order."""
    canonical = json.dumps(section, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def listing_hash(root: str | Path, modified: bool = False) -> str:
    """Hash of a folder's file names and sizes (and modification times with ``modified``): cheap, it changes when
    a dataset is rewritten differently (with ``modified``, when any file is rewritten, as Snakemake judges)."""
    root = Path(root)
    stats = ((p, p.stat()) for p in root.rglob("*") if p.is_file())
    entries = sorted(
        f"{p.relative_to(root)}\t{s.st_size}" + (f"\t{s.st_mtime_ns}" if modified else "") for p, s in stats
    )
    return section_hash(entries)


def versions() -> dict[str, str]:
    """Installed versions, read from package metadata (no heavy imports)."""
    found = {"eigpipe": __version__, "python": platform.python_version()}
    for name in ("torch", "torchvision", "numpy", "zarr", "pycocotools"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), for benchmark results: timings differ from one CPU to another."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def record(
    config: dict | None = None,
    inputs: list[str | Path] | None = None,
    seed: int | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """The provenance dict stored with every artifact."""
    return {
        "config_hash": section_hash(config) if config is not None else None,
        "inputs": {str(p): sha256_file(p) for p in inputs or [] if p is not None and Path(p).is_file()},
        "versions": versions(),
        "seed": seed,
        "device": device,
        "host": platform.node(),
    }


TEMP_MARK = ".tmp-"
TEMP_TAIL = re.compile(r"(?P<pid>\d+)-[0-9a-f]{8}")  # after the host: what temp_sibling writes, exactly
TEMP_NAME = re.compile(rf"\..+{re.escape(TEMP_MARK)}.*-{TEMP_TAIL.pattern}")


def temp_sibling(final: Path) -> Path:
    """A hidden sibling ``.<name>.tmp-<host>-<pid>-<8 hex>``, named after the final path, this host and this
    process (for stale-litter removal)."""
    return final.with_name(f".{final.name}{TEMP_MARK}{platform.node()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def is_temp(name: str) -> bool:
    """Whether ``name`` is exactly of the form temp_sibling writes; a user's ``.notes.tmp-keep`` is not."""
    return TEMP_NAME.fullmatch(name) is not None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: a number no process id can be
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temps(final: Path) -> list[Path]:
    """Remove temp siblings of ``final`` left by killed processes of this host; never a live one's."""
    removed = []
    prefix = f".{final.name}{TEMP_MARK}{platform.node()}-"
    for candidate in final.parent.iterdir():
        tail = TEMP_TAIL.fullmatch(candidate.name[len(prefix) :])
        if candidate.name.startswith(prefix) and tail and not _process_alive(int(tail["pid"])):
            remove(candidate)
            removed.append(candidate)
    return removed


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def check_writable(final: str | Path) -> None:
    """Fail now, before the long work, when ``final`` cannot be published: its folder cannot be created or
    written (read-only, permissions, a file in the way, disk full): an EigpipeError naming the folder. Missing
    folders are made when the output is published, so a failure leaves none behind."""
    folder = Path(final).parent
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p == Path(p.anchor))  # none made now
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{existing} is a file")
        with tempfile.NamedTemporaryFile(dir=existing, prefix=f".{Path(final).name}.probe-"):
            pass
    except OSError as exc:
        raise EigpipeError(
            f"{folder}: the output {Path(final).name} cannot be written there ({exc.strerror or exc})"
        ) from None


def missing_folders(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    for path in (folder, *folder.parents):
        if path.exists() or path.is_symlink():
            break
        missing.append(path)
    return missing


def remove_empty(folders: list[Path]) -> None:
    """Remove each of ``folders`` (deepest first) that is empty; one another process filled is kept."""
    for folder in folders:
        with contextlib.suppress(OSError):
            os.rmdir(folder)


@contextlib.contextmanager
def publish(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success rename it to ``final``, on any error remove it.

    Works for files and directories (zarr stores, dataset folders). An existing ``final`` is replaced, and
    temp siblings of ``final`` that killed processes left behind are removed first. Folders made for ``final``
    are removed again on any error or interrupt, so a failure leaves none behind. An OS error that names no
    file, or only the temp sibling (disk full while writing), is raised again naming ``final``.
    """
    final = Path(final)
    made = missing_folders(final.parent)
    tmp = temp_sibling(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(final)
        yield tmp
        if final.exists() and final.is_dir() and tmp.is_dir():
            remove(final)
        os.replace(tmp, final)
    except BaseException as exc:
        remove(tmp)
        remove_empty(made)
        if isinstance(exc, OSError) and (exc.filename is None or str(exc.filename).startswith(str(tmp))):
            raise OSError(exc.errno, exc.strerror or str(exc), str(final)) from exc
        raise


def write_json(path: str | Path, obj: Any) -> None:
    with publish(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_table(path: str | Path, frame: Any) -> None:
    """Write a pandas DataFrame as parquet or CSV (by suffix), atomically."""
    path = Path(path)
    with publish(path) as tmp:
        if path.suffix == ".csv":
            frame.to_csv(tmp, index=False)
        else:
            frame.to_parquet(tmp, index=False)
