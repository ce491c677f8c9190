"""The float32 mode's error on the demo's own stores: every float64 store under results/demo/covariance is
re-extracted with covariance.precision float32 (same checkpoint, images, layers and batch size, from the
store's attributes and config/config.yaml) and compared with it layer by layer: relative (Frobenius) error
of the second moment and of the centred covariance, and the intrinsic-dimension counts at the paper's 1e-3
threshold. A count may only change where an eigenvalue lies within the error band of the threshold (Weyl:
the spectral norm of the difference); such layers are counted. Writes benchmarks/results/precision.json.

    make demo && .venv/bin/python benchmarks/precision.py     # about 2 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "precision.json"
THRESHOLD = 1e-3  # the paper's eigenvalue threshold (spectrum.threshold)


def matrices(path: Path) -> dict[str, dict[str, np.ndarray]]:
    from eigpipe.spectral import store

    _, layers = store.read_store(path, store.COVARIANCE_KIND, ["second_moment", "mean"])
    out = {}
    for name, (data, _) in layers.items():
        second, mean = data["second_moment"], data["mean"]
        out[name] = {"second_moment": second, "covariance": second - np.outer(mean, mean)}
    return out


def compare(exact: dict[str, np.ndarray], fast: dict[str, np.ndarray]) -> dict[str, float | int]:
    """Errors and count agreement of one layer, for the second moment and the centred covariance."""
    row: dict[str, float | int] = {"near_threshold": 0, "count_changed": 0, "count_changed_outside_band": 0}
    for key in ("second_moment", "covariance"):
        difference = fast[key] - exact[key]
        row[f"{key}_error"] = float(np.linalg.norm(difference) / (np.linalg.norm(exact[key]) or 1.0))
        band = np.linalg.norm(difference, 2)
        values = np.linalg.eigvalsh(exact[key])
        near = int((np.abs(values - THRESHOLD) <= band).sum())
        changed = abs(int((np.linalg.eigvalsh(fast[key]) > THRESHOLD).sum()) - int((values > THRESHOLD).sum()))
        row["near_threshold"] += near > 0
        row["count_changed"] += changed > 0
        row["count_changed_outside_band"] += changed > near
    return row


def summary(rows: list[dict]) -> dict:
    """Largest and median errors, and how many layers lie near the threshold or changed their count."""
    errors = {key: [row[f"{key}_error"] for row in rows] for key in ("second_moment", "covariance")}
    return {
        "layers": len(rows),
        **{f"{key}_error_max": max(values) for key, values in errors.items()},
        **{f"{key}_error_median": float(np.median(values)) for key, values in errors.items()},
        **{
            f"layers_{field}": sum(row[field] > 0 for row in rows)
            for field in ("near_threshold", "count_changed", "count_changed_outside_band")
        },
    }


def reextract(path: Path, cfg: dict, out: Path) -> float:
    """The store at ``path`` again in float32; seconds taken."""
    from eigpipe.spectral import store
    from eigpipe.spectral.extract import extract

    attrs = store.store_attrs(path, store.COVARIANCE_KIND)
    section = {**cfg["covariance"], "precision": "float32", "images": attrs["n_images"], "layers": attrs["selectors"]}
    start = time.perf_counter()
    extract(
        {**cfg, "covariance": section},
        ROOT / attrs["checkpoint"],
        ROOT / attrs["dataset"]["annotations"],
        ROOT / attrs["dataset"]["images"],
        out,
    )
    return time.perf_counter() - start


def main() -> None:
    from eigpipe import config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stores", type=Path, default=ROOT / "results" / "demo" / "covariance")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    stores = sorted(args.stores.glob("*/*.zarr"))
    if not stores:
        sys.exit(f"{args.stores}: no covariance stores (run `make demo` first)")
    demo = config.load(ROOT / "config" / "config.yaml")
    cfg = {"covariance": demo["covariance"], "runtime": {**demo["runtime"], "threads": 2}, "seed": demo["seed"]}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in stores:
            fast_path = Path(tmp) / f"{path.parent.name}-{path.name}"
            seconds = reextract(path, cfg, fast_path)
            exact, fast = matrices(path), matrices(fast_path)
            for name in exact:
                rows.append({"store": str(path.relative_to(ROOT)), "layer": name, **compare(exact[name], fast[name])})
            print(
                f"{path.relative_to(ROOT)}: {len(exact)} layers re-extracted in float32 in {seconds:.1f} s", flush=True
            )
    overall = {"stores": len(stores), **summary(rows)}
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "torch": torch.__version__,
        "threshold": THRESHOLD,
        "summary": overall,
        "stores": {
            store: summary([r for r in rows if r["store"] == store])
            for store in dict.fromkeys(r["store"] for r in rows)
        },
        "layers_near_threshold": [row for row in rows if row["near_threshold"]],
    }
    from eigpipe.provenance import write_json

    write_json(args.out, report)  # atomically: a killed run leaves the previous results in place
    print(json.dumps(overall, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
