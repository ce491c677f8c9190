"""The study's first finding with error bars: per detector, ResNet stage (s1-s4) and layer kind, the difference
of the mean d/C (the paper's intrinsic dimension over channels) between the pre-trained-init and the scratch final
models, with its interval over seeds (replicate runs <run>-s<seed>) and over images (the jackknife over the
covariance stores' folds of images, covariance.folds), and both together.

Every fold leaves the same images out of every model (the stores of one study use the same images), so the
jackknife of the difference is paired by image; seeds pair by their run-name suffix.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from eigpipe import intervals
from eigpipe.errors import EigpipeError
from eigpipe.layer_paths import canonical
from eigpipe.report.uncertainty import seed_interval
from eigpipe.runs import SEED_SUFFIX, group_of
from eigpipe.spectral.jackknife import JACKKNIFE_ARRAYS
from eigpipe.spectral.spectrum import intrinsic_dim_ratio

KINDS = ("conv1", "conv2", "conv3", "downsample", "block output")
LAYER = re.compile(r"layer(?P<stage>[1-4])\.\d+(?:\.(?P<part>conv[123]|downsample\.0))?")
JACKKNIFE = JACKKNIFE_ARRAYS["second_moment"]
COLUMNS = ["detector", "stage", "kind", "layers", "pretrained", "scratch", "difference", "pairing", "seeds", "sd"]
COLUMNS += ["seeds_low", "seeds_high", "folds", "images_low", "images_high", "low", "high"]


def stage_kind(canonical: str) -> tuple[str, str] | None:
    """('s<stage>', kind) of a ResNet body layer (canonical name); None for the stem, FPN and head layers."""
    found = LAYER.fullmatch(canonical)
    if found is None:
        return None
    part = found["part"] or "block output"
    return f"s{found['stage']}", "downsample" if part.startswith("downsample") else part


def _ratio(values: np.ndarray, spectrum_cfg: dict) -> float:
    return intrinsic_dim_ratio(values, spectrum_cfg["threshold"])


def run_ratios(attrs: dict, layers: dict) -> pd.DataFrame:
    """One row per (stage, kind) of a run's final eigenvalue store: mean d/C over its layers, and the same mean
    without each fold of images (a list, empty without folds)."""
    cfg = attrs.get("spectrum")
    if not isinstance(cfg, dict) or "threshold" not in cfg:
        raise EigpipeError(f"eigenvalue store of run {attrs.get('run')}: no spectrum settings (threshold) recorded")
    rows = []
    for name, (arrays, _layer_attrs) in layers.items():
        where = stage_kind(canonical(name))
        if where is None:
            continue
        loo = arrays.get(JACKKNIFE)
        rows.append(
            {
                "stage": where[0],
                "kind": where[1],
                "ratio": _ratio(arrays["second_moment"], cfg),
                "loo": [] if loo is None else [_ratio(v, cfg) for v in loo],
            }
        )
    if not rows:
        return pd.DataFrame(columns=["stage", "kind", "layers", "ratio", "loo"])
    table = pd.DataFrame(rows)
    grouped = table.groupby(["stage", "kind"], sort=False)
    out = grouped["ratio"].agg(["size", "mean"]).rename(columns={"size": "layers", "mean": "ratio"})
    out["loo"] = grouped["loo"].apply(
        lambda col: np.mean(np.stack(list(col)), axis=0).tolist() if len(col.iloc[0]) else []
    )
    return out.reset_index()


def differences(stores: dict[str, tuple[dict, dict]]) -> pd.DataFrame:
    """Pre-trained minus scratch mean d/C per detector, stage and kind, with intervals (see the module docstring).
    ``stores``: {run: (root attrs, layers)} of final eigenvalue stores, replicates included."""
    ratios: dict[str, dict[str, dict[str, pd.DataFrame]]] = {}  # detector -> init -> seed label -> table
    for run, (attrs, layers) in stores.items():
        group = group_of(run)
        detector, _, init = group.rpartition("-")
        if init not in ("pretrained", "scratch") or not detector:
            continue
        suffix = SEED_SUFFIX.search(run)
        label = int(suffix.group(1)) if suffix else -1  # -1: the study seed
        ratios.setdefault(detector, {}).setdefault(init, {})[label] = run_ratios(attrs, layers).set_index(
            ["stage", "kind"]
        )
    rows = []
    for detector, by_init in ratios.items():
        if set(by_init) != {"pretrained", "scratch"}:
            continue
        first = next(iter(by_init["scratch"].values()))
        for key in sorted(first.index, key=lambda k: (k[0], KINDS.index(k[1]))):
            rows.append({"detector": detector, "stage": key[0], "kind": key[1], **_difference(by_init, key)})
    return pd.DataFrame(rows, columns=COLUMNS).dropna(axis=1, how="all") if rows else pd.DataFrame(columns=COLUMNS)


def _difference(by_init: dict[str, dict[int, pd.DataFrame]], key: tuple[str, str]) -> dict:
    values = {
        init: pd.Series({label: float(t.loc[key, "ratio"]) for label, t in runs.items()}).sort_index()
        for init, runs in by_init.items()
    }
    estimate = float(values["pretrained"].mean() - values["scratch"].mean())
    seeds, pairing = seed_interval(values["pretrained"], values["scratch"])
    row = {
        "layers": int(next(iter(by_init["scratch"].values())).loc[key, "layers"]),
        "pretrained": float(values["pretrained"].mean()),
        "scratch": float(values["scratch"].mean()),
        "difference": estimate,
        "pairing": pairing,
        "seeds": f"{len(values['pretrained'])}/{len(values['scratch'])}",
    }
    if seeds:
        row.update(sd=seeds.sd, seeds_low=seeds.low, seeds_high=seeds.high)
    loo = {init: [t.loc[key, "loo"] for t in runs.values()] for init, runs in by_init.items()}
    folds = {len(v) for lists in loo.values() for v in lists}
    images = None
    if len(folds) == 1 and min(folds) >= 2:
        k = folds.pop()
        paired = np.mean(loo["pretrained"], axis=0) - np.mean(loo["scratch"], axis=0)  # [K] fold k left out of all
        se = float(intervals.jackknife_se(paired))
        images = intervals.t_interval(estimate, se, k - 1)
        row.update(folds=k, images_low=images.low, images_high=images.high)
    both = intervals.combined(estimate, seeds, images.se, images.df) if images else seeds
    if both is not None:
        row.update(low=both.low, high=both.high)
    return row
