"""Eigen-decomposition of covariance stores and the dimension measures of each layer.

Measures of a spectrum mu_1 >= ... >= mu_C >= 0 (negative round-off clipped to 0 and counted):
intrinsic_dim = #{mu_j > threshold} (the paper's, threshold 1e-3), intrinsic_dim_ratio = that / C,
soft_dof = sum mu_j / (mu_j + lambda), effective_rank = exp(entropy of mu / sum mu),
top_eigenvalue, trace. Each is given for the paper's uncentred second moment and, with the prefix
``centered_``, for the centred covariance.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from eigpipe import store
from eigpipe.errors import EigpipeError, NumericalError
from eigpipe.provenance import record, write_table

DEFAULTS = {"threshold": 1e-3, "soft_lambda": 1e-3}
# negative eigenvalues beyond this share of the largest one are not round-off: the matrix is broken
NEGATIVE_TOLERANCE = 1e-9
MEASURES = (
    "intrinsic_dim",
    "intrinsic_dim_ratio",
    "soft_dof",
    "effective_rank",
    "top_eigenvalue",
    "trace",
    "n_negative_clipped",
)
PREFIXES = ("backbone.body.", "body.")


def canonical(layer: str) -> str:
    """Layer path without the backbone prefix, so classifier and detector layers line up."""
    for prefix in PREFIXES:
        if layer.startswith(prefix):
            return layer[len(prefix) :]
    return layer


def eigenvalues(matrix: np.ndarray, scale: float | None = None, what: str = "matrix") -> tuple[np.ndarray, int]:
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
    if negative.any() and values.min() < -NEGATIVE_TOLERANCE * max(scale, np.finfo(float).tiny):
        raise NumericalError(f"{what}: eigenvalue {values.min():.3g} is far below zero (scale {scale:.3g})")
    return np.where(negative, 0.0, values), int(negative.sum())


def measures(values: np.ndarray, threshold: float, soft_lambda: float, trace: float | None = None) -> dict:
    """Dimension measures of a clipped, descending spectrum (see the module docstring)."""
    values = np.asarray(values, dtype=np.float64)
    channels = len(values)
    total = float(values.sum())
    intrinsic = int((values > threshold).sum())
    if total > 0:
        p = values[values > 0] / total
        effective_rank = float(np.exp(-(p * np.log(p)).sum()))
    else:
        effective_rank = 0.0
    return {
        "intrinsic_dim": intrinsic,
        "intrinsic_dim_ratio": intrinsic / channels if channels else float("nan"),
        "soft_dof": float((values / (values + soft_lambda)).sum()),
        "effective_rank": effective_rank,
        "top_eigenvalue": float(values[0]) if channels else float("nan"),
        "trace": total if trace is None else float(trace),
    }


def layer_spectra(second_moment: np.ndarray, mean: np.ndarray, what: str) -> dict[str, tuple[np.ndarray, int]]:
    """Clipped eigenvalues (and clip counts) of the second moment and of the centred covariance."""
    s = np.asarray(second_moment, dtype=np.float64)
    m = np.asarray(mean, dtype=np.float64)
    s_values = eigenvalues(s, what=f"{what}: second moment")
    scale = float(s_values[0][0]) if len(s_values[0]) else 0.0  # the centred matrix inherits S's round-off
    c_values = eigenvalues(s - np.outer(m, m), scale=scale, what=f"{what}: centred covariance")
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
    }
    for key, prefix in (("second_moment", ""), ("covariance", "centered_")):
        values, clipped = spectra[key]
        found = measures(values, cfg["threshold"], cfg["soft_lambda"], trace=traces[key])
        found["n_negative_clipped"] = clipped
        row.update({prefix + k: found[k] for k in MEASURES})
    row["threshold"] = cfg["threshold"]
    row["soft_lambda"] = cfg["soft_lambda"]
    return row


def eigenvalue_path(out: str | Path) -> Path:
    """Default eigenvalue store beside a table: ``final.parquet`` -> ``final.zarr``."""
    return Path(out).with_suffix(".zarr")


def decompose_store(
    store_path: str | Path,
    out: str | Path,
    eigenvalues_out: str | Path | None = None,
    cfg: dict | None = None,
) -> pd.DataFrame:
    """The ``eigpipe spectrum`` stage: eigenvalue store + one table row per layer of a covariance store."""
    cfg = {**DEFAULTS, **(cfg or {})}
    rows, eig_arrays, eig_attrs = [], {}, {}
    root = store.covariance_store_attrs(store_path)
    for name, second, mean, attrs in store.iter_covariance_store(store_path):
        spectra = layer_spectra(second, mean, what=f"{store_path}: layer {name}")
        traces = {"second_moment": float(np.trace(second)), "covariance": float(np.trace(second) - mean @ mean)}
        rows.append(_row(root, name, attrs, spectra, traces, cfg))
        eig_arrays[name] = {key: values for key, (values, _) in spectra.items()}
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
        "spectrum": cfg,
        "spectrum_provenance": record(config=cfg, seed=None, device="cpu"),
    }
    store.write_eigenvalue_store(eigenvalues_out or eigenvalue_path(out), eig_arrays, attrs, eig_attrs)
    table = pd.DataFrame(rows)
    write_table(out, table)
    return table


def read_table(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise EigpipeError(f"{path}: table not found")
    return pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)


def dimensions_table(spectra: Sequence[str | Path], out: str | Path | None = None) -> pd.DataFrame:
    """The ``eigpipe dimensions`` stage: all snapshots' tables of a run in one, by (iteration, forward_index)."""
    if not spectra:
        raise EigpipeError("dimensions: no spectrum tables given")
    frames = []
    for path in spectra:
        frame = read_table(path)
        frame["source"] = str(path)
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    duplicated = table.duplicated(subset=["run", "iteration", "layer"], keep=False)
    if duplicated.any():
        first = table[duplicated].iloc[0]
        raise EigpipeError(
            f"dimensions: run {first['run']} iteration {first['iteration']} layer {first['layer']} "
            f"appears in more than one table ({', '.join(sorted(set(table[duplicated]['source'])))})"
        )
    keys = ["run", "iteration", "forward_index"] if table["run"].nunique() > 1 else ["iteration", "forward_index"]
    table = table.sort_values(keys, kind="stable").reset_index(drop=True)
    if out is not None:
        write_table(out, table)
    return table
