"""The ``eigpipe spectrum`` stage: eigenvalues of a covariance store and the dimension measures of each layer.

Measures of a spectrum mu_1 >= ... >= mu_C >= 0 (negative round-off clipped to 0 and counted):
intrinsic_dim = #{mu_j > threshold} (the paper's, threshold 1e-3), intrinsic_dim_ratio = that / C,
relative_dim = #{mu_j > relative_threshold * mu_1} (scale-free), soft_dof = sum mu_j / (mu_j + lambda),
effective_rank = exp(entropy of mu / sum mu), top_eigenvalue, trace, and the measures users of other tools
know (eigpipe.spectral.measures): delve's saturation and its count, the participation ratio, RankMe and the
alpha-ReQ exponent with its R^2. Each is given for the paper's uncentred second moment and, with the prefix
``centered_``, for the centred covariance.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from eigpipe import config
from eigpipe.errors import EigpipeError, NumericalError
from eigpipe.layer_paths import canonical_names
from eigpipe.outputs import Kind, claim_outputs, table_columns
from eigpipe.provenance import record, remove, write_table
from eigpipe.spectral import store
from eigpipe.spectral.jackknife import FOLD_ARRAYS, JACKKNIFE_ARRAYS, SE_MEASURES, leave_one_out, standard_errors
from eigpipe.spectral.measures import alpha_req, participation_ratio, rankme, saturation_dim

# negative eigenvalues beyond this share of the largest one are not round-off: the matrix is broken
NEGATIVE_TOLERANCE = 1e-9
# ... for stores whose Gram products ran in float32 (covariance.precision): their relative error budget
NEGATIVE_TOLERANCE_FLOAT32 = 1e-6
MEASURES = (
    "intrinsic_dim",
    "intrinsic_dim_ratio",
    "relative_dim",
    "soft_dof",
    "effective_rank",
    "saturation",
    "saturation_dim",
    "participation_ratio",
    "rankme",
    "alpha",
    "alpha_r2",
    "top_eigenvalue",
    "trace",
    "n_negative_clipped",
)
# the spectrum section's keys a table row records beside the measures they set
SETTINGS = ("threshold", "relative_threshold", "soft_lambda", "saturation_threshold")
COVARIANCE_ARRAYS = ("second_moment", "mean")
EIGENVALUE_ARRAYS = ("second_moment", "covariance")
# the columns that make a table a spectrum table (one row per layer of one snapshot); a dimensions table adds
# the column "source" (the spectrum table each row came from)
TABLE_COLUMNS = ("run", "iteration", "layer", "channels", "intrinsic_dim", "threshold")
TABLE_REF = "spectrum_table"  # root attr of an eigenvalue store: its table, relative to the store's folder
SPECTRUM_TABLE = Kind(
    "an eigpipe spectrum table",
    lambda path: set(TABLE_COLUMNS) <= set(columns := table_columns(path)) and "source" not in columns,
)


def check_symmetric(matrix: np.ndarray, what: str, tolerance: float = NEGATIVE_TOLERANCE) -> None:
    """A NumericalError when ``matrix`` is not symmetric beyond ``tolerance`` x its largest entry (the stages
    write exactly symmetric matrices: asymmetry means a damaged or foreign store)."""
    a = np.asarray(matrix, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise NumericalError(f"{what}: shape {list(a.shape)} is not a square matrix")
    scale = float(np.abs(a).max(initial=0.0))
    gap = float(np.abs(a - a.T).max(initial=0.0))
    if gap > tolerance * max(scale, np.finfo(float).tiny):
        raise NumericalError(f"{what}: not symmetric (entries differ from their transpose by up to {gap:.3g})")


def check_count(attrs: dict, where: str) -> None:
    """A layer's recorded image count, where recorded, must be a positive integer (0: nothing was measured)."""
    count = attrs.get("count")
    if count is not None and (type(count) is not int or count < 1):
        raise EigpipeError(f"{where}: count {count!r}: the statistics need at least one image")


Eigvalsh = Callable[[np.ndarray], np.ndarray]


def eigenvalues(
    matrix: np.ndarray,
    scale: float | None = None,
    what: str = "matrix",
    tolerance: float = NEGATIVE_TOLERANCE,
    eigvalsh: Eigvalsh = np.linalg.eigvalsh,
) -> tuple[np.ndarray, int]:
    """Descending eigenvalues of the symmetrised float64 matrix with round-off negatives clipped to 0.

    Returns (eigenvalues, how many were clipped). ``scale`` (default: the largest |eigenvalue|) sets how
    negative a value may be and still count as round-off; anything below raises NumericalError. ``eigvalsh``
    (ascending eigenvalues of a symmetric matrix): NumPy's here; the library's tracker, in a process whose
    torch threads are busy, passes torch's (NumPy's BLAS threads would contend with them).
    """
    a = np.asarray(matrix, dtype=np.float64)
    if not np.isfinite(a).all():
        raise NumericalError(f"{what}: non-finite entries")
    check_symmetric(a, what, tolerance)
    values = np.asarray(eigvalsh((a + a.T) / 2))[::-1]
    scale = float(np.abs(values).max(initial=0.0)) if scale is None else scale
    negative = values < 0
    if negative.any() and values.min() < -tolerance * max(scale, np.finfo(float).tiny):
        raise NumericalError(f"{what}: eigenvalue {values.min():.3g} is far below zero (scale {scale:.3g})")
    return np.where(negative, 0.0, values), int(negative.sum())


def intrinsic_dim_ratio(values: np.ndarray, threshold: float) -> float:
    """The paper's d/C: the share of a layer's eigenvalues above ``threshold`` (NaN for a layer of no channels)."""
    return float((np.asarray(values) > threshold).sum() / len(values)) if len(values) else float("nan")


def measures(values: np.ndarray, cfg: dict, trace: float | None = None) -> dict:
    """Dimension measures of a clipped, descending spectrum (see the module docstring); ``cfg`` is the
    spectrum section (threshold, relative_threshold, soft_lambda, saturation_threshold, alpha_ranks)."""
    values = np.asarray(values, dtype=np.float64)
    channels = len(values)
    total = float(values.sum())
    intrinsic = int((values > cfg["threshold"]).sum())
    top = float(values[0]) if channels else float("nan")
    if total > 0:
        p = values[values > 0] / total
        effective_rank = float(np.exp(-(p * np.log(p)).sum()))
    else:
        effective_rank = 0.0
    saturation = saturation_dim(values, cfg["saturation_threshold"])
    alpha, alpha_r2 = alpha_req(values, cfg["alpha_ranks"])
    return {
        "intrinsic_dim": intrinsic,
        "intrinsic_dim_ratio": intrinsic_dim_ratio(values, cfg["threshold"]),
        "relative_dim": int((values > cfg["relative_threshold"] * top).sum()) if top > 0 else 0,
        "soft_dof": float((values / (values + cfg["soft_lambda"])).sum()),
        "effective_rank": effective_rank,
        "saturation": saturation / channels if channels else float("nan"),
        "saturation_dim": saturation,
        "participation_ratio": participation_ratio(values),
        "rankme": rankme(values),
        "alpha": alpha,
        "alpha_r2": alpha_r2,
        "top_eigenvalue": top,
        "trace": total if trace is None else float(trace),
    }


def layer_spectra(
    second_moment: np.ndarray,
    mean: np.ndarray,
    what: str,
    tolerance: float = NEGATIVE_TOLERANCE,
    eigvalsh: Eigvalsh = np.linalg.eigvalsh,
) -> dict[str, tuple[np.ndarray, int]]:
    """Clipped eigenvalues (and clip counts) of the second moment and of the centred covariance."""
    s = np.asarray(second_moment, dtype=np.float64)
    m = np.asarray(mean, dtype=np.float64)
    s_values = eigenvalues(s, what=f"{what}: second moment", tolerance=tolerance, eigvalsh=eigvalsh)
    scale = float(s_values[0][0]) if len(s_values[0]) else 0.0  # the centred matrix inherits S's round-off
    c_what = f"{what}: centred covariance"
    c_values = eigenvalues(s - np.outer(m, m), scale=scale, what=c_what, tolerance=tolerance, eigvalsh=eigvalsh)
    return {"second_moment": s_values, "covariance": c_values}


def check_settings(cfg: dict) -> None:
    """Cross-key rules of the spectrum section the schema cannot state."""
    config.check_section(cfg, "spectrum")


def layer_row(
    root: dict,
    name: str,
    attrs: dict,
    arrays: dict,
    cfg: dict,
    what: str,
    tolerance: float = NEGATIVE_TOLERANCE,
    eigvalsh: Eigvalsh = np.linalg.eigvalsh,
) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, int]]]:
    """One table row (every measure of both matrices) and the clipped spectra of one layer's second moment and
    mean; ``root`` and ``attrs`` are the store's root and layer attributes (or the tracker's equivalents)."""
    second, mean = arrays["second_moment"], arrays["mean"]
    spectra = layer_spectra(second, mean, what=what, tolerance=tolerance, eigvalsh=eigvalsh)
    traces = {"second_moment": float(np.trace(second)), "covariance": float(np.trace(second) - mean @ mean)}
    row: dict[str, Any] = {
        "run": root.get("run"),
        "init": root.get("init"),
        "task": root.get("task"),
        "model_name": root.get("model_name"),
        "iteration": root.get("iteration"),
        "layer": name,
        "forward_index": attrs.get("forward_index"),
        "module_type": attrs.get("module_type"),
        "channels": int(len(spectra["second_moment"][0])),
        "n_images": attrs.get("count", root.get("n_images")),
        "precision": root.get("precision", "float64"),  # of the Gram products; stores before it were float64
    }
    for key, prefix in (("second_moment", ""), ("covariance", "centered_")):
        values, clipped = spectra[key]
        found = measures(values, cfg, trace=traces[key])
        found["n_negative_clipped"] = clipped
        row.update({prefix + k: found[k] for k in MEASURES})
    row.update({key: cfg[key] for key in SETTINGS})
    row["alpha_rank_first"], row["alpha_rank_last"] = cfg["alpha_ranks"]
    return row, spectra


def spectrum_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The table of one snapshot's rows, with each layer's canonical name (the same rule for every layer)."""
    table = pd.DataFrame(rows)
    table.insert(table.columns.get_loc("layer") + 1, "canonical", canonical_names(list(table["layer"])))
    return table


def negative_tolerance(precision: str | None) -> float:
    """How far below zero an eigenvalue may be and still count as round-off, by the Gram products' dtype."""
    return NEGATIVE_TOLERANCE_FLOAT32 if precision == "float32" else NEGATIVE_TOLERANCE


def _jackknife(arrays: store.Arrays, attrs: dict, what: str, tolerance: float, cfg: dict) -> tuple[dict, dict]:
    """({measure_se: jackknife SE}, {eigenvalue array: [K, C] leave-one-fold-out eigenvalues}) of a layer with folds
    (covariance.folds; eigpipe.spectral.jackknife)."""
    spectra = [
        layer_spectra(moment, mean, what=f"{what} without fold {k}", tolerance=tolerance)
        for k, (moment, mean) in enumerate(
            leave_one_out(arrays["fold_second_moment"], arrays["fold_mean"], attrs["fold_counts"])
        )
    ]
    values = [
        {
            prefix + name: value
            for key, prefix in (("second_moment", ""), ("covariance", "centered_"))
            for name, value in measures(found[key][0], cfg).items()
        }
        for found in spectra
    ]
    names = [prefix + name for prefix in ("", "centered_") for name in SE_MEASURES]
    eigen = {JACKKNIFE_ARRAYS[key]: np.stack([found[key][0] for found in spectra]) for key in JACKKNIFE_ARRAYS}
    return {"folds": len(spectra), **standard_errors(values, names)}, eigen


def eigenvalue_path(out: str | Path) -> Path:
    """Default eigenvalue store beside a table: ``final.parquet`` -> ``final.eigenvalues.zarr`` (never the covariance
    store ``final.zarr`` the table was computed from)."""
    return Path(out).with_suffix(".eigenvalues.zarr")


def decompose(cfg: dict, store_path: Path, out: Path, eigenvalues_out: Path | None = None) -> pd.DataFrame:
    """Eigenvalue store + one table row per layer of a covariance store (section spectrum)."""
    section = cfg["spectrum"]
    check_settings(section)
    eigenvalues_out = Path(eigenvalues_out or eigenvalue_path(out))
    claim_outputs((out, SPECTRUM_TABLE), (eigenvalues_out, store.EIGENVALUE_STORE), inputs=[store_path])
    rows, eig_arrays, eig_attrs = [], {}, {}
    root = store.store_attrs(store_path, store.COVARIANCE_KIND)
    store.check_root(root, str(store_path))
    tolerance = negative_tolerance(root.get("precision"))
    layers = store.iter_layers(store_path, store.COVARIANCE_KIND, COVARIANCE_ARRAYS, optional=FOLD_ARRAYS)
    for name, arrays, attrs in layers:
        what = f"{store_path}: layer {name}"
        check_count(attrs, what)
        store.check_shapes(arrays, what)
        row, spectra = layer_row(root, name, attrs, arrays, section, what, tolerance)
        rows.append(row)
        eig_arrays[name] = {key: values for key, (values, _) in spectra.items()}
        if "fold_second_moment" in arrays:
            errors, jackknifed = _jackknife(arrays, attrs, what, tolerance, section)
            rows[-1].update(errors)
            eig_arrays[name].update(jackknifed)
        eig_attrs[name] = {
            **attrs,
            "n_negative_clipped": spectra["second_moment"][1],
            "centered_n_negative_clipped": spectra["covariance"][1],
        }
    if not rows:
        raise EigpipeError(f"{store_path}: the store has no layers")
    attrs = {
        **{k: v for k, v in root.items() if k not in store.STORE_ATTRS},
        "source_store": str(store_path),
        "spectrum": section,
        "spectrum_provenance": record(config=section, seed=None, device="cpu"),
    }
    # Two outputs: the table is published last and the store names it, so a store whose table is missing
    # (a kill in between) reads as unfinished, never as a complete half (see read_eigenvalues). The name is
    # relative to the store's folder, so it resolves wherever the results are copied or run from.
    table_ref = os.path.relpath(Path(out).absolute(), eigenvalues_out.absolute().parent)
    remove(Path(out))  # never a new store beside an old table; only now, so that an error above leaves it
    store.write_store(eigenvalues_out, store.EIGENVALUE_KIND, eig_arrays, {**attrs, TABLE_REF: table_ref}, eig_attrs)
    table = spectrum_table(rows)
    write_table(out, table)
    return table


def table_of(path: str | Path, attrs: dict) -> Path | None:
    """The spectrum table an eigenvalue store names, relative to the store's folder. Stores written before that
    recorded it relative to the job's folder (``table``), which says nothing where the results are now: their
    table is looked for beside the store (where the workflow and the default put it), by its name."""
    if isinstance(attrs.get(TABLE_REF), str):
        return Path(path).parent / attrs[TABLE_REF]
    if isinstance(attrs.get("table"), str):
        return Path(path).parent / Path(attrs["table"]).name
    return None


def read_eigenvalues(path: Path) -> tuple[dict, dict[str, tuple[store.Arrays, dict]]]:
    """A verified eigenvalue store whose spectrum table was published too (else a one-line error); the
    leave-one-fold-out eigenvalues where the covariance store had folds."""
    attrs, layers = store.read_store(path, store.EIGENVALUE_KIND, EIGENVALUE_ARRAYS, tuple(JACKKNIFE_ARRAYS.values()))
    table = table_of(path, attrs)
    if table is not None and not table.is_file():
        raise EigpipeError(
            f"{path}: its spectrum table {table} is missing: the spectrum stage did not finish; run it again"
        )
    for name, (_arrays, layer_attrs) in layers.items():
        check_count(layer_attrs, f"{path}: layer {name}")
    return attrs, layers
