"""How sure each AP number of the comparison is: over training seeds (t-intervals, differences paired by seed
where the seeds pair, Welch otherwise), over validation images (a bootstrap that re-accumulates pycocotools'
per-image matching, the same resamples for every model, so differences are paired by image), and both together;
and the verdict in words for every comparison of two models of one detector."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from eigpipe import intervals, matching
from eigpipe.errors import EigpipeError
from eigpipe.intervals import Interval

METRICS = {"AP": "bbox", "segm_AP": "segm"}  # table column: IoU type of the matching file
PAIRED, UNPAIRED, ONE_SEED = "paired by seed", "unpaired (Welch)", "one seed"


def bootstrap_runs(paths: Sequence[Path], cfg: dict) -> tuple[dict[str, dict[str, np.ndarray]], int]:
    """({run: {metric: [B] AP per resample}}, images) from matching files, every run on the same resamples."""
    found: dict[str, dict[str, matching.Matches]] = {}
    reference: tuple[Path, np.ndarray] | None = None
    for path in paths:
        meta, by_type = matching.read(path)
        images = by_type["bbox"].image_ids
        if reference is None:
            reference = (Path(path), images)
        elif not np.array_equal(images, reference[1]):
            raise EigpipeError(f"{path}: evaluated other images than {reference[0]}; a paired bootstrap needs the same")
        found[meta["run"]] = by_type
    if reference is None:
        return {}, 0
    samples = matching.resamples(len(reference[1]), cfg["resamples"], cfg["seed"])
    boot = {
        run: {
            metric: matching.bootstrap(by_type[iou], samples)["AP"] for metric, iou in METRICS.items() if iou in by_type
        }
        for run, by_type in found.items()
    }
    return boot, len(reference[1])


def _per_seed(runs: pd.DataFrame, model: str, metric: str) -> pd.Series:
    if metric not in runs:
        return pd.Series(dtype=float)
    rows = runs[(runs["model"] == model) & runs[metric].notna()]
    return pd.Series(rows[metric].to_numpy(dtype=float), index=rows["seed"].to_numpy(), dtype=float).sort_index()


def _images(runs: pd.DataFrame, boot: dict, model: str, metric: str) -> np.ndarray | None:
    """[B] mean over the model's seeds of each resample's AP (None without every run's matching)."""
    names = runs.loc[runs["model"] == model, "run"]
    samples = [boot.get(name, {}).get(metric) for name in names]
    return None if not samples or any(s is None for s in samples) else np.mean(samples, axis=0)


def seed_interval(values: pd.Series, reference: pd.Series | None = None) -> tuple[Interval | None, str]:
    """Over seeds: the t-interval of a mean, or of a difference to ``reference``: paired by seed when both have the
    same seeds (two or more), Welch's unpaired interval when both have two or more otherwise."""
    if reference is None:
        return (intervals.mean_interval(values) if len(values) >= 2 else None), ""
    if len(values) >= 2 and list(values.index) == list(reference.index):
        return intervals.paired_interval(values.to_numpy(), reference.to_numpy()), PAIRED
    if len(values) >= 2 and len(reference) >= 2:
        return intervals.welch_interval(values.to_numpy(), reference.to_numpy()), UNPAIRED
    return None, ONE_SEED


def _columns(prefix: str, estimate: float, seeds: Interval | None, boot: np.ndarray | None, n_images: int) -> dict:
    """{prefix_sd, _seeds_low/high, _images_low/high, _low/high}: over seeds, over images, both."""
    row = {f"{prefix}_sd": seeds.sd if seeds else math.nan}
    row.update({f"{prefix}_seeds_low": seeds.low, f"{prefix}_seeds_high": seeds.high} if seeds else {})
    if boot is not None:
        images = intervals.percentile_interval(estimate, boot)
        both = intervals.combined(estimate, seeds, images.se, n_images - 1)
        row.update({f"{prefix}_images_low": images.low, f"{prefix}_images_high": images.high})
        row.update({f"{prefix}_low": both.low, f"{prefix}_high": both.high})
    elif seeds:
        row.update({f"{prefix}_low": seeds.low, f"{prefix}_high": seeds.high})
    return row


def model_intervals(runs: pd.DataFrame, boot: dict, n_images: int) -> pd.DataFrame:
    """Per model (index): each metric's sd and intervals over seeds, over images and both."""
    rows = {}
    for model in dict.fromkeys(runs["model"]):
        row: dict = {}
        for metric in METRICS:
            values = _per_seed(runs, model, metric)
            if len(values):
                seeds, _ = seed_interval(values)
                row.update(_columns(metric, float(values.mean()), seeds, _images(runs, boot, model, metric), n_images))
        rows[model] = row
    return pd.DataFrame.from_dict(rows, orient="index")


def _pairs(table: pd.DataFrame) -> list[tuple[str, str]]:
    """(model, reference) of every two models of one detector: against the scratch baseline first, then derived
    widths against configured ones, and otherwise later against earlier rows."""
    pairs = []
    for detector, group in table.groupby("detector", sort=False):
        models, base = list(group["model"]), f"{detector}-scratch"
        pairs += [(m, base) for m in models if base in models and m != base]
        derived = dict(zip(group["model"], group["widths_source"] != "configured", strict=True))
        others = sorted((m for m in models if m != base), key=lambda m: derived[m])  # stable: rows order otherwise
        pairs += [(b, a) for i, a in enumerate(others) for b in others[i + 1 :]]
    return pairs


def comparisons(table: pd.DataFrame, runs: pd.DataFrame, boot: dict, n_images: int, margin: float) -> pd.DataFrame:
    """One row per (model, reference, metric): the difference with its pairing and intervals, and the verdict."""
    rows = []
    for model, reference in _pairs(table):
        for metric in METRICS:
            values, base = _per_seed(runs, model, metric), _per_seed(runs, reference, metric)
            if not len(values) or not len(base):
                continue
            estimate = float(values.mean() - base.mean())
            seeds, pairing = seed_interval(values, base)
            mine, theirs = _images(runs, boot, model, metric), _images(runs, boot, reference, metric)
            diffs = mine - theirs if mine is not None and theirs is not None else None
            row = {"model": model, "reference": reference, "metric": metric, "difference": estimate}
            row |= {
                "pairing": pairing,
                "seeds": f"{len(values)}/{len(base)}",
                "images": n_images if diffs is not None else 0,
            }
            row |= {k.removeprefix("d_"): v for k, v in _columns("d", estimate, seeds, diffs, n_images).items()}
            if "low" in row:
                both = Interval(estimate, row["low"], row["high"])
                row["verdict"] = verdict(f"{model} vs {reference}", metric, both, margin, len(values), row["images"])
            rows.append(row)
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=["model", "reference", "metric", "difference"])


def verdict(label: str, metric: str, interval: Interval, margin: float, seeds: int, images: int) -> str:
    """One line: the difference, its 95% interval, what it was measured over, and whether the interval excludes
    zero and the margin."""
    low, high = interval.low, interval.high
    over = f"{seeds} seed{'s' if seeds != 1 else ''}" + (f" x {images} images" if images else "")
    if low > 0:
        zero = "excludes 0 (a real gain)"
    elif high < 0:
        zero = "excludes 0 (a real loss)"
    else:
        zero = "includes 0 (no difference shown)"
    m = f"{margin:.3f}"
    if -margin <= low and high <= margin:
        beyond = f"it lies within the +-{m} margin: equivalent at that margin"
    elif low > margin:
        beyond = f"a gain larger than the {m} margin is shown"
    elif high < -margin:
        beyond = f"a loss larger than the {m} margin is shown"
    elif low >= -margin:
        beyond = f"no loss larger than the {m} margin (a gain of up to {high:.3f} is not excluded)"
    elif high <= margin:
        beyond = f"a loss of up to {-low:.3f} is not excluded, more than the {m} margin"
    else:
        beyond = f"a loss of up to {-low:.3f} and a gain of up to {high:.3f} are not excluded: inconclusive at +-{m}"
    name = "AP" if metric == "AP" else "segm AP"
    return (
        f"{label}: {name} {interval.estimate:+.3f} [95% CI {low:+.3f}, {high:+.3f}] over {over}: the interval {zero}; "
        f"{beyond}."
    )
