"""The comparison of baseline and derived-width detectors: one row per model (mean and spread over seeds) with
params, MACs, AP and deltas against the scratch baseline, as CSV and Markdown."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from eigpipe.config import read_yaml
from eigpipe.errors import EigpipeError
from eigpipe.runs import group_of

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
COSTS = ("body_params", "detector_params", "body_macs", "detector_macs")
DERIVATION_KEYS = ("layers", "measure", "alpha", "body")  # what the widths figure draws
LAYER_KEYS = ("name", "original", "derived", "d")


def _evaluation(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EigpipeError(f"{path}: not a readable evaluation JSON ({type(exc).__name__})") from None
    if not isinstance(record, dict) or "bbox" not in record or "complexity" not in record:
        raise EigpipeError(f"{path}: an evaluation JSON needs 'bbox' and 'complexity'")
    needed = {
        "": ("run", "model_name"),
        "complexity": ("input_size", *COSTS),
        "bbox": METRICS,
        **({"segm": METRICS} if "segm" in record else {}),
    }
    for section, keys in needed.items():
        where = record[section] if section else record
        missing = [key for key in keys if not isinstance(where, dict) or key not in where]
        if missing:
            key = f"{section}.{missing[0]}" if section else missing[0]
            raise EigpipeError(f"{path}: the evaluation JSON has no {key!r} (not written by eigpipe evaluate?)")
        if section in ("complexity", "bbox", "segm"):
            numbers = [key for key in keys if key != "input_size"]
            if wrong := next((key for key in numbers if not _number(where[key])), None):
                raise EigpipeError(f"{path}: {section}.{wrong} is {where[wrong]!r}, not a number")
    return record


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _row(record: dict[str, Any]) -> dict[str, Any]:
    widths = record.get("widths")
    row = {
        "model": group_of(str(record["run"])),
        "detector": record["model_name"],
        "init": record.get("init"),
        "widths_source": Path(widths).stem if widths else "configured",
        "seed": record.get("seed"),
        "input_size": "x".join(map(str, record["complexity"]["input_size"])),
        **{cost: record["complexity"][cost] for cost in COSTS},
        **{metric: record["bbox"][metric] for metric in METRICS},
    }
    if "segm" in record:
        row.update({f"segm_{metric}": record["segm"][metric] for metric in METRICS})
    return row


def run_table(evaluations: Sequence[Path]) -> pd.DataFrame:
    """One row per evaluated run (its model, i.e. the run name without a seed suffix, and seed), costs and AP."""
    runs = pd.DataFrame([{"run": str(record["run"]), **_row(record)} for record in map(_evaluation, evaluations)])
    if runs.empty:
        raise EigpipeError("report: no evaluations to compare")
    return runs


def comparison_table(evaluations: Sequence[Path]) -> pd.DataFrame:
    """One row per model: costs, mean AP over its seeds (min/max when several), deltas against the
    scratch baseline of the same detector (``<detector>-scratch``). A Mask R-CNN's detector MACs depend on its
    detections (the mask head runs on each), so they differ by seed: the row gives their mean."""
    runs = run_table(evaluations).drop(columns="run")
    metrics = [c for c in runs.columns if c in METRICS or c.startswith("segm_")]
    keys = ["model", "detector", "init", "widths_source", "input_size", *(c for c in COSTS if c != "detector_macs")]
    grouped = runs.groupby(keys, sort=False, dropna=False)
    table = grouped[["detector_macs", *metrics]].mean().reset_index()
    table = table[[*keys[:5], *COSTS, *metrics]]
    table.insert(4, "seeds", grouped["seed"].apply(lambda s: " ".join(map(str, sorted(s)))).to_numpy())
    if grouped.size().max() > 1:
        for metric in ("AP", "segm_AP"):
            if metric in metrics:
                table[f"{metric}_min"] = grouped[metric].min().to_numpy()
                table[f"{metric}_max"] = grouped[metric].max().to_numpy()
    return _with_deltas(table, metrics)


def _with_deltas(table: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    baselines = table.set_index("model")
    for column in ("delta_AP", "delta_segm_AP", "body_params_ratio", "body_macs_ratio", "detector_params_ratio"):
        table[column] = np.nan
    for i, row in table.iterrows():
        base = f"{row['detector']}-scratch"
        if base not in baselines.index:
            continue
        reference = baselines.loc[base]
        table.loc[i, "delta_AP"] = row["AP"] - reference["AP"]
        if "segm_AP" in metrics and pd.notna(row.get("segm_AP")):
            table.loc[i, "delta_segm_AP"] = row["segm_AP"] - reference["segm_AP"]
        for cost in ("body_params", "body_macs", "detector_params"):
            table.loc[i, f"{cost}_ratio"] = row[cost] / reference[cost]
    return table.dropna(axis=1, how="all")


def with_intervals(table: pd.DataFrame, models: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """The table with each model's intervals (uncertainty.model_intervals) and, for its delta against the scratch
    baseline, the pairing of seeds and the intervals of that comparison (uncertainty.comparisons)."""
    table = table.join(models, on="model")
    if pairs.empty:
        return table
    baseline = table.set_index("model")["detector"] + "-scratch"
    against_base = pairs[pairs["reference"] == pairs["model"].map(baseline)]
    for metric in ("AP", "segm_AP"):
        rows = against_base[against_base["metric"] == metric].set_index("model")
        for column in ("pairing", "sd", "seeds_low", "seeds_high", "images_low", "images_high", "low", "high"):
            if column in rows:
                table[f"delta_{metric}_{column}"] = table["model"].map(rows[column])
    return table.dropna(axis=1, how="all")


def markdown(table: pd.DataFrame) -> str:
    """The table as GitHub Markdown: millions of params, GMACs, AP to three decimals, signed deltas."""

    def cell(column: str, value: Any) -> str:
        if isinstance(value, float) and np.isnan(value):
            return ""
        if column.endswith("params"):
            return f"{value / 1e6:.3f}M"
        if column.endswith("macs"):
            return f"{value / 1e9:.3f}G"
        if isinstance(value, float) and value < 0 and not column.startswith("delta_"):
            return "n/a"  # COCOeval's -1: no ground truth of that size
        if column.startswith("delta_"):
            return f"{value:+.3f}"
        if column.endswith("_ratio"):
            return f"{value:.3f}x"
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(c, v) for c, v in row.items()) + " |" for _, row in table.iterrows()]
    return "\n".join(lines) + "\n"


def _derivation_problem(record: dict) -> str | None:
    """The first key the widths figure needs that a derivation record lacks, or None."""
    missing = [key for key in DERIVATION_KEYS if key not in record]
    if missing:
        return missing[0]
    layers = record["layers"]
    if not (isinstance(layers, list) and all(isinstance(layer, dict) for layer in layers)):
        return "layers"
    missing = [f"layers.{key}" for key in LAYER_KEYS if any(key not in layer for layer in layers)]
    if missing:
        return missing[0]
    ratio = record["body"].get("ratio") if isinstance(record["body"], dict) else None
    return None if isinstance(ratio, dict) and {"params", "macs"} <= set(ratio) else "body.ratio"


def read_derivations(paths: Sequence[Path]) -> dict[str, dict]:
    """{spec name: derivation record} of derived widths YAMLs."""
    found = {}
    for path in paths:
        data = read_yaml(path, "widths spec")
        if not isinstance(data, dict) or not isinstance(data.get("derivation"), dict):
            raise EigpipeError(f"{path}: a derived widths spec needs its 'derivation' record")
        if (problem := _derivation_problem(data["derivation"])) is not None:
            raise EigpipeError(f"{path}: the derivation record has no {problem!r} (not written by eigpipe widths?)")
        found[Path(path).stem] = data["derivation"]
    return found
