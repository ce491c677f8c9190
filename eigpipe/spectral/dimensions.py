"""The ``eigpipe dimensions`` stage: every snapshot's spectrum table of one run in one dimensions table."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from eigpipe.errors import EigpipeError
from eigpipe.outputs import Kind, claim_outputs, table_columns
from eigpipe.provenance import write_table
from eigpipe.spectral.spectrum import TABLE_COLUMNS

DIMENSIONS_TABLE = Kind(
    "an eigpipe dimensions table", lambda path: {*TABLE_COLUMNS, "source"} <= set(table_columns(path))
)
# the columns that identify a row: none may be missing or empty, and iterations are whole numbers
KEY_COLUMNS = ("run", "iteration", "layer")


def _one_line(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}"


def read_table(path: str | Path, columns: Sequence[str] = KEY_COLUMNS) -> pd.DataFrame:
    """A parquet or CSV table (by suffix) with ``columns``; one-line errors naming the file for a missing or
    unreadable file (a CSV named .parquet), a missing column, or a missing value or fractional iteration in a
    key column (run, iteration, layer)."""
    path = Path(path)
    if not path.is_file():
        raise EigpipeError(f"{path}: table not found")
    try:
        table = pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)
    except Exception as exc:  # pyarrow and pandas raise many types for damaged files
        kind = "CSV" if path.suffix == ".csv" else "parquet"
        raise EigpipeError(f"{path}: not a readable {kind} table ({_one_line(exc)})") from None
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise EigpipeError(f"{path}: no column {', '.join(missing)} (not a spectrum or dimensions table?)")
    if table.empty:
        raise EigpipeError(f"{path}: the table has no rows")
    for column in (c for c in KEY_COLUMNS if c in table.columns):
        empty = table[column].isna()
        if empty.any():
            raise EigpipeError(f"{path}: column {column} has a missing value (row {int(empty.to_numpy().argmax())})")
    if "iteration" in table.columns:
        try:
            whole = pd.to_numeric(table["iteration"]).map(float).map(float.is_integer)
        except (TypeError, ValueError):
            whole = pd.Series([False] * len(table))
        if not whole.all():
            row = int((~whole).to_numpy().argmax())
            raise EigpipeError(f"{path}: iteration {table['iteration'].iloc[row]} is not a whole number (row {row})")
        table["iteration"] = table["iteration"].astype("int64")
    return table


def dimensions(cfg: dict, spectra: Sequence[Path], out: Path) -> pd.DataFrame:
    """All snapshots' spectrum tables of one run in one table, by (iteration, forward_index)."""
    claim_outputs((out, DIMENSIONS_TABLE), inputs=spectra)
    if not spectra:
        raise EigpipeError("dimensions: no spectrum tables given")
    frames = []
    for path in spectra:
        frame = read_table(path, (*TABLE_COLUMNS, "forward_index"))
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
