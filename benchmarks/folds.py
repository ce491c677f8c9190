"""Cost of covariance.folds: extraction time, peak memory and store size with K folds of the images against none.

    .venv/bin/python benchmarks/folds.py            # the demo model and a ResNet-50 FPN at 512 px, a few minutes
    .venv/bin/python benchmarks/folds.py --quick    # a smoke run of the script itself

Each (model, K) runs in a fresh process: the demo's model (random weights) at 128 px and a torchvision-like
ResNet-50 FPN (standard widths, BN in eval mode) at 512 px, every default layer, float64. It extracts the images
(the `covariance` stage's own accumulate path), records the peak RSS above the warm state (psutil, sampled every
2 ms) and the time, then writes the store as the stage does and records its size on disk. Also the analytic
size of the [C, C] states: (K + 1) x sum over layers of C^2 x 8 bytes. Writes benchmarks/results/folds.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results" / "folds.json"
CASES = {  # images: a multiple of every K, batch as covariance.batch_size
    "demo": {"size": 128, "images": 40, "batch": 8, "folds": [0, 5, 10]},
    "resnet50_fpn": {"size": 512, "images": 10, "batch": 2, "folds": [0, 5]},
}
QUICK = {"demo": {"images": 10, "folds": [0, 5]}, "resnet50_fpn": {"images": 5, "size": 256, "folds": [0, 5]}}


def child(spec: dict) -> dict:
    from covariance import PeakRSS, _model_sections, batches, build

    from eigpipe.spectral import store
    from eigpipe.spectral.extract import layer_arrays
    from eigpipe.spectral.folds import FoldPlan
    from eigpipe.spectral.hooks import accumulate
    from eigpipe.spectral.layers import select_layers

    torch.set_num_threads(spec["threads"])
    case = {**CASES[spec["case"]], **spec["override"]}
    case["model"] = {**_model_sections()[spec["case"]], "min_size": case["size"], "max_size": case["size"]}
    model, meta = build(case, torch.device("cpu"))
    layers = select_layers(model, ["default"])
    accumulate(model, meta, layers, batches(case, case["batch"]), "cpu")  # warm-up
    data, seen = [], 0
    for images, _ in batches(case, case["images"]):  # (image ids of the last, shorter batch as many as its images)
        data.append((images, list(range(seen, seen + len(images)))))
        seen += len(images)
    plan = FoldPlan.consecutive(list(range(case["images"])), spec["folds"]) if spec["folds"] else None
    with PeakRSS() as rss:
        start = time.perf_counter()
        ordered, accs = accumulate(model, meta, layers, data, "cpu", folds=plan)
        seconds = time.perf_counter() - start
    channels = [accs[layer.name].channels for layer in ordered]
    with tempfile.TemporaryDirectory(dir=ROOT / "benchmarks") as tmp:
        path = Path(tmp) / "store.zarr"
        arrays = {layer.name: layer_arrays(accs[layer.name]) for layer in ordered}
        started = time.perf_counter()
        store.write_store(path, store.COVARIANCE_KIND, arrays, {"run": "bench"}, {})
        written = time.perf_counter() - started
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return {
        **spec,
        "images": case["images"],
        "size": case["size"],
        "layers": len(ordered),
        "extract_s": round(seconds, 2),
        "images_per_s": round(case["images"] / seconds, 2),
        "peak_rss_increase_mib": round(rss.delta_mib, 1),
        "state_mib": round((spec["folds"] + 1) * sum(c * c for c in channels) * 8 / 2**20, 1),
        "store_mib": round(size / 2**20, 2),
        "write_s": round(written, 2),
    }


def measure(spec: dict) -> dict:
    from covariance import run_child

    result = run_child(__file__, spec)
    print(
        f"{result['case']:13} K={result['folds']:2} {result['images_per_s']:6.2f} img/s  "
        f"+{result['peak_rss_increase_mib']:7.1f} MiB RSS  states {result['state_mib']:7.1f} MiB  "
        f"store {result['store_mib']:8.2f} MiB",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: test the script itself")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    results = []
    for name, case in CASES.items():
        override = QUICK[name] if args.quick else {}
        for folds in override.get("folds", case["folds"]):
            results.append(measure({"case": name, "folds": folds, "threads": args.threads, "override": override}))
    from eigpipe.provenance import write_json

    write_json(args.out, {"command": " ".join(sys.argv), "torch": torch.__version__, "results": results})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
