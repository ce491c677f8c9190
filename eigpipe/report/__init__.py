"""The ``eigpipe report`` stage: the study's plots and tables (spectra, dimensions, dynamics, the comparison of
baseline and derived-width models), each comparison with how sure it is."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from eigpipe import provenance
from eigpipe.provenance import publish, write_table
from eigpipe.report import comparison, dimension_diffs, text, uncertainty
from eigpipe.report.figures import plot_dimensions, plot_dynamics, plot_eigenvalues, plot_widths, save_png
from eigpipe.report.inputs import (
    chosen_layers,
    final_snapshots,
    layer_order,
    load_dimensions,
    load_stores,
    second_moments,
    styles,
)
from eigpipe.report.tables import evaluation_table, spectra_table


def make_report(
    cfg: dict,
    dimensions: Sequence[Path],
    out_dir: Path,
    eigenvalues: Sequence[Path] = (),
    evaluations: Sequence[Path] = (),
    widths_files: Sequence[Path] = (),
    matches: Sequence[Path] = (),
) -> dict[str, Path]:
    """The ``eigpipe report`` stage (section report): PNGs and CSV tables into ``out_dir``; returns what it wrote.
    ``eigenvalues`` may include replicate runs' final stores (the d/C differences' spread over seeds); ``matches``,
    the evaluations' per-image matching files, give every AP its interval over images."""
    out_dir = Path(out_dir)
    provenance.check_writable(out_dir / "spectra.csv")
    table = load_dimensions(dimensions)
    finals = final_snapshots(table)
    order = layer_order(finals)
    layers = chosen_layers(order, cfg["report"]["layers"])
    style = styles(table)
    stores = load_stores(eigenvalues)
    spectra = second_moments(stores)
    diffs = dimension_diffs.differences(stores)
    for run in spectra:
        style.setdefault(run, {"color": "gray", "linestyle": "-", "label": run})
    threshold = float(table["threshold"].iloc[0])
    written = {
        "eigenvalues": plot_eigenvalues(spectra, layers, style, threshold, out_dir / "eigenvalues.png"),
        "dimensions": plot_dimensions(finals, order, style, out_dir / "dimensions.png", diffs),
        "dynamics": plot_dynamics(table, layers, style, out_dir / "dynamics.png"),
        "spectra": out_dir / "spectra.csv",
    }
    write_table(written["spectra"], spectra_table(finals))
    if eigenvalues:
        written["dimension_differences"] = out_dir / "dimension_differences.csv"
        write_table(written["dimension_differences"], diffs)
    if evaluations:
        written["evaluation"] = out_dir / "evaluation.csv"
        write_table(written["evaluation"], evaluation_table(evaluations))
        written.update(_comparison(cfg["report"], evaluations, widths_files, matches, diffs, out_dir))
    return written


def _comparison(
    cfg: dict,
    evaluations: Sequence[Path],
    widths_files: Sequence[Path],
    matches: Sequence[Path],
    diffs: pd.DataFrame,
    out_dir: Path,
) -> dict[str, Path]:
    """summary.csv / summary.md (baseline and derived models side by side, with intervals and verdicts),
    comparisons.csv (every two models of one detector) and widths.png."""
    main = comparison.comparison_table(evaluations)
    runs = comparison.run_table(evaluations)
    boot, n_images = uncertainty.bootstrap_runs(matches, cfg["bootstrap"])
    pairs = uncertainty.comparisons(main, runs, boot, n_images, cfg["margin"])
    table = comparison.with_intervals(main, uncertainty.model_intervals(runs, boot, n_images), pairs)
    names = (
        ("summary", "summary.csv"),
        ("summary_md", "summary.md"),
        ("comparisons", "comparisons.csv"),
        ("widths", "widths.png"),
    )
    written = {name: out_dir / file for name, file in names}
    write_table(written["summary"], table)
    write_table(written["comparisons"], pairs)
    with publish(written["summary_md"]) as tmp:
        tmp.write_text(text.summary(main, table, pairs, diffs, cfg, n_images))
    derivations = comparison.read_derivations(widths_files)
    figure = Figure(
        figsize=(max(8.0, 0.2 * _most_layers(derivations)), 3.6 * max(1, len(derivations))), layout="constrained"
    )
    save_png(plot_widths(derivations, figure), written["widths"])
    return written


def _most_layers(derivations: dict[str, dict]) -> int:
    return max((len(record["layers"]) for record in derivations.values()), default=0)
