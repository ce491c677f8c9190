"""The report's per-run tables: spectra summary (final snapshots) and every evaluation JSON flattened."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from eigpipe.errors import EigpipeError
from eigpipe.report.inputs import role, run_key


def spectra_table(finals: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for run, group in sorted(finals.groupby("run"), key=lambda kv: run_key(kv[0])):
        first = group.iloc[0]
        ratio = group["intrinsic_dim"] / group["channels"]
        row = {
            "run": run,
            "role": role(run, first.get("init"), first.get("task")),
            "init": first.get("init"),
            "model_name": first.get("model_name"),
            "iteration": int(first["iteration"]),
            "layers": len(group),
            "channels_total": int(group["channels"].sum()),
            "intrinsic_dim_total": int(group["intrinsic_dim"].sum()),
            "intrinsic_dim_ratio_mean": float(ratio.mean()),
            "intrinsic_dim_ratio_median": float(ratio.median()),
        }
        for column in ("soft_dof", "effective_rank", "centered_intrinsic_dim_ratio"):
            if column in group.columns:
                row[f"{column}_mean"] = float(group[column].mean())
        if "n_negative_clipped" in group.columns:
            row["n_negative_clipped_total"] = int(group["n_negative_clipped"].sum())
        rows.append(row)
    return pd.DataFrame(rows)


def _flatten(record: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}_"))
        elif isinstance(value, str | int | float | bool) or value is None:
            flat[name] = value
    return flat


def evaluation_table(paths: Sequence[str | Path]) -> pd.DataFrame:
    """One row per evaluation JSON (AP metrics, params, MACs, ...), nested keys joined by '_'."""
    rows = []
    for path in paths:
        path = Path(path)
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise EigpipeError(f"{path}: not a readable evaluation JSON ({exc})") from None
        if not isinstance(record, dict):
            raise EigpipeError(f"{path}: an evaluation JSON must be an object")
        rows.append({"run": record.get("run", path.stem), **_flatten(record), "source": str(path)})
    table = pd.DataFrame(rows)
    return table.sort_values("run", key=lambda s: s.map(run_key)).reset_index(drop=True)
