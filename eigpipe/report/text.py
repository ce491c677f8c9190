"""summary.md: the comparison table, how sure each number is (AP over seeds and images, the pre-trained vs
scratch d/C per stage and layer kind), and one verdict line per comparison at the end."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from eigpipe.report.comparison import markdown


def _interval(row: Any, prefix: str, signed: bool) -> str:
    low, high = row.get(f"{prefix}low"), row.get(f"{prefix}high")
    if low is None or high is None or (isinstance(low, float) and math.isnan(low)):
        return ""
    form = "{:+.3f}" if signed else "{:.3f}"
    return f"[{form.format(low)}, {form.format(high)}]"


def _number(value: Any, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *["| " + " | ".join(r) + " |" for r in rows]]


def _models(table: pd.DataFrame) -> list[str]:
    header = ["model", "seeds", "AP", "sd over seeds", "95% CI over seeds", "over images", "both"]
    rows = []
    for _, row in table.iterrows():
        for metric in ("AP", "segm_AP"):
            if metric in row and not pd.isna(row[metric]):
                name = row["model"] + (" (segm)" if metric == "segm_AP" else "")
                cells = [_interval(row, f"{metric}_{part}", False) for part in ("seeds_", "images_", "")]
                rows.append([name, str(row["seeds"]), _number(row[metric]), _number(row.get(f"{metric}_sd")), *cells])
    return _table(header, rows)


def _pairs(pairs: pd.DataFrame) -> list[str]:
    header = ["comparison", "AP difference", "seeds", "95% CI over seeds", "over images", "both"]
    rows = []
    for _, row in pairs.iterrows():
        metric = "" if row["metric"] == "AP" else " (segm)"
        seeds = f"{row['seeds']} {row['pairing']}".strip()
        cells = [_interval(row, part, True) for part in ("seeds_", "images_", "")]
        rows.append([f"{row['model']} vs {row['reference']}{metric}", _number(row["difference"], True), seeds, *cells])
    return _table(header, rows)


def _dimensions(diffs: pd.DataFrame) -> list[str]:
    header = ["detector", "stage", "kind", "layers", "pretrained", "scratch", "difference", "seeds"]
    header += ["95% CI over seeds", "over images", "both"]
    rows = []
    for _, row in diffs.iterrows():
        seeds = f"{row['seeds']} {row['pairing']}".strip()
        cells = [_interval(row, part, True) for part in ("seeds_", "images_", "")]
        numbers = [_number(row["pretrained"]), _number(row["scratch"]), _number(row["difference"], True)]
        rows.append([row["detector"], row["stage"], row["kind"], str(row["layers"]), *numbers, seeds, *cells])
    return _table(header, rows)


def _main(main: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """The comparison table with, beside AP and delta_AP, the sd and 95% interval over seeds and the pairing."""
    shown = main.copy()
    extra = table.set_index("model")
    for metric in ("AP", "delta_AP"):
        if f"{metric}_seeds_low" not in extra or metric not in shown:
            continue
        at = list(shown.columns).index(metric) + 1
        rows = [extra.loc[m] for m in shown["model"]]
        label = "AP" if metric == "AP" else "delta"  # (markdown() formats the columns named delta_*)
        columns = {
            f"{label} sd": [_number(r.get(f"{metric}_sd")) for r in rows],
            f"{label} 95% CI over seeds": [_interval(r, f"{metric}_seeds_", metric != "AP") for r in rows],
        }
        if metric == "delta_AP":
            columns["seeds_paired"] = [
                r.get("delta_AP_pairing") if isinstance(r.get("delta_AP_pairing"), str) else "" for r in rows
            ]
        for offset, (name, values) in enumerate(columns.items()):
            shown.insert(at + offset, name, values)
    return shown


def summary(
    main: pd.DataFrame, table: pd.DataFrame, pairs: pd.DataFrame, diffs: pd.DataFrame, cfg: dict, n_images: int
) -> str:
    """The whole of summary.md; ``main`` is the comparison table without intervals, ``table`` with them."""
    boot = cfg["bootstrap"]
    over_images = (
        f"the percentile bootstrap over the {n_images} validation images ({boot['resamples']} resamples, seed "
        f"{boot['seed']}; the same resamples for every model, so a difference is paired by image)"
        if n_images
        else "not measured (no per-image matching given)"
    )
    lines = [markdown(_main(main, table)).rstrip("\n"), "", "## How sure: AP over seeds and validation images", ""]
    lines += [
        "95% intervals. Over seeds: Student's t on the per-seed values (differences paired by seed where both "
        f"models have the same seeds, Welch's interval otherwise). Over images: {over_images}. Both: the variances "
        "of the two add, with Welch-Satterthwaite degrees of freedom.",
        "",
        *_models(table),
        "",
    ]
    if not pairs.empty:
        lines += [*_pairs(pairs), ""]
    if not diffs.empty:
        lines += ["## Pre-trained vs scratch: mean d/C per stage and layer kind (final models)", ""]
        lines += [
            "d/C: eigenvalues of the second moment above spectrum.threshold, over channels, averaged over the "
            "stage's layers of that kind. Over images: the jackknife over the covariance stores' folds of images "
            "(t with folds - 1 degrees of freedom; none without covariance.folds).",
            "",
            *_dimensions(diffs),
            "",
        ]
    verdicts = [row["verdict"] for _, row in pairs.iterrows() if isinstance(row.get("verdict"), str)]
    lines += [f"## Verdicts (95% intervals over seeds and images; margin {cfg['margin']:.3f} AP)", ""]
    lines += [f"- {line}" for line in verdicts] or ["- no two models of one detector with an interval to judge"]
    return "\n".join(lines) + "\n"
