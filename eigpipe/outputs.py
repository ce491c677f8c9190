"""What a stage may write over: every output path is claimed before any work.

A stage replaces only its own earlier output, recognised as such (a store's ``kind``, a table's columns, an
evaluation's keys, a checkpoint's ``format``, a report folder's marker); anything else at the path (a folder
of the user's files, a file of another kind) is refused in one line and left untouched. No output may be one
of the stage's inputs, or a folder holding one, whether given explicitly or derived as a default path.

Recognisers read only headers and metadata (a zarr.json, a parquet schema, a CSV header line, the pickle of
a torch archive, which is scanned and never executed), so a claim costs milliseconds and imports no torch.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import pickletools
import re
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from eigpipe.errors import EigpipeError
from eigpipe.provenance import check_writable, is_temp


@dataclass(frozen=True)
class Kind:
    """An artifact kind a stage writes: ``description`` reads "<path> exists and is not <description>"."""

    description: str
    recognise: Callable[[Path], bool]
    folder: bool = False

    def is_own(self, path: Path) -> bool:
        """Whether ``path`` (which exists) is an earlier output of this kind; an empty folder of a folder kind
        counts (nothing in it can be lost; Snakemake creates output folders before a job)."""
        if path.is_dir() != self.folder:
            return False
        if self.folder and not any(path.iterdir()):
            return True
        try:
            return bool(self.recognise(path))
        except Exception:  # a recogniser that cannot read the path does not recognise it
            return False


def resolved(path: Path) -> Path:
    """``path`` made absolute with every symbolic link followed; one line for a link that loops (``ln -s a a``),
    on which pathlib raises RuntimeError (Python 3.11) or OSError ELOOP."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno != errno.ELOOP:
            raise
        raise EigpipeError(
            f"{path}: a symbolic link that loops (the path or a folder above it points back to itself); "
            "remove or fix the link"
        ) from None


def _overlap(output: Path, source: Path, whole: bool = False) -> str | None:
    """How ``output`` would destroy or change ``source``: it is the same path, a folder holding it, or inside it (a
    zarr store, or a folder whose every file is read: ``whole``); else None."""
    out, src = resolved(output), resolved(source)
    if out == src or (output.exists() and source.exists() and os.path.samefile(output, source)):
        return "is"
    if out in src.parents:
        return "is a folder holding"
    if src in out.parents and (whole or (source / "zarr.json").is_file()):  # it would change that input
        return "is inside"
    return None


def refuse_inputs(
    output: str | Path, inputs: Iterable[str | Path | None], read_whole: Iterable[str | Path] = ()
) -> None:
    """An EigpipeError when ``output`` is one of ``inputs`` or a folder that holds one, or lies inside one of the
    ``read_whole`` folders (every file of which the stage reads: an image folder)."""
    sources = [(source, False) for source in inputs] + [(folder, True) for folder in read_whole]
    for source, whole in sources:
        if source is not None and (how := _overlap(Path(output), Path(source), whole)):
            raise EigpipeError(f"{output}: {how} the input {source}; an output never replaces or changes an input")


def claim_outputs(
    *outputs: tuple[str | Path, Kind], inputs: Iterable[str | Path | None] = (), read_whole: Iterable[Path] = ()
) -> None:
    """Check, before any work, that each (output path, kind) may be written: the path is no input (nor a folder
    holding one) and no other output's, its folder is writable, and what exists there is this kind's own output."""
    inputs = list(inputs)
    seen: dict[Path, Path] = {}
    for output, kind in outputs:
        path = Path(output)
        refuse_inputs(path, inputs, read_whole)
        if (other := seen.get(resolved(path))) is not None:
            raise EigpipeError(f"{path}: given for two outputs (also as {other}); each output needs its own path")
        seen[resolved(path)] = path
        check_writable(path)
        if path.is_symlink() and not path.exists():
            raise EigpipeError(f"{path}: a symbolic link to {os.readlink(path)}, which does not exist; remove it")
        if (path.exists() or path.is_symlink()) and not kind.is_own(path):
            raise EigpipeError(
                f"{path}: exists and is not {kind.description}; eigpipe replaces only its own earlier output "
                "(move it away or choose another path)"
            )


# ---- recognisers, by artifact format ----------------------------------------------------------------------


def zarr_kind(path: Path) -> str | None:
    """The ``kind`` root attribute of a zarr v3 group (read from its zarr.json), or None."""
    meta = json.loads((path / "zarr.json").read_text())
    return meta.get("attributes", {}).get("kind") if isinstance(meta, dict) else None


def table_columns(path: Path) -> list[str]:
    """Column names of a CSV (its header line) or parquet file (its schema)."""
    if path.suffix == ".csv":
        with path.open(newline="") as handle:
            return next(csv.reader(handle), [])
    import pyarrow.parquet as pq

    return list(pq.read_schema(path).names)


def json_keys(path: Path) -> set[str]:
    record = json.loads(path.read_text())
    return set(record) if isinstance(record, dict) else set()


def torch_archive_strings(path: Path) -> set[str]:
    """The strings in a torch.save archive's pickle (keys and plain values), read without unpickling."""
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
        data = archive.read(name)
    return {arg for _, arg, _ in pickletools.genops(data) if isinstance(arg, str)}


def only_files(folder: Path, pattern: re.Pattern[str]) -> bool:
    """Whether every file under ``folder`` (its path relative to it) is one ``pattern`` names: a user's file put
    into an output folder is never deleted with it (temp litter of killed publications aside). A symbolic link
    inside is never an output's (writing through it would reach the user's files), so it makes the folder foreign."""
    entries = list(folder.rglob("*"))
    if any(entry.is_symlink() for entry in entries):
        return False
    files = (f for f in entries if not f.is_dir() and not is_temp(f.name))
    return all(pattern.fullmatch(f.relative_to(folder).as_posix()) for f in files)


ZARR_FILES = re.compile(r"(.+/)?zarr\.json|.+/c(/\d+)+")  # zarr v3: metadata of every node, chunks under c/


def stores_of(kind_attr: str, description: str) -> Kind:
    return Kind(description, lambda path: zarr_kind(path) == kind_attr and only_files(path, ZARR_FILES), folder=True)


def tables_with(columns: Iterable[str], description: str) -> Kind:
    wanted = set(columns)
    return Kind(description, lambda path: wanted <= set(table_columns(path)))


def json_with(keys: Iterable[str], description: str) -> Kind:
    wanted = set(keys)
    return Kind(description, lambda path: wanted <= json_keys(path))
