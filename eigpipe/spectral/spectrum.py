"""The ``eigpipe spectrum`` stage: eigenvalues of a covariance store and the dimension measures of each layer.

Measures of a spectrum mu_1 >= ... >= mu_C >= 0 (negative round-off clipped to 0 and counted):
intrinsic_dim = #{mu_j > threshold} (the paper's, threshold 1e-3), intrinsic_dim_ratio = that / C,
relative_dim = #{mu_j > relative_threshold * mu_1} (scale-free), soft_dof = sum mu_j / (mu_j + lambda),
effective_rank = exp(entropy of mu / sum mu), top_eigenvalue, trace. Each is given for the paper's
uncentred second moment and, with the prefix ``centered_``, for the centred covariance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from eigpipe.errors import EigpipeError, NumericalError
from eigpipe.layer_paths import canonical
from eigpipe.provenance import check_writable, record, remove, write_table
from eigpipe.spectral import store
from eigpipe.spectral.jackknife import FOLD_ARRAYS, JACKKNIFE_ARRAYS, SE_MEASURES, leave_one_out, standard_errors

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
    "top_eigenvalue",
    "trace",
    "n_negative_clipped",
)
COVARIANCE_ARRAYS = ("second_moment", "mean")
EIGENVALUE_ARRAYS = ("second_moment", "covariance")


def eigenvalues(
    matrix: np.ndarray, scale: float | None = None, what: str = "matrix", tolerance: float = NEGATIVE_TOLERANCE
) -> tuple[np.ndarray, int]:
    """Descending eigenvalues of the symmetrised float64 matrix with round-off negatives clipped to 0.

    Returns (eigenvalues, how many were clipped). ``scale`` (default: the largest |eigenvalue|) sets how
    negative a value may be and still count as round-off; anything below raises NumericalError.
    """
    a = np.asarray(matrix, dtype=np.float64)
    if not np.isfinite(a).all():
        raise NumericalError(f"{what}: non-finite entries")
    values = np.linalg.eigvalsh((a + a.T) / 2)[::-1]
    scale = float(np.abs(values).max(initial=0.0)) if scale is None else scale
    negative = values < 0
    if negative.any() and values.min() < -tolerance * max(scale, np.finfo(float).tiny):
        raise NumericalError(f"{what}: eigenvalue {values.min():.3g} is far below zero (scale {scale:.3g})")
    return np.where(negative, 0.0, values), int(negative.sum())


def measures(values: np.ndarray, cfg: dict, trace: float | None = None) -> dict:
    """Dimension measures of a clipped, descending spectrum (see the module docstring); ``cfg`` is the
    spectrum section (threshold, relative_threshold, soft_lambda)."""
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
    return {
        "intrinsic_dim": intrinsic,
        "intrinsic_dim_ratio": intrinsic / channels if channels else float("nan"),
        "relative_dim": int((values > cfg["relative_threshold"] * top).sum()) if top > 0 else 0,
        "soft_dof": float((values / (values + cfg["soft_lambda"])).sum()),
        "effective_rank": effective_rank,
        "top_eigenvalue": top,
        "trace": total if trace is None else float(trace),
    }


def layer_spectra(
    second_moment: np.ndarray, mean: np.ndarray, what: str, tolerance: float = NEGATIVE_TOLERANCE
) -> dict[str, tuple[np.ndarray, int]]:
    """Clipped eigenvalues (and clip counts) of the second moment and of the centred covariance."""
    s = np.asarray(second_moment, dtype=np.float64)
    m = np.asarray(mean, dtype=np.float64)
    s_values = eigenvalues(s, what=f"{what}: second moment", tolerance=tolerance)
    scale = float(s_values[0][0]) if len(s_values[0]) else 0.0  # the centred matrix inherits S's round-off
    c_values = eigenvalues(s - np.outer(m, m), scale=scale, what=f"{what}: centred covariance", tolerance=tolerance)
    return {"second_moment": s_values, "covariance": c_values}


def _row(root: dict, name: str, attrs: dict, spectra: dict, traces: dict, cfg: dict) -> dict[str, Any]:
    row: dict[str, Any] = {
        "run": root.get("run"),
        "init": root.get("init"),
        "task": root.get("task"),
        "model_name": root.get("model_name"),
        "iteration": root.get("iteration"),
        "layer": name,
        "canonical": canonical(name),
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
    row.update({key: cfg[key] for key in ("threshold", "relative_threshold", "soft_lambda")})
    return row


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
    """Default eigenvalue store beside a table: ``final.parquet`` -> ``final.zarr``."""
    return Path(out).with_suffix(".zarr")


def decompose(cfg: dict, store_path: Path, out: Path, eigenvalues_out: Path | None = None) -> pd.DataFrame:
    """Eigenvalue store + one table row per layer of a covariance store (section spectrum)."""
    section = cfg["spectrum"]
    check_writable(out)
    remove(Path(out))  # never a new store beside an old table
    rows, eig_arrays, eig_attrs = [], {}, {}
    root = store.store_attrs(store_path, store.COVARIANCE_KIND)
    tolerance = NEGATIVE_TOLERANCE_FLOAT32 if root.get("precision") == "float32" else NEGATIVE_TOLERANCE
    layers = store.iter_layers(store_path, store.COVARIANCE_KIND, COVARIANCE_ARRAYS, optional=FOLD_ARRAYS)
    for name, arrays, attrs in layers:
        second, mean = arrays["second_moment"], arrays["mean"]
        what = f"{store_path}: layer {name}"
        spectra = layer_spectra(second, mean, what=what, tolerance=tolerance)
        traces = {"second_moment": float(np.trace(second)), "covariance": float(np.trace(second) - mean @ mean)}
        rows.append(_row(root, name, attrs, spectra, traces, section))
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
        **{k: v for k, v in root.items() if k not in ("kind", "format_version", "layers")},
        "source_store": str(store_path),
        "spectrum": section,
        "spectrum_provenance": record(config=section, seed=None, device="cpu"),
    }
    # Two outputs: the table is published last and the store names it, so a store whose table is missing
    # (a kill in between) reads as unfinished, never as a complete half (see read_eigenvalues).
    store.write_store(
        eigenvalues_out or eigenvalue_path(out),
        store.EIGENVALUE_KIND,
        eig_arrays,
        {**attrs, "table": str(out)},
        eig_attrs,
    )
    table = pd.DataFrame(rows)
    write_table(out, table)
    return table


def read_eigenvalues(path: Path) -> tuple[dict, dict[str, tuple[store.Arrays, dict]]]:
    """A verified eigenvalue store whose spectrum table was published too (else a one-line error); the
    leave-one-fold-out eigenvalues where the covariance store had folds."""
    attrs, layers = store.read_store(path, store.EIGENVALUE_KIND, EIGENVALUE_ARRAYS, tuple(JACKKNIFE_ARRAYS.values()))
    if "table" in attrs and not Path(attrs["table"]).is_file():
        raise EigpipeError(
            f"{path}: its spectrum table {attrs['table']} is missing: the spectrum stage did not finish; run it again"
        )
    return attrs, layers
