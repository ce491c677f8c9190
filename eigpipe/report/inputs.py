"""What the report reads: dimension tables, eigenvalue stores, which layers to draw, and a style per run.

Runs are told apart by their name and ``init``: run "classifier" (or task classification) is the
ImageNet stand-in, detector runs are named like ``faster_rcnn-pretrained`` / ``faster_rcnn-scratch``.
Whatever runs are given are drawn; a missing one (say, no classifier) just leaves its line out.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from eigpipe.errors import EigpipeError
from eigpipe.layer_paths import canonical_names
from eigpipe.runs import group_of
from eigpipe.spectral.dimensions import read_table
from eigpipe.spectral.spectrum import read_eigenvalues

ROLE_COLORS = {"classifier": "black", "pretrained": "tab:blue", "scratch": "tab:orange"}
OTHER_COLORS = ("tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
NEEDED = ("run", "iteration", "layer", "canonical", "forward_index", "channels", "intrinsic_dim", "threshold")


def load_dimensions(paths: Sequence[str | Path]) -> pd.DataFrame:
    if not paths:
        raise EigpipeError("report: no dimension tables given")
    tables = [read_table(p, NEEDED) for p in paths]
    for path, one in zip(paths, tables, strict=True):
        _check_canonical(path, one)
    table = pd.concat(tables, ignore_index=True)
    for column in ("init", "task", "model_name"):
        if column not in table.columns:
            table[column] = None
    return table


def _check_canonical(path: str | Path, table: pd.DataFrame) -> None:
    """One row per canonical name in each snapshot (tables written before the rule that keeps full names where
    stripping the body prefix would merge two layers may have two)."""
    twice = table[table.duplicated(["run", "iteration", "canonical"])]
    if len(twice):
        row = twice.iloc[0]
        raise EigpipeError(
            f"{path}: run {row['run']}, iteration {row['iteration']}: two layers have the canonical name "
            f"{row['canonical']}; run eigpipe spectrum and dimensions on its stores again"
        )


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
    for run in sorted(first.index, key=run_key):
        row = first.loc[run]
        r = role(run, row.get("init"), row.get("task"))
        taken = {s["color"] for s in found.values()}
        color = ROLE_COLORS.get(r) if ROLE_COLORS.get(r) not in taken else None
        linestyle = "--" if "mask" in str(row.get("model_name") or run) else "-"
        found[run] = {"color": color or next(spare), "linestyle": linestyle, "label": run}
    return found


def run_key(run: str) -> tuple[int, str]:
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


def load_stores(paths: Sequence[str | Path], table: pd.DataFrame | None = None) -> dict[str, tuple[dict, dict]]:
    """{run: (root attrs, {layer: (arrays, layer attrs)})} of eigenvalue stores (final models), verified: one store
    per run and, for a run of the dimension ``table``, the store of its last iteration there."""
    last = table.groupby("run")["iteration"].max().to_dict() if table is not None else {}
    stores, sources = {}, {}
    for path in paths:
        attrs, layers = read_eigenvalues(path)
        run = attrs.get("run") or Path(path).stem
        if run in sources:
            raise EigpipeError(f"{path}: a second eigenvalue store of run {run} (also {sources[run]}); give one a run")
        if run in last and attrs.get("iteration") != last[run]:
            raise EigpipeError(
                f"{path}: iteration {attrs.get('iteration')!r} of run {run} is not its final snapshot "
                f"(the dimension tables' last iteration is {last[run]}); give the final model's store"
            )
        stores[run], sources[run] = (attrs, layers), path
    return stores


def second_moments(stores: dict[str, tuple[dict, dict]]) -> dict[str, dict[str, np.ndarray]]:
    """{run: {canonical layer: second-moment eigenvalues}} of the study seed's runs (replicates left out)."""
    return {
        run: {
            name: arrays["second_moment"]
            for name, (arrays, _) in zip(canonical_names(list(layers)), layers.values(), strict=True)
        }
        for run, (_attrs, layers) in stores.items()
        if group_of(run) == run
    }


def load_spectra(paths: Sequence[str | Path]) -> dict[str, dict[str, np.ndarray]]:
    """{run: {canonical layer: second-moment eigenvalues}} from eigenvalue stores (final models)."""
    return second_moments(load_stores(paths))
