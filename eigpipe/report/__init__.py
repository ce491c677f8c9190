"""The ``eigpipe report`` stage: the study's plots and tables (spectra, dimensions, dynamics, the comparison of
baseline and derived-width models)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from eigpipe import provenance
from eigpipe.provenance import publish, write_table
from eigpipe.report import comparison
from eigpipe.report.figures import plot_dimensions, plot_dynamics, plot_eigenvalues, plot_widths, save_png
from eigpipe.report.inputs import chosen_layers, final_snapshots, layer_order, load_dimensions, load_spectra, styles
from eigpipe.report.tables import evaluation_table, spectra_table


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
        written.update(_comparison(evaluations, widths_files, out_dir))
    return written


def _comparison(evaluations: Sequence[Path], widths_files: Sequence[Path], out_dir: Path) -> dict[str, Path]:
    """summary.csv / summary.md (baseline and derived models side by side) and widths.png."""
    table = comparison.comparison_table(evaluations)
    written = {
        name: out_dir / file
        for name, file in (("summary", "summary.csv"), ("summary_md", "summary.md"), ("widths", "widths.png"))
    }
    write_table(written["summary"], table)
    with publish(written["summary_md"]) as tmp:
        tmp.write_text(comparison.markdown(table))
    derivations = comparison.read_derivations(widths_files)
    figure = Figure(
        figsize=(max(8.0, 0.2 * _most_layers(derivations)), 3.6 * max(1, len(derivations))), layout="constrained"
    )
    save_png(plot_widths(derivations, figure), written["widths"])
    return written


def _most_layers(derivations: dict[str, dict]) -> int:
    return max((len(record["layers"]) for record in derivations.values()), default=0)
