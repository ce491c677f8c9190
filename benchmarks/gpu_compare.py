"""Two finished runs of one study (say on the CPU and on a GPU) compared artifact by artifact.

    .venv/bin/python benchmarks/gpu_compare.py results/smoke other/results/smoke

Numbers only: provenance (host, device, versions), checksums and timings are left out. Per artifact the largest
difference, measured as
  checkpoints (.pt)       max |a - b| / max |a| over each floating tensor (integer tensors must be equal)
  stores (.zarr)          relative Frobenius norm ||a - b|| / ||a|| of each array (covariances, eigenvalues)
  metrics (.jsonl)        |a - b| / max(|a|, |b|) of every logged number (losses, learning rates)
  evaluations (eval/)     |a - b| of every AP / AR (absolute), relative for the rest (complexity)
  tables (.parquet)       relative for float columns; integer cells that differ are counted (eigenvalue counts
                          change only where an eigenvalue lies within the difference of its matrix)
  widths (.yaml)          equal or not; runs trained on derived widths are compared only where the widths agree
An artifact is "within" when its difference is at most TOLERANCE of its kind (README, "Running on a GPU").
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

# CPU against CUDA, both in IEEE float32 (runtime.tf32 false), after the smoke study's few training steps
TOLERANCE = {"checkpoint": 1e-3, "store": 1e-3, "metrics": 1e-3, "evaluation": 0.01, "table": 1e-3, "widths": 0.0}
SKIPPED_KEYS = ("provenance", "sha256", "s_per_it", "seconds", "time", "host", "checkpoint")


def numbers(value: Any, path: str = "") -> Iterator[tuple[str, float]]:
    """(dotted path, number) for every numeric leaf of parsed JSON/YAML, without provenance and timings."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not any(skip in str(key) for skip in SKIPPED_KEYS):
                yield from numbers(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from numbers(item, f"{path}[{i}]")
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield path, float(value)


def relative(a: float, b: float) -> float:
    scale = max(abs(a), abs(b))
    return 0.0 if a == b else (abs(a - b) / scale if scale else math.inf)


def _leaf_difference(a: Any, b: Any, absolute_keys: tuple[str, ...] = ()) -> float:
    left, right = dict(numbers(a)), dict(numbers(b))
    if left.keys() != right.keys():
        return math.inf
    worst = 0.0
    for key, x in left.items():
        y = right[key]
        absolute = any(part in key.rsplit(".", 1)[-1] for part in absolute_keys)
        worst = max(worst, abs(x - y) if absolute else relative(x, y))
    return worst


def checkpoint_difference(a: Path, b: Path) -> float:
    import torch

    left, right = (torch.load(p, map_location="cpu", weights_only=False)["state_dict"] for p in (a, b))
    if left.keys() != right.keys():
        return math.inf
    worst = 0.0
    for name, x in left.items():
        y = right[name]
        if x.shape != y.shape:
            return math.inf
        if not x.is_floating_point():
            worst = max(worst, 0.0 if torch.equal(x, y) else math.inf)
        elif x.numel():
            scale = x.abs().max().item()
            diff = (x.double() - y.double()).abs().max().item()
            worst = max(worst, diff / scale if scale else (0.0 if diff == 0 else math.inf))
    return worst


def store_difference(a: Path, b: Path) -> float:
    import zarr

    left, right = (dict(zarr.open_group(p, mode="r").arrays()) for p in (a, b))
    worst = 0.0 if left.keys() == right.keys() else math.inf
    for name, x in left.items():
        if name in right:
            worst = max(worst, _array_difference(np.asarray(x[...]), np.asarray(right[name][...])))
    for name in (n for n, _ in zarr.open_group(a, mode="r").groups()):
        worst = max(worst, store_difference(Path(a) / name, Path(b) / name))
    return worst


def _array_difference(x: np.ndarray, y: np.ndarray) -> float:
    if x.shape != y.shape:
        return math.inf
    x, y = x.astype(np.float64), y.astype(np.float64)
    norm = np.linalg.norm(x)
    diff = np.linalg.norm(x - y)
    return float(diff / norm) if norm else (0.0 if diff == 0 else math.inf)


def metrics_difference(a: Path, b: Path) -> float:
    left, right = ([json.loads(line) for line in p.read_text().splitlines() if line.strip()] for p in (a, b))
    return _leaf_difference(left, right) if len(left) == len(right) else math.inf


def evaluation_difference(a: Path, b: Path) -> float:
    return _leaf_difference(json.loads(a.read_text()), json.loads(b.read_text()), absolute_keys=("AP", "AR"))


def table_difference(a: Path, b: Path) -> tuple[float, int]:
    """(largest relative difference of the float columns, integer cells that differ)."""
    import pandas as pd

    left, right = pd.read_parquet(a), pd.read_parquet(b)
    if list(left.columns) != list(right.columns) or len(left) != len(right):
        return math.inf, 0
    worst, changed = 0.0, 0
    for column in left.columns:
        x, y = left[column].to_numpy(), right[column].to_numpy()
        if np.issubdtype(x.dtype, np.integer):
            changed += int((x != y).sum())
        elif np.issubdtype(x.dtype, np.floating):
            scale = np.maximum(np.abs(x), np.abs(y))
            diff = np.where(scale > 0, np.abs(x - y) / np.where(scale > 0, scale, 1), 0.0)
            both_nan = np.isnan(x) & np.isnan(y)
            worst = max(worst, float(np.nanmax(np.where(both_nan, 0.0, diff), initial=0.0)))
    return worst, changed


def widths_difference(a: Path, b: Path) -> float:
    """The widths themselves (stem and stages), not the derivation record (which names its inputs' checksums)."""
    left, right = ({key: spec.get(key) for key in ("stem", "stages")} for spec in map(_yaml, (a, b)))
    return 0.0 if left == right else math.inf


def _yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def kind_of(relative_path: Path) -> str | None:
    """Which comparison an artifact gets (None: not compared: logs, report figures, resume state, data)."""
    parts, name = relative_path.parts, relative_path.name
    if parts[0] in ("logs", "benchmarks", "report", "data") or "resume" in parts:
        return None
    if name.endswith(".zarr"):
        return "store"
    suffix = relative_path.suffix
    if suffix == ".pt":
        return "checkpoint"
    if suffix == ".jsonl":
        return "metrics"
    if suffix == ".json" and parts[0] == "eval":
        return "evaluation"
    if suffix == ".parquet":
        return "table"
    if suffix == ".yaml" and parts[0] == "widths":
        return "widths"
    return None


MEASURES = {
    "checkpoint": checkpoint_difference,
    "store": store_difference,
    "metrics": metrics_difference,
    "evaluation": evaluation_difference,
    "widths": widths_difference,
}


def artifacts(root: Path) -> Iterator[tuple[Path, str]]:
    for path in sorted(root.rglob("*")):
        relative_path = path.relative_to(root)
        if any(part.endswith(".zarr") for part in relative_path.parts[:-1]):
            continue  # inside a store
        kind = kind_of(relative_path)
        if kind is not None:
            yield relative_path, kind


def compare_trees(reference: Path, other: Path) -> dict[str, Any]:
    """Every comparable artifact of ``reference`` against the same path under ``other``."""
    reference, other = Path(reference), Path(other)
    rows = []
    differing_widths = {
        p.stem for p, kind in artifacts(reference) if kind == "widths" and _measure(kind, reference / p, other / p)[0]
    }
    for relative_path, kind in artifacts(reference):
        row: dict[str, Any] = {"artifact": str(relative_path), "kind": kind}
        derived_run = any(run in relative_path.parts or relative_path.stem == run for run in differing_widths)
        if derived_run and kind != "widths":
            row["status"] = "skipped: derived widths differ"
        elif not (other / relative_path).exists():
            row["status"] = "missing"
        else:
            difference, changed = _measure(kind, reference / relative_path, other / relative_path)
            row["difference"] = difference if math.isfinite(difference) else "incomparable"
            if kind == "table":
                row["integer_cells_changed"] = changed
            row["status"] = (
                "equal" if difference == 0 else "within" if difference <= TOLERANCE[kind] else "outside tolerance"
            )
        rows.append(row)
    worst: dict[str, float] = {}
    for row in rows:
        if isinstance(row.get("difference"), float):
            worst[row["kind"]] = max(worst.get(row["kind"], 0.0), row["difference"])
    statuses = [row["status"] for row in rows]
    return {
        "tolerance": TOLERANCE,
        "artifacts": len(rows),
        "equal": statuses.count("equal"),
        "within": statuses.count("within"),
        "not_comparable": [row["artifact"] for row in rows if row["status"] not in ("equal", "within")],
        "largest_difference": {kind: float(f"{value:.3g}") for kind, value in sorted(worst.items())},
        "integer_cells_changed": sum(row.get("integer_cells_changed", 0) for row in rows),
        "agree": bool(rows) and all(status in ("equal", "within") for status in statuses if "skipped" not in status),
        "rows": rows,
    }


def _measure(kind: str, a: Path, b: Path) -> tuple[float, int]:
    if kind == "table":
        return table_difference(a, b)
    return MEASURES[kind](a, b), 0


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    result = compare_trees(Path(sys.argv[1]), Path(sys.argv[2]))
    print(json.dumps({key: value for key, value in result.items() if key != "rows"}, indent=2))
    sys.exit(0 if result["agree"] else 1)


if __name__ == "__main__":
    main()
