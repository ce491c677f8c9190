"""eigpipe.track side by side with delve (delve-team/delve, PyPI ``delve`` 0.1.50, its last release): the same
model, the same images and the same layers (every Conv2d and Linear, each module's own output), in one process.

    pip install --no-deps --target /tmp/delve-site delve==0.1.50    # delve's own code only; torch etc. from .venv
    PYTHONPATH=/tmp/delve-site .venv/bin/python benchmarks/versus_delve.py  # 1-6 minutes on 2 cores
    PYTHONPATH=/tmp/delve-site .venv/bin/python benchmarks/versus_delve.py --quick   # a smoke run of the script

Throughput: rounds of plain inference, inference under eigpipe.track (float64) and inference under delve's
SaturationTracker, interleaved, on a standard-width torchvision ResNet-50 at 224 px (every Conv2d and the fc) and
on the demo detector's backbone (1/8-width GroupNorm ResNet-50 body and FPN, 128 px, every conv of the body);
streaming images/s per round and the ratio eigpipe / delve of each round, whose median (and quartiles) is
reported, by wall clock and by this process's CPU time (steadier on a shared machine); and each tool's one-off
finalisation after the stream (eigenvalues and measures), in seconds. The float64 bound: the float64 Gram
products alone, against the time per image eigpipe may add to plain inference for 1.5x delve's throughput.

Agreement, on one batch (delve 0.1.50 starts a fresh
covariance at every forward pass while it records: after several batches it holds the last one only, which is
measured and recorded here too): each layer's centred covariance (relative Frobenius difference) and delve's
saturation (eigpipe's centered_saturation against delve's compute_saturation at 0.99).
Writes benchmarks/results/versus_delve.json.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "versus_delve.json"
CASES = {
    "resnet50_224": {"images": 16, "batch": 8, "rounds": 4},
    "demo_128": {"images": 64, "batch": 8, "rounds": 16},  # short rounds: 16 of them for a steady median
}
QUICK = {"images": 4, "batch": 2, "rounds": 1}


def build(case: str) -> tuple[nn.Module, list[Any], Callable[[str], bool]]:
    """(model in eval mode, its batches, which delve layer names to keep), the same for both tools."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    spec = CASES[case]
    if case == "resnet50_224":
        import torchvision

        model = torchvision.models.resnet50().eval()
        images = torch.rand(spec["images"], 3, 224, 224, generator=generator)
        mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
        images = (images - mean) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
        batches = list(images.split(spec["batch"]))
        return model, batches, lambda name: True
    from eigpipe import config
    from eigpipe.models import build_detector

    # the part of the detector that extraction runs (eigpipe.models.taps.runner_path): body + FPN on the
    # transformed batch (128 px, normalised as the detector's transform does)
    detector = build_detector("faster_rcnn", config.load(ROOT / "config" / "config.yaml")["model"], 4).eval()
    images = [torch.rand(3, 128, 128, generator=generator) for _ in range(spec["images"])]
    with torch.inference_mode():
        batched = detector.transform(images)[0].tensors.clone()
    return detector.backbone, list(batched.split(spec["batch"])), lambda name: name.startswith("body-")


def selectors(case: str) -> list[str]:
    return ["Conv2d:*", "Linear:*"] if case == "resnet50_224" else ["Conv2d:body.*"]


def delve_tracker(model: nn.Module, keep: Callable[[str], bool], folder: str) -> Any:
    import delve

    def layer_filter(layers: dict) -> dict:
        return {name: layer for name, layer in layers.items() if keep(name)}

    return delve.SaturationTracker(
        folder, save_to="csv", modules=model, layer_filter=layer_filter, stats=["lsat"], device="cpu"
    )


def throughput(case: str, rounds: int) -> dict[str, Any]:
    """Streaming images/s of each method per round (interleaved), and each tool's finalisation (eigpipe's
    tracker.spectra(): every measure of both matrices; delve's add_saturations: its saturation per layer)."""
    import eigpipe

    model, batches, keep = build(case)
    images = sum(len(b) for b in batches)
    delve_model = copy.deepcopy(model)  # delve's hooks stay on its model for good
    methods = ("plain", "eigpipe", "eigpipe_float32", "delve")
    found: dict[str, list[float]] = {key: [] for method in methods for key in (method, f"{method}_cpu")}
    found.update(eigpipe_final_s=[], delve_final_s=[])
    with tempfile.TemporaryDirectory() as folder, torch.inference_mode():
        tracker = delve_tracker(delve_model, keep, folder)

        def stream(net: nn.Module, key: str) -> None:
            start, cpu = time.perf_counter(), time.process_time()
            for batch in batches:
                net(batch)
            found[key].append(images / (time.perf_counter() - start))
            found[f"{key}_cpu"].append(images / (time.process_time() - cpu))

        for batch in batches[:1]:
            model(batch)  # warm-up
        # each tool keeps one tracker for the whole stream, as delve keeps its hooks: ours are entered per round
        ours = eigpipe.track(model, selectors(case), tap="output")
        ours_float32 = eigpipe.track(model, selectors(case), tap="output", precision="float32")
        for round_ in range(rounds):
            stream(model, "plain")
            with ours:
                stream(model, "eigpipe")
            with ours_float32:
                stream(model, "eigpipe_float32")
            stream(delve_model, "delve")
            if round_ == 0:  # the one-off finalisation, once
                start = time.perf_counter()
                ours.spectra()
                found["eigpipe_final_s"].append(time.perf_counter() - start)
                start = time.perf_counter()
                tracker.add_saturations(save=False)
                found["delve_final_s"].append(time.perf_counter() - start)

    def per_round(a: str, b: str) -> list[float]:
        return [x / y for x, y in zip(found[a], found[b], strict=True)]

    def ratio(a: str, b: str) -> float:
        return round(statistics.median(per_round(a, b)), 3)

    def quartiles(a: str, b: str) -> list[float]:
        values = per_round(a, b)
        return [round(q, 3) for q in statistics.quantiles(values, n=4)] if len(values) > 1 else []

    ratios = per_round("eigpipe", "delve")
    median = {key: round(statistics.median(values), 3) for key, values in found.items()}
    return {
        "images_per_round": images,
        "per_round": {key: [round(v, 3) for v in values] for key, values in found.items()},
        "median": median,
        "eigpipe_over_delve_per_round": [round(r, 3) for r in ratios],
        "eigpipe_over_delve": round(statistics.median(ratios), 3),
        "eigpipe_float32_over_delve": ratio("eigpipe_float32", "delve"),
        "quartiles_of_the_rounds": {  # how sure: the per-round ratios' quartiles
            "eigpipe_over_delve": quartiles("eigpipe", "delve"),
            "eigpipe_float32_over_delve": quartiles("eigpipe_float32", "delve"),
        },
        "by_cpu_time": {
            "eigpipe_over_delve": ratio("eigpipe_cpu", "delve_cpu"),
            "eigpipe_float32_over_delve": ratio("eigpipe_float32_cpu", "delve_cpu"),
            "eigpipe_over_plain": ratio("eigpipe_cpu", "plain_cpu"),
            "delve_over_plain": ratio("delve_cpu", "plain_cpu"),
        },
        "eigpipe_over_plain": round(median["eigpipe"] / median["plain"], 3),
        "delve_over_plain": round(median["delve"] / median["plain"], 3),
    }


def gram_bound(case: str, throughput_found: dict[str, Any]) -> dict[str, Any]:
    """What float64 may cost at best: the Gram products alone (no copy, centring, hook or merge), for each layer the
    cheaper of the accumulator's two ways (one product per image, batched; the lower panel triangle over all the
    batch's positions, CovarianceAccumulator._gram) on random operands of its shape, best of 10, summed over the
    layers; beside the time per image eigpipe may add to plain inference for 1.5x delve's throughput."""
    import eigpipe
    from eigpipe.spectral.accumulator import CovarianceAccumulator

    model, batches, _ = build(case)
    with torch.inference_mode():
        with eigpipe.track(model, selectors(case), tap="output") as ours:
            model(batches[0])
        shapes = [layer.feature_shape for layer in ours.layers]
        batch = len(batches[0])

        def best(product: Callable[[], Any]) -> float:
            times = []
            for _ in range(10):
                start = time.perf_counter()
                product()
                times.append(time.perf_counter() - start)
            return min(times)

        total = 0.0
        for channels, *spatial in shapes:
            positions = int(np.prod(spatial)) if spatial else 1
            images = torch.randn(batch, channels, positions, dtype=torch.float64)
            flat = images.permute(1, 0, 2).reshape(channels, -1).contiguous()
            per_image = torch.zeros(batch, channels, channels, dtype=torch.float64)
            acc = CovarianceAccumulator(channels)
            total += min(
                best(lambda: per_image.baddbmm_(images, images.transpose(1, 2))),  # noqa: B023 (timed at once)
                best(lambda: acc._gram(flat, alpha=1.0)),  # noqa: B023
            )
    median = throughput_found["median"]
    budget = 1e3 * (1 / (1.5 * median["delve"]) - 1 / median["plain"])
    return {
        "float64_gram_products_ms_per_image": round(1e3 * total / batch, 3),
        "budget_ms_per_image_for_1.5x_delve": round(budget, 3),
        "eigpipe_float64_adds_ms_per_image": round(1e3 * (1 / median["eigpipe"] - 1 / median["plain"]), 3),
        "eigpipe_float32_adds_ms_per_image": round(1e3 * (1 / median["eigpipe_float32"] - 1 / median["plain"]), 3),
    }


def agreement(case: str) -> dict[str, Any]:
    """Both tools on the same batches; delve keeps only the last batch, so the comparison is on one batch."""
    from delve.metrics import compute_saturation

    import eigpipe
    from eigpipe.spectral.measures import saturation_dim
    from eigpipe.spectral.spectrum import eigenvalues

    model, batches, keep = build(case)
    delve_model = copy.deepcopy(model)
    with tempfile.TemporaryDirectory() as folder, torch.inference_mode():
        tracker = delve_tracker(delve_model, keep, folder)
        for batch in batches[:2]:
            delve_model(batch)
        logs = tracker.logs["eval-covariance-matrix"]
        positions_after_two = {name: int(cov._tlen) for name, cov in logs.items()}
        with eigpipe.track(model, selectors(case), tap="output") as ours:
            model(batches[1])
    accs = ours.accumulators
    errors, equal, saturations = {}, 0, {}
    for name, layer in logs.items():
        mine = name.replace("-", ".")
        theirs = layer.fix(center=True).double()
        cov = accs[mine].covariance
        errors[mine] = float(torch.linalg.norm(cov - theirs) / torch.linalg.norm(cov))
        values, _ = eigenvalues(cov.numpy())
        pair = (saturation_dim(values, 0.99) / len(values), float(compute_saturation(theirs, thresh=0.99)))
        saturations[mine] = pair
        equal += pair[0] == pair[1]
    one_batch = {name.replace("-", "."): int(accs[name.replace("-", ".")].positions) for name in positions_after_two}
    return {
        "layers": len(errors),
        "covariance_max_relative_difference": max(errors.values()),
        "covariance_median_relative_difference": float(np.median(list(errors.values()))),
        "saturation_equal_layers": int(equal),
        "saturation_max_abs_difference": max(abs(a - b) for a, b in saturations.values()),
        "delve_positions_after_two_batches_equal_one_batch": all(
            positions_after_two[name] == one_batch[name.replace("-", ".")] for name in positions_after_two
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check that the script runs")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    try:
        import delve
    except ImportError:
        print(
            "benchmarks/versus_delve.py: delve is not importable (see the docstring: pip install --target)",
            file=sys.stderr,
        )
        return 1
    from eigpipe import provenance

    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {
        "command": " ".join(["benchmarks/versus_delve.py", *(argv if argv is not None else sys.argv[1:])]),
        "delve_version": delve.__version__,
        "torch": torch.__version__,
        "threads": args.threads,
        "cpu": provenance.cpu_model(),
        "date": time.strftime("%Y-%m-%d"),
        "cases": {},
    }
    for case in args.cases:
        if args.quick:
            CASES[case].update(QUICK)
        print(f"{case}: throughput ...", file=sys.stderr, flush=True)
        found = {"setup": dict(CASES[case]), "throughput": throughput(case, CASES[case]["rounds"])}
        print(f"{case}: the float64 Gram products alone ...", file=sys.stderr, flush=True)
        found["float64_bound"] = gram_bound(case, found["throughput"])
        print(f"{case}: agreement ...", file=sys.stderr, flush=True)
        found["agreement"] = agreement(case)
        results["cases"][case] = found
        print(f"{case}: {found}", file=sys.stderr, flush=True)
    provenance.write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
