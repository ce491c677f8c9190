"""One GPU per process on a machine with several: a process claims a free GPU by locking a file named by its UUID.

Snakemake's ``gpu`` resource caps how many GPU jobs run at once, but it does not say which GPU each job gets.
So each job claims one itself: an exclusive, non-blocking ``fcntl.flock`` on ``<lock folder>/<uuid>.lock`` for
the first visible GPU whose lock is free, with the file kept open for the life of the process. The kernel drops
the lock when the process ends, however it ends (exit, crash, SIGKILL, the OOM killer), so no stale claim
survives a job. The UUID is the GPU's physical identity: two processes that see one GPU under different
indices (say two SLURM jobs on a node, each seeing its GPU as device 0) still contend for one lock.

Environment:
    EIGPIPE_GPU_LOCKS  the lock folder (default ``/tmp/eigpipe-gpu-locks``, not $TMPDIR, which schedulers often
                       make per job: every job on the machine must see the same folder); ``off`` disables claiming
                       (each process takes device 0).
    EIGPIPE_GPU_WAIT   seconds to wait while every visible GPU is held (default 0: no limit). While waiting
                       the process prints a progress line (at once, then every few minutes) naming the holders.

torch is imported only by :func:`visible_gpus`, so the claim itself is cheap to exercise without a GPU.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from eigpipe.errors import EigpipeError

LOCKS_ENV = "EIGPIPE_GPU_LOCKS"
WAIT_ENV = "EIGPIPE_GPU_WAIT"
DEFAULT_LOCKS = Path("/tmp/eigpipe-gpu-locks")
PROGRESS_EVERY = 300.0  # seconds between progress lines while waiting

_HELD: dict[Path, int] = {}  # lock file -> open descriptor holding its lock (for the life of the process)


@dataclass(frozen=True)
class Claim:
    """A GPU this process holds: its index among the visible devices, its UUID and its lock file."""

    index: int
    uuid: str
    lock: Path


def lock_dir() -> Path | None:
    """The lock folder from EIGPIPE_GPU_LOCKS (None when claiming is off)."""
    value = os.environ.get(LOCKS_ENV, "")
    if value.lower() == "off":
        return None
    return Path(value) if value else DEFAULT_LOCKS


def wait_limit() -> float:
    """Seconds to wait for a free GPU from EIGPIPE_GPU_WAIT (0: no limit)."""
    value = os.environ.get(WAIT_ENV, "0")
    try:
        seconds = float(value)
    except ValueError:
        raise EigpipeError(f"{WAIT_ENV}={value!r}: not a number of seconds") from None
    if seconds < 0:
        raise EigpipeError(f"{WAIT_ENV}={value!r}: must be >= 0 (0: no limit)")
    return seconds


def _uuid(props: object, index: int) -> str:
    uuid = str(getattr(props, "uuid", "") or "")
    if not uuid:  # no UUID from this driver: the PCI address still names the physical device on this host
        domain, bus, device = (getattr(props, f"pci_{name}_id", None) for name in ("domain", "bus", "device"))
        return f"{platform.node()}-pci-{domain}-{bus}-{device}" if bus is not None else f"index{index}"
    uuid = re.sub(r"[^A-Za-z0-9._-]", "_", uuid)  # a file name
    return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"


def visible_gpus() -> list[str]:
    """UUIDs of the CUDA devices this process sees, in device-index order."""
    import torch

    return [_uuid(torch.cuda.get_device_properties(i), i) for i in range(torch.cuda.device_count())]


def _open(path: Path) -> int:
    """A descriptor on the lock file, created readable and writable by everyone (the folder is shared)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:  # another user's lock file: flock works on a read-only descriptor too
        return os.open(path, os.O_RDONLY)
    with contextlib.suppress(OSError):
        os.fchmod(fd, 0o666)
    return fd


def _try_lock(path: Path) -> bool:
    """Take the lock on ``path`` without blocking; on success keep its descriptor open and note the holder."""
    fd = _open(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    _HELD[path] = fd
    with contextlib.suppress(OSError):  # a read-only descriptor: the lock is what counts, the note is for people
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {platform.node()}\n".encode(), 0)
    return True


def _holders(paths: list[Path]) -> str:
    notes = []
    for path in paths:
        try:
            note = path.read_text().strip() or "unknown holder"
        except OSError:
            note = "unknown holder"
        notes.append(f"{path.stem}: {note}")
    return "; ".join(notes)


def _prepare(folder: Path) -> None:
    try:
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            folder.chmod(0o1777)  # a folder made here is shared by every user's jobs, like /tmp
    except OSError as exc:
        raise EigpipeError(f"{LOCKS_ENV}: cannot use lock folder {folder}: {exc.strerror or exc}") from None


def claim(uuids: list[str], folder: Path, wait: float = 0.0, poll: float = 0.5) -> Claim:
    """Hold one of the GPUs ``uuids`` (visible index order) whose lock in ``folder`` is free, for the life of this
    process. A process that already holds one gets the same one again. While all are held, wait: a progress line on
    stderr at once and every PROGRESS_EVERY seconds; after ``wait`` seconds (0: no limit) raise a one-line error."""
    if not uuids:
        raise EigpipeError("no CUDA device is visible to claim")
    _prepare(folder)
    paths = [folder / f"{uuid}.lock" for uuid in uuids]
    for index, path in enumerate(paths):
        if path in _HELD:
            return Claim(index, uuids[index], path)
    start = time.monotonic()
    next_note = start
    while True:
        for index, path in enumerate(paths):
            if _try_lock(path):
                return Claim(index, uuids[index], path)
        now = time.monotonic()
        if wait and now - start >= wait:
            raise EigpipeError(
                f"no free GPU after {wait:g} s: all {len(uuids)} visible GPUs are held ({_holders(paths)}); "
                f"cap GPU jobs with `--resources gpu={len(uuids)}`, or raise {WAIT_ENV} (0: no limit)"
            )
        if now >= next_note:
            print(
                f"eigpipe: waiting for a free GPU: all {len(uuids)} visible GPUs are held ({_holders(paths)}); "
                f"locks in {folder}",
                file=sys.stderr,
                flush=True,
            )
            next_note = now + PROGRESS_EVERY
        time.sleep(poll)


def claim_visible() -> int:
    """The index of the visible GPU this process holds (claimed now, or earlier); 0 when claiming is off."""
    folder = lock_dir()
    if folder is None:
        return 0
    return claim(visible_gpus(), folder, wait=wait_limit()).index
