"""The ``eigpipe dimensions`` stage: every snapshot's spectrum table of one run in one dimensions table."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from eigpipe.errors import EigpipeError
from eigpipe.provenance import check_writable, write_table


def read_table(path: str | Path) -> pd.DataFrame:
    """A parquet or CSV table (by suffix); one-line errors for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise EigpipeError(f"{path}: table not found")
    try:
        return pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)
    except Exception as exc:  # pyarrow and pandas raise many types for damaged files
        raise EigpipeError(f"{path}: not a readable table ({type(exc).__name__}: {exc})") from None


def dimensions(cfg: dict, spectra: Sequence[Path], out: Path) -> pd.DataFrame:
    """All snapshots' spectrum tables of one run in one table, by (iteration, forward_index)."""
    check_writable(out)
    if not spectra:
        raise EigpipeError("dimensions: no spectrum tables given")
    frames = []
    for path in spectra:
        frame = read_table(path)
        frame["source"] = str(path)
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    runs = sorted(map(str, table["run"].unique()))
    if len(runs) > 1:
        raise EigpipeError(f"dimensions: the tables hold runs {', '.join(runs)}; a dimensions table is of one run")
    duplicated = table.duplicated(subset=["iteration", "layer"], keep=False)
    if duplicated.any():
        first = table[duplicated].iloc[0]
        raise EigpipeError(
            f"dimensions: run {first['run']} iteration {first['iteration']} layer {first['layer']} "
            f"appears in more than one table ({', '.join(sorted(set(table[duplicated]['source'])))})"
        )
    table = table.sort_values(["iteration", "forward_index"], kind="stable").reset_index(drop=True)
    write_table(out, table)
    return table
