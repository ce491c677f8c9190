"""The report's figures, built with matplotlib's object API (``Figure``, rendered by Agg), never through pyplot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from eigpipe import intervals
from eigpipe.provenance import publish
from eigpipe.report.inputs import role, run_key

OTHER = ("tab:blue", "tab:red", "tab:green", "tab:purple")


def save_png(fig: Figure, path: Path) -> Path:
    with publish(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def _panels(count: int, width: float = 4.0, height: float = 3.2) -> tuple[Figure, list[Axes]]:
    cols = min(count, 4) or 1
    rows = max(1, -(-count // cols))
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat[:count]


def _note(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="gray")


def plot_eigenvalues(
    spectra: dict[str, dict[str, np.ndarray]], layers: Sequence[str], style: dict, threshold: float, path: Path
) -> Path:
    """Sorted eigenvalues of the second moment (log axis), a panel per layer, a line per model."""
    fig, axes = _panels(len(layers))
    for ax, layer in zip(axes, layers, strict=True):
        drawn = 0
        for run, by_layer in spectra.items():
            values = by_layer.get(layer)
            if values is None:
                continue
            positive = values > 0
            index = np.arange(1, len(values) + 1)
            ax.plot(index[positive], values[positive], **style.get(run, {"label": run}))
            drawn += 1
        ax.axhline(threshold, color="gray", lw=0.8, ls=":", label=f"threshold {threshold:g}")
        ax.set_yscale("log")
        ax.set_title(layer, fontsize=9)
        ax.set_xlabel("eigenvalue index")
        ax.set_ylabel("eigenvalue")
        if drawn:
            ax.legend(fontsize=7)
        else:
            _note(ax, "no eigenvalue store has this layer")
    fig.suptitle("Sorted eigenvalues of the feature second moment (final models)")
    return save_png(fig, path)


def plot_dimensions(
    finals: pd.DataFrame, order: Sequence[str], style: dict, path: Path, differences: pd.DataFrame | None = None
) -> Path:
    """Intrinsic dimensionality (and its share of channels) per layer in forward order, a line per model, with its
    95% band over images where the stores had folds; below, the pre-trained minus scratch mean d/C per stage and
    layer kind with its interval over seeds and images (report.dimension_diffs)."""
    fig = Figure(figsize=(max(8.0, 0.16 * len(order)), 10), layout="constrained")
    top, bottom, diff = fig.subplots(3, 1, gridspec_kw={"height_ratios": [1, 1, 0.9]})
    position = {name: i for i, name in enumerate(order)}
    for run, rows in sorted(finals.groupby("run"), key=lambda kv: run_key(kv[0])):
        rows = rows.assign(x=rows["canonical"].map(position)).sort_values("x")
        share = rows["intrinsic_dim"] / rows["channels"]
        for ax, column, values in (
            (top, "intrinsic_dim", rows["intrinsic_dim"]),
            (bottom, "intrinsic_dim_ratio", share),
        ):
            ax.plot(rows["x"], values, marker=".", ms=3, **style[run])
            half = _band(rows, f"{column}_se")
            if half is not None:  # (the top axis is logarithmic: the band stops at half a direction)
                low = np.maximum(values - half, 0.5 if ax is top else 0.0)
                ax.fill_between(rows["x"], low, values + half, color=style[run]["color"], alpha=0.2, lw=0)
    top.set_ylabel("intrinsic dimensionality")
    top.set_yscale("log")
    bottom.set_ylabel("share of channels")
    bottom.set_ylim(0, 1.05)
    for ax in (top, bottom):
        ax.set_xticks(range(len(order)))
        ax.set_xlim(-0.5, len(order) - 0.5)
    top.set_xticklabels([])
    bottom.set_xticklabels(order, rotation=90, fontsize=6)
    top.legend(fontsize=8)
    top.set_title("Intrinsic dimensionality per layer (final snapshots; bands: 95% over images, covariance.folds)")
    _plot_differences(diff, differences)
    return save_png(fig, path)


def _band(rows: pd.DataFrame, column: str) -> np.ndarray | None:
    """Half-width of the 95% t band (folds - 1 degrees of freedom) from a jackknife SE column, or None."""
    if column not in rows or "folds" not in rows or rows[column].isna().all():
        return None
    folds = rows["folds"].fillna(2).clip(lower=2).to_numpy()
    quantiles = np.array([intervals.t_quantile(0.975, k - 1) for k in folds])
    return np.nan_to_num(rows[column].to_numpy(dtype=float)) * quantiles


def _plot_differences(ax: Axes, differences: pd.DataFrame | None) -> None:
    if differences is None or differences.empty:
        _note(ax, "no pre-trained and scratch final spectra of one detector to compare")
        ax.set_axis_off()
        return
    labels, offset = [], 0
    for i, (detector, rows) in enumerate(differences.groupby("detector", sort=False)):
        x = np.arange(offset, offset + len(rows))
        low = rows["low"] if "low" in rows else rows["difference"]
        high = rows["high"] if "high" in rows else rows["difference"]
        error = np.vstack(
            [rows["difference"] - low.fillna(rows["difference"]), high.fillna(rows["difference"]) - rows["difference"]]
        )
        ax.errorbar(
            x, rows["difference"], yerr=error, fmt="o", ms=4, capsize=3, color=OTHER[i % len(OTHER)], label=detector
        )
        labels += [f"{s} {k}" for s, k in zip(rows["stage"], rows["kind"], strict=True)]
        offset += len(rows)
    ax.axhline(0.0, color="gray", lw=0.8)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=90, fontsize=7)
    ax.set_ylabel("d/C pre-trained - scratch")
    ax.set_title("Mean d/C difference per stage and layer kind, 95% interval over seeds and images", fontsize=9)
    ax.legend(fontsize=8)


def plot_dynamics(table: pd.DataFrame, layers: Sequence[str], style: dict, path: Path) -> Path:
    """Intrinsic dimensionality of the chosen layers against training iteration, a line per run."""
    fig, axes = _panels(len(layers))
    for ax, layer in zip(axes, layers, strict=True):
        rows = table[table["canonical"] == layer]
        for run, series in sorted(rows.groupby("run"), key=lambda kv: run_key(kv[0])):
            series = series.sort_values("iteration")
            first = series.iloc[0]
            if role(run, first.get("init"), first.get("task")) == "classifier":
                # its iterations are another training's: a reference level, not a curve on this axis
                final = series.iloc[-1]["intrinsic_dim"]
                ax.axhline(final, **{**style[run], "linestyle": ":", "label": f"{run} (final)"})
                continue
            ax.plot(series["iteration"], series["intrinsic_dim"], marker="o", ms=3, **style[run])
        ax.set_title(layer, fontsize=9)
        ax.set_xlabel("iteration")
        ax.set_ylabel("intrinsic dimensionality")
        if len(rows):
            ax.legend(fontsize=7)
        else:
            _note(ax, "no run has this layer")
    fig.suptitle("Eigenspectrum dynamics: intrinsic dimensionality during training")
    return save_png(fig, path)


def plot_widths(derivations: dict[str, dict], figure: Figure) -> Figure:
    """Original vs derived width per conv (bars), the measure d that set it (dots) and, with widths.min_ratio, each
    conv's floor (dashes), a panel per spec."""
    count = max(1, len(derivations))
    axes = figure.subplots(count, 1, squeeze=False)[:, 0]
    for ax, (name, record) in zip(axes, derivations.items(), strict=False):
        layers = record["layers"]
        x = np.arange(len(layers))
        original = [layer["original"] or 0 for layer in layers]
        derived = [layer["derived"] or 0 for layer in layers]
        ax.bar(x - 0.2, original, 0.4, label="original width", color="tab:gray")
        ax.bar(x + 0.2, derived, 0.4, label="derived width", color="tab:green")
        ax.plot(x, [layer["d"] for layer in layers], "k.", ms=4, label=f"d ({record['measure']})")
        if record.get("min_ratio"):  # where the floor binds, it sets the width, not alpha x d
            floors = [layer["floor"] if layer["derived"] else np.nan for layer in layers]
            ax.plot(x + 0.2, floors, "r_", ms=6, label=f"floor (min_ratio {record['min_ratio']:g})")
        ax.set_xticks(x)
        ax.set_xticklabels([layer["name"] for layer in layers], rotation=90, fontsize=6)
        ax.set_ylabel("channels")
        body = record["body"]["ratio"]
        ax.set_title(
            f"{name}: alpha {record['alpha']:.3g}, body params x{body['params']:.2f}, MACs x{body['macs']:.2f}",
            fontsize=9,
        )
        ax.legend(fontsize=7)
    if not derivations:
        axes[0].text(0.5, 0.5, "no derived widths in this study", ha="center", va="center", color="gray")
        axes[0].set_axis_off()
    return figure
