"""`eigpipe check-data`: a split's structure, then every image file decoded fully the way the loader reads it.

Construction of the Dataset checks structure only; this check is the one that opens the images. It decodes
each file with the loader's own reader (``coco.read_image``), so what passes here loads during a job.
"""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from eigpipe.data import coco
from eigpipe.data.annotations import ValidationReport, validate
from eigpipe.errors import DataError

CHUNK = 64  # images per task handed to a worker: amortises the hand-over, keeps the first error near the front


def _problems(folder: Path, images: list[tuple[str, int, int]]) -> list[str | None]:
    """Per image (file name, width, height): None if the loader reads it as recorded, else the one-line problem."""
    problems: list[str | None] = []
    for name, width, height in images:
        try:
            coco.read_image(folder / name, width, height)
            problems.append(None)
        except DataError as exc:
            problems.append(str(exc))
    return problems


def _pool(jobs: int) -> Executor:
    method = "fork" if sys.platform.startswith("linux") else "spawn"  # fork: workers inherit the imports at once
    return ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context(method))


def _first_problem(folder: Path, images: list[tuple[str, int, int]], jobs: int) -> tuple[int, str] | None:
    """(position, problem) of the first image, in order, that the loader cannot read as recorded; None if none."""
    chunks = [images[start : start + CHUNK] for start in range(0, len(images), CHUNK)]
    if jobs == 1 or len(chunks) == 1:
        results: Iterator[list[str | None]] = (_problems(folder, chunk) for chunk in chunks)
        return _first(results)
    with _pool(jobs) as pool:
        futures = [pool.submit(_problems, folder, chunk) for chunk in chunks]
        try:
            found = _first(future.result() for future in futures)
        except BrokenProcessPool:  # a worker crashed or was killed (out of memory?) inside this chunk
            chunk = next(i for i, future in enumerate(futures) if future.exception() is not None)
            return chunk * CHUNK, f"a decoding worker died reading this image or one of the next {CHUNK - 1}"
        pool.shutdown(cancel_futures=True)  # after a problem, the chunks not yet started are not decoded
    return found


def _first(results: Iterator[list[str | None]]) -> tuple[int, str] | None:
    for index, chunk in enumerate(results):
        for offset, problem in enumerate(chunk):
            if problem is not None:
                return index * CHUNK + offset, problem
    return None


def check_data(
    cfg: dict, annotations: str | Path, images: str | Path, strict: bool = False, jobs: int = 1
) -> ValidationReport:
    """Validate the split's structure, then decode every image file fully; print the one-line summary.

    Each image must exist, decode to the end, have the recorded size and a mode the loader converts faithfully.
    The first problem, in the order of the annotation file whatever ``jobs``, is a one-line DataError naming the
    annotation file, the image id and file. ``jobs`` worker processes decode in parallel.
    ``cfg`` (the config sections of the stage contract) is not read.
    """
    del cfg
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise DataError(f"jobs: must be a positive integer, got {jobs!r}")
    report = validate(annotations, images, strict=strict)
    records = report.dataset["images"]
    wanted = [(record["file_name"], record["width"], record["height"]) for record in records]
    if (found := _first_problem(Path(images), wanted, jobs)) is not None:
        record = records[found[0]]
        raise DataError(f"{report.path}: image id {record['id']} ({record['file_name']}): {found[1]}")
    print(report.summary())
    return report
