"""The report's figures, built with matplotlib's object API (``Figure``, rendered by Agg), never through pyplot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from eigpipe.provenance import publish
from eigpipe.report.inputs import role, run_key


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


def plot_dimensions(finals: pd.DataFrame, order: Sequence[str], style: dict, path: Path) -> Path:
    """Intrinsic dimensionality (and its share of channels) per layer in forward order, a line per model."""
    fig = Figure(figsize=(max(8.0, 0.16 * len(order)), 7), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    position = {name: i for i, name in enumerate(order)}
    for run, rows in sorted(finals.groupby("run"), key=lambda kv: run_key(kv[0])):
        rows = rows.assign(x=rows["canonical"].map(position)).sort_values("x")
        top.plot(rows["x"], rows["intrinsic_dim"], marker=".", ms=3, **style[run])
        bottom.plot(rows["x"], rows["intrinsic_dim"] / rows["channels"], marker=".", ms=3, **style[run])
    top.set_ylabel("intrinsic dimensionality")
    top.set_yscale("log")
    bottom.set_ylabel("share of channels")
    bottom.set_ylim(0, 1.05)
    bottom.set_xticks(range(len(order)))
    bottom.set_xticklabels(order, rotation=90, fontsize=6)
    top.legend(fontsize=8)
    top.set_title("Intrinsic dimensionality per layer (final snapshots)")
    return save_png(fig, path)


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
