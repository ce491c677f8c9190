"""The study's plots and tables: spectra, per-layer dimensions and their dynamics, summary and evaluation.

Runs are told apart by their name and ``init``: run "classifier" (or task classification) is the
ImageNet stand-in, detector runs are named like ``faster_rcnn-pretrained`` / ``faster_rcnn-scratch``.
Whatever runs are given are drawn; a missing one (say, no classifier) just leaves its line out.
Figures are built with matplotlib's object API (``Figure``, rendered by Agg), never through pyplot.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from eigpipe import provenance
from eigpipe.errors import EigpipeError
from eigpipe.models.taps import canonical
from eigpipe.provenance import publish, write_table
from eigpipe.spectral import store
from eigpipe.spectral.dimensions import read_table
from eigpipe.spectral.spectrum import EIGENVALUE_ARRAYS

ROLE_COLORS = {"classifier": "black", "pretrained": "tab:blue", "scratch": "tab:orange"}
OTHER_COLORS = ("tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
NEEDED = ("run", "iteration", "layer", "canonical", "forward_index", "channels", "intrinsic_dim", "threshold")


# ---- inputs -----------------------------------------------------------------------------------------


def load_dimensions(paths: Sequence[str | Path]) -> pd.DataFrame:
    if not paths:
        raise EigpipeError("report: no dimension tables given")
    frames = [read_table(p) for p in paths]
    table = pd.concat(frames, ignore_index=True)
    missing = [c for c in NEEDED if c not in table.columns]
    if missing:
        raise EigpipeError(f"report: dimension tables lack column(s) {', '.join(missing)}")
    for column in ("init", "task", "model_name"):
        if column not in table.columns:
            table[column] = None
    return table


def final_snapshots(table: pd.DataFrame) -> pd.DataFrame:
    """Rows of each run's last iteration."""
    last = table.groupby("run")["iteration"].transform("max")
    return table[table["iteration"] == last].reset_index(drop=True)


def role(run: str, init: Any = None, task: Any = None) -> str:
    """classifier | pretrained | scratch | other."""
    if run == "classifier" or task == "classification":
        return "classifier"
    for name in ("pretrained", "scratch"):
        if init == name or (isinstance(init, str) and init.startswith(name)) or run.endswith(f"-{name}"):
            return name
    return "other"


def styles(table: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """A fixed colour per role (classifier black, pretrained blue, scratch orange); Mask R-CNN dashed."""
    first = table.drop_duplicates("run").set_index("run")
    found, spare = {}, iter(OTHER_COLORS * 4)
    for run in sorted(first.index, key=_run_key):
        row = first.loc[run]
        r = role(run, row.get("init"), row.get("task"))
        taken = {s["color"] for s in found.values()}
        color = ROLE_COLORS.get(r) if ROLE_COLORS.get(r) not in taken else None
        linestyle = "--" if "mask" in str(row.get("model_name") or run) else "-"
        found[run] = {"color": color or next(spare), "linestyle": linestyle, "label": run}
    return found


def _run_key(run: str) -> tuple[int, str]:
    return (0 if run == "classifier" else 1, run)


def layer_order(finals: pd.DataFrame) -> list[str]:
    """Canonical layers in forward order: that of the run with the most layers, then any others."""
    by_run = {run: rows.sort_values("forward_index")["canonical"].tolist() for run, rows in finals.groupby("run")}
    order = list(max(by_run.values(), key=len))
    for names in by_run.values():
        order += [n for n in names if n not in order]
    return order


def chosen_layers(order: Sequence[str], wanted: Sequence[str]) -> list[str]:
    """The configured layers (canonical names), or the stem conv and the conv3 of a middle block of
    layer2..layer4 (block outputs before the residual sum: conv1/conv2 layers tend to stay at full rank)."""
    if wanted:
        unknown = [w for w in wanted if w not in order]
        if unknown:
            known = ", ".join(list(order)[:8])
            raise EigpipeError(f"report.layers: {unknown[0]} is not a layer of any run (known: {known}, ...)")
        return list(wanted)
    picks = ["conv1"] if "conv1" in order else []
    for stage in (2, 3, 4):
        candidates = [name for name in order if fnmatch.fnmatchcase(name, f"layer{stage}.*.conv3")]
        if candidates:
            picks.append(candidates[len(candidates) // 2])
    if len(picks) < 2:
        step = max(1, len(order) // 4)
        picks = list(order)[::step][:4]
    return picks


# ---- figures ----------------------------------------------------------------------------------------


def _save(fig: Figure, path: Path) -> Path:
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
    return _save(fig, path)


def plot_dimensions(finals: pd.DataFrame, order: Sequence[str], style: dict, path: Path) -> Path:
    """Intrinsic dimensionality (and its share of channels) per layer in forward order, a line per model."""
    fig = Figure(figsize=(max(8.0, 0.16 * len(order)), 7), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    position = {name: i for i, name in enumerate(order)}
    for run, rows in sorted(finals.groupby("run"), key=lambda kv: _run_key(kv[0])):
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
    return _save(fig, path)


def plot_dynamics(table: pd.DataFrame, layers: Sequence[str], style: dict, path: Path) -> Path:
    """Intrinsic dimensionality of the chosen layers against training iteration, a line per run."""
    fig, axes = _panels(len(layers))
    for ax, layer in zip(axes, layers, strict=True):
        rows = table[table["canonical"] == layer]
        for run, series in sorted(rows.groupby("run"), key=lambda kv: _run_key(kv[0])):
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
    return _save(fig, path)


# ---- tables -----------------------------------------------------------------------------------------


def spectra_table(finals: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for run, group in sorted(finals.groupby("run"), key=lambda kv: _run_key(kv[0])):
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
    return table.sort_values("run", key=lambda s: s.map(_run_key)).reset_index(drop=True)


def load_spectra(paths: Sequence[str | Path]) -> dict[str, dict[str, np.ndarray]]:
    """{run: {canonical layer: second-moment eigenvalues}} from eigenvalue stores (final models)."""
    spectra: dict[str, dict[str, np.ndarray]] = {}
    for path in paths:
        attrs, layers = store.read_store(path, store.EIGENVALUE_KIND, EIGENVALUE_ARRAYS)
        run = attrs.get("run") or Path(path).stem
        spectra[run] = {canonical(name): arrays["second_moment"] for name, (arrays, _attrs) in layers.items()}
    return spectra


# ---- the stage --------------------------------------------------------------------------------------


def make_report(
    cfg: dict,
    dimensions: Sequence[Path],
    out_dir: Path,
    eigenvalues: Sequence[Path] = (),
    evaluations: Sequence[Path] = (),
    widths_files: Sequence[Path] = (),
) -> dict[str, Path]:
    """The ``eigpipe report`` stage (section report): PNGs and CSV tables into ``out_dir``; returns what it wrote."""
    out_dir = Path(out_dir)
    provenance.check_writable(out_dir / "spectra.csv")
    table = load_dimensions(dimensions)
    finals = final_snapshots(table)
    order = layer_order(finals)
    layers = chosen_layers(order, cfg["report"]["layers"])
    style = styles(table)
    spectra = load_spectra(eigenvalues)
    for run in spectra:
        style.setdefault(run, {"color": "gray", "linestyle": "-", "label": run})
    threshold = float(table["threshold"].iloc[0])
    written = {
        "eigenvalues": plot_eigenvalues(spectra, layers, style, threshold, out_dir / "eigenvalues.png"),
        "dimensions": plot_dimensions(finals, order, style, out_dir / "dimensions.png"),
        "dynamics": plot_dynamics(table, layers, style, out_dir / "dynamics.png"),
        "spectra": out_dir / "spectra.csv",
    }
    write_table(written["spectra"], spectra_table(finals))
    if evaluations:
        written["evaluation"] = out_dir / "evaluation.csv"
        write_table(written["evaluation"], evaluation_table(evaluations))
    return written
