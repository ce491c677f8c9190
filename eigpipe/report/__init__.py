"""The ``eigpipe report`` stage: the study's plots and tables (spectra, dimensions, dynamics, the comparison of
baseline and derived-width models), each comparison with how sure it is.

Every input is read and checked before anything is written; the folder is then built in a temp sibling and
renamed into place whole, so a bad input, a kill or a full disk leaves the previous report (or nothing), and a
rerun with fewer inputs leaves no file of the last one. ``report.json`` marks the folder as a report's (what
it holds, from which inputs): only such a folder or an empty one is ever replaced (a report folder from before
the marker is refused: move it away once). Files in it that the report did not write (``snakemake --report``'s
report.html, your notes) are kept: hard-linked into the new folder before it replaces the old one.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from eigpipe import provenance
from eigpipe.errors import EigpipeError
from eigpipe.outputs import Kind, claim_outputs, is_temp
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

MARKER = "report.json"
REPORT_KIND = "eigpipe.report"
FILES = {
    "eigenvalues": "eigenvalues.png",
    "dimensions": "dimensions.png",
    "dynamics": "dynamics.png",
    "spectra": "spectra.csv",
    "evaluation": "evaluation.csv",
    "summary": "summary.csv",
    "summary_md": "summary.md",
    "comparisons": "comparisons.csv",
    "dimension_differences": "dimension_differences.csv",
    "widths": "widths.png",
}
COMPARISON = ("evaluation", "summary", "summary_md", "comparisons", "widths")  # written when evaluations are given


def _made(folder: Path) -> set[str] | None:
    """The names the report wrote into ``folder`` (its marker's list), or None when ``folder`` is no report folder
    (files named like a report's without the marker may be anybody's)."""
    if not (folder / MARKER).is_file():
        return None
    marker = json.loads((folder / MARKER).read_text())
    return {*marker.get("files", []), MARKER} if marker.get("kind") == REPORT_KIND else None


REPORT_FOLDER = Kind(f"an eigpipe report folder (with its {MARKER})", lambda path: _made(path) is not None, True)


def _kept(folder: Path, writes: set[str]) -> list[str]:
    """Entries of the previous report folder that the report did not write; none may be one it writes now."""
    if not folder.is_dir():
        return []
    made = _made(folder) or set()
    kept = sorted(e.name for e in folder.iterdir() if e.name not in made and not is_temp(e.name))
    if clash := [name for name in kept if name in writes]:
        raise EigpipeError(
            f"{folder / clash[0]}: not written by eigpipe report, but the report writes a file of that name"
        )
    return kept


def _link(source: Path, target: Path) -> None:
    """Hard links (copies across file systems): the old folder stays whole until the new one replaces it."""
    if source.is_dir() and not source.is_symlink():
        shutil.copytree(source, target, symlinks=True, copy_function=_link_file)
    else:
        _link_file(source, target)


def _link_file(source: Path | str, target: Path | str) -> None:
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, target, follow_symlinks=False)


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
    inputs = [*dimensions, *eigenvalues, *evaluations, *widths_files, *matches]
    claim_outputs((out_dir, REPORT_FOLDER), inputs=inputs)
    # every input, read and checked before the first write
    table = load_dimensions(dimensions)
    finals = final_snapshots(table)
    order = layer_order(finals)
    layers = chosen_layers(order, cfg["report"]["layers"])
    style = styles(table)
    stores = load_stores(eigenvalues, table)
    spectra = second_moments(stores)
    diffs = dimension_diffs.differences(stores)
    for run in spectra:
        style.setdefault(run, {"color": "gray", "linestyle": "-", "label": run})
    threshold = float(table["threshold"].iloc[0])
    compared = _comparison(cfg["report"], evaluations, matches, diffs) if evaluations else None
    derivations = comparison.read_derivations(widths_files)

    names = [key for key in FILES if (compared is not None or key not in COMPARISON)]
    names = [key for key in names if eigenvalues or key != "dimension_differences"]
    kept = _kept(out_dir, {MARKER, *(FILES[key] for key in names)})
    with provenance.publish(out_dir) as tmp:
        tmp.mkdir()
        plot_eigenvalues(spectra, layers, style, threshold, tmp / FILES["eigenvalues"])
        plot_dimensions(finals, order, style, tmp / FILES["dimensions"], diffs)
        plot_dynamics(table, layers, style, tmp / FILES["dynamics"])
        provenance.write_table(tmp / FILES["spectra"], spectra_table(finals))
        if eigenvalues:
            provenance.write_table(tmp / FILES["dimension_differences"], diffs)
        if compared is not None:
            for key in ("evaluation", "summary", "comparisons"):
                provenance.write_table(tmp / FILES[key], compared[key])
            (tmp / FILES["summary_md"]).write_text(compared["summary_md"])
            save_png(plot_widths(derivations, _widths_figure(derivations)), tmp / FILES["widths"])
        marker = {
            "kind": REPORT_KIND,
            "files": [FILES[key] for key in names],
            "provenance": provenance.record(config=cfg["report"], inputs=[p for p in inputs if Path(p).is_file()]),
        }
        provenance.write_json(tmp / MARKER, marker)
        for name in kept:
            _link(out_dir / name, tmp / name)
    return {key: out_dir / FILES[key] for key in names}


def _comparison(cfg: dict, evaluations: Sequence[Path], matches: Sequence[Path], diffs: pd.DataFrame) -> dict:
    """The comparison tables, computed before anything is written: evaluation.csv, summary.csv / summary.md
    (baseline and derived models side by side, with intervals and verdicts) and comparisons.csv (every two
    models of one detector)."""
    main = comparison.comparison_table(evaluations)
    runs = comparison.run_table(evaluations)
    boot, n_images = uncertainty.bootstrap_runs(matches, cfg["bootstrap"])
    pairs = uncertainty.comparisons(main, runs, boot, n_images, cfg["margin"])
    table = comparison.with_intervals(main, uncertainty.model_intervals(runs, boot, n_images), pairs)
    return {
        "evaluation": evaluation_table(evaluations),
        "summary": table,
        "comparisons": pairs,
        "summary_md": text.summary(main, table, pairs, diffs, cfg, n_images),
    }


def _widths_figure(derivations: dict[str, dict]) -> Figure:
    most = max((len(record["layers"]) for record in derivations.values()), default=0)
    return Figure(figsize=(max(8.0, 0.2 * most), 3.6 * max(1, len(derivations))), layout="constrained")
