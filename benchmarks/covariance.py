"""Cost of covariance extraction: images/s and peak memory of plain inference (the backbone/FPN forward
that extraction runs), hooked extraction with the streaming accumulator in both precisions
(covariance.precision float64 and float32), and a naive store-every-feature-then-numpy approach.

    .venv/bin/python benchmarks/covariance.py            # CPU (and CUDA when there is one), 5-8 min on 2 cores
    .venv/bin/python benchmarks/covariance.py --quick    # a smoke run of the script itself

Throughput: one process per case runs the methods interleaved, round by round, and keeps each
method's best round (fair when the machine is shared). Each round streams more images than a memory run,
so that the one-off setup of the [C, C] states weighs per image as little as in a real extraction. Memory:
each (method, image count) in a fresh process, one pass: the peak resident set size (RSS, sampled every
2 ms by psutil in a thread) above the RSS after building the model and one warm-up batch; on CUDA, the
peak of torch.cuda.max_memory_allocated above the allocation before the measured pass.
Writes benchmarks/results/covariance.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import psutil
import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "covariance.json"


def _model_sections() -> dict[str, dict]:
    """The demo's model section, read from config/config.yaml, and a torchvision-like ResNet-50 FPN (standard
    widths, BN in eval mode) completed by the schema."""
    from eigpipe import config

    demo = config.load(ROOT / "config" / "config.yaml")["model"]
    r50 = config.validate(
        {"width_multiplier": 1.0, "norm": "bn", "fpn_channels": 256},
        "benchmark",
        config.schema()["properties"]["model"],
    )
    return {"demo": demo, "resnet50_fpn": r50}


# images: per memory run (and twice that); stream: per throughput round, long enough that the per-run setup
# (allocating and first touching the [C, C] states, the final symmetrisation: 0.4-0.8 s measured at standard
# width on 2 cores) is a small share, as in a real extraction of thousands of images
CASES = {
    "demo": {"size": 128, "images": 64, "stream": 64, "batch": 8, "reps": 3},
    "resnet50_fpn": {"size": 512, "images": 4, "stream": 10, "batch": 2, "reps": 2},
}
GEMM_DTYPES = ("float64", "float32")  # the Gram-product dtypes of covariance.precision
QUICK = {"demo": {"images": 16, "stream": 16}, "resnet50_fpn": {"images": 2, "stream": 2, "size": 256}}


# ---- child: one measurement -----------------------------------------------------------------------------


class PeakRSS:
    """Peak RSS above the RSS at start, sampled in a thread."""

    def __init__(self, interval: float = 0.002) -> None:
        self.proc = psutil.Process()
        self.interval = interval
        self.start = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def delta_mib(self) -> float:
        return (self.peak - self.start) / 2**20


def build(case: dict, device: torch.device) -> tuple[torch.nn.Module, dict]:
    from eigpipe.models import build_detector

    torch.manual_seed(0)
    model = build_detector("faster_rcnn", case["model"], num_classes=4).to(device).eval()
    meta = {"task": "detection", "model_config": case["model"], "run": "bench"}
    return model, meta


def batches(case: dict, n: int) -> list[tuple[list[torch.Tensor], list[int]]]:
    gen = torch.Generator().manual_seed(1)
    size, batch = case["size"], case["batch"]
    images = [torch.rand(3, size, size, generator=gen) for _ in range(n)]
    return [(images[i : i + batch], list(range(i, i + batch))) for i in range(0, n, batch)]


def plain(model: torch.nn.Module, meta: dict, layers: list, data: list, device: torch.device) -> None:
    from eigpipe.models.taps import runner_path
    from eigpipe.spectral.hooks import input_transform

    transform = input_transform(model, meta).eval()
    runner = model.get_submodule(runner_path(model, [n for layer in layers for n in (layer.tap, layer.name)]))
    with torch.inference_mode():
        for images, _ in data:
            batched, _ = transform([img.to(device) for img in images])
            runner(batched.tensors)


def extraction(
    model: torch.nn.Module, meta: dict, layers: list, data: list, device: torch.device, precision: str = "float64"
) -> None:
    from eigpipe.spectral.hooks import accumulate

    _, accs = accumulate(model, meta, layers, data, device, precision=precision)
    for acc in accs.values():  # what the store writes
        acc.second_moment.cpu(), acc.mean.cpu()


def extraction_float32_unmapped(
    model: torch.nn.Module, meta: dict, layers: list, data: list, device: torch.device
) -> None:
    """float32 extraction with every layer's Gram products, as for GroupNorm models: no conv3 statistics
    mapped from conv2's (eigpipe.spectral.affine)."""
    with mock.patch("eigpipe.spectral.hooks.affine_maps", return_value={}):
        extraction(model, meta, layers, data, device, precision="float32")


def naive(model: torch.nn.Module, meta: dict, layers: list, data: list, device: torch.device) -> None:
    """Keep every feature map (float32, on the CPU), then per layer the image-averaged second moment and
    np.cov of all positions in float64."""
    kept: dict[str, list[np.ndarray]] = {layer.name: [] for layer in layers}
    handles = []
    for layer in layers:

        def hook(_m: Any, _i: Any, out: torch.Tensor, name: str = layer.name) -> None:
            kept[name].append(out.detach().float().cpu().numpy().copy())

        handles.append(model.get_submodule(layer.tap).register_forward_hook(hook))
    try:
        plain(model, meta, layers, data, device)
    finally:
        for h in handles:
            h.remove()
    for name, maps in kept.items():
        feats = np.concatenate(maps).astype(np.float64)  # [N, C, H, W], equal sizes here
        n, c = feats.shape[:2]
        flat = feats.reshape(n, c, -1)
        _second = np.tensordot(flat, flat, axes=([0, 2], [0, 2])) / (n * flat.shape[2])  # BLAS
        _cov = np.cov(flat.transpose(1, 0, 2).reshape(c, -1))
        kept[name] = []


METHODS = {
    "plain": plain,
    "extraction": extraction,  # float64, the default
    "extraction_float32": functools.partial(extraction, precision="float32"),
    "extraction_float32_unmapped": extraction_float32_unmapped,
    "naive": naive,
}


def _setup(spec: dict) -> tuple[dict, torch.nn.Module, dict, list, torch.device]:
    from eigpipe.spectral.layers import select_layers

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    case = {**CASES[spec["case"]], **spec.get("override", {})}
    case["model"] = {**_model_sections()[spec["case"]], "min_size": case["size"], "max_size": case["size"]}
    model, meta = build(case, device)
    return case, model, meta, select_layers(model, ["default"]), device


def _timed(method: Any, args: tuple, device: torch.device) -> float:
    start = time.perf_counter()
    method(*args)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def child_throughput(spec: dict) -> dict:
    """All methods in one process, interleaved round by round, best round each: fair on a shared machine."""
    case, model, meta, layers, device = _setup(spec)
    for method in METHODS.values():  # warm-up (allocator, kernels)
        method(model, meta, layers, batches(case, case["batch"]), device)
    data = batches(case, spec["images"])
    rounds: dict[str, list[float]] = {name: [] for name in METHODS}
    for _ in range(spec["reps"]):
        for name, method in METHODS.items():
            rounds[name].append(_timed(method, (model, meta, layers, data, device), device))
    best = {name: min(times) for name, times in rounds.items()}
    return {
        **spec,
        "model": case["model"],
        "layers": len(layers),
        **work_per_image(case, model, meta, layers, device),
        "images_per_s": {name: round(spec["images"] / t, 3) for name, t in best.items()},
        "seconds_per_round": {name: [round(t, 3) for t in times] for name, times in rounds.items()},
    }


def work_per_image(case: dict, model: torch.nn.Module, meta: dict, layers: list, device: torch.device) -> dict:
    """Multiply-adds of the forward (float32) and the least the Gram updates of each precision need (C(C+1)/2
    per position: the symmetric half; float32 maps some layers instead, see eigpipe.spectral.affine) for one
    image, and this device's GEMM rates in float64 and float32."""
    from torch.utils.flop_counter import FlopCounterMode

    from eigpipe.spectral.hooks import accumulate

    one = batches(case, 1)[:1]
    shapes = {}
    for dtype in GEMM_DTYPES:
        ordered, _ = accumulate(model, meta, layers, one, device, precision=dtype)
        shapes[dtype] = [layer.feature_shape for layer in ordered if not layer.mapped_from]
    with FlopCounterMode(display=False) as counter:
        plain(model, meta, layers, one, device)
    return {
        "forward_macs_per_image": counter.get_total_flops() // 2,
        "mapped_layers_float32": len(layers) - len(shapes["float32"]),
        **{
            f"{dtype}_gram_macs_per_image": sum(c * (c + 1) // 2 * h * w for c, h, w in shapes[dtype])
            for dtype in GEMM_DTYPES
        },
        **{f"{dtype}_gemm_macs_per_s": gemm_rate(device, getattr(torch, dtype)) for dtype in GEMM_DTYPES},
        **{
            f"{dtype}_gram_kernel_seconds_per_image": gram_kernel_seconds(shapes[dtype], case["batch"], device, dtype)
            for dtype in GEMM_DTYPES
        },
    }


def gram_kernel_seconds(shapes: list, batch: int, device: torch.device, precision: str) -> float:
    """Seconds per image of the accumulator's own Gram products alone (its blocking, its dtype rules), on
    operands of the shapes extraction feeds it, best of 3 per layer: extraction's cost beyond plain inference
    if the hooks, copies and centring were free."""
    from eigpipe.spectral.accumulator import CovarianceAccumulator, ieee_float32

    total = 0.0
    for c, h, w in shapes:
        acc = CovarianceAccumulator(c, device, precision=precision)
        dtype = torch.float32 if precision == "float32" and c >= acc.NARROW else torch.float64
        operand = torch.randn(c, batch * h * w + batch + 1, dtype=dtype, device=device)
        target = torch.zeros(c, c, dtype=dtype, device=device)
        with ieee_float32():
            total += min(
                _timed(acc._gram, (operand, 1.0 / (h * w), target), device) for _ in range(3)
            )  # the accumulator's kernel, as it runs it
    return total / batch


def gemm_rate(device: torch.device, dtype: torch.dtype, channels: int = 1024, positions: int = 16384) -> float:
    """Multiply-adds per second of X Xᵀ (best of 3), the kernel of the Gram updates (float32: TF32 off)."""
    from eigpipe.spectral.accumulator import ieee_float32

    x = torch.randn(channels, positions, dtype=dtype, device=device)
    with ieee_float32():
        best = min(_timed(lambda: torch.mm(x, x.T), (), device) for _ in range(3))
    return channels * channels * positions / best


def child_memory(spec: dict) -> dict:
    """One method, one pass over the images, in a fresh process: its peak memory above the warm state."""
    case, model, meta, layers, device = _setup(spec)
    method = METHODS[spec["method"]]
    method(model, meta, layers, batches(case, case["batch"]), device)  # warm-up
    data = batches(case, spec["images"])
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with PeakRSS() as rss:
        seconds = _timed(method, (model, meta, layers, data, device), device)
    result = {**spec, "seconds": round(seconds, 3), "peak_rss_increase_mib": round(rss.delta_mib, 1)}
    if device.type == "cuda":
        result["peak_cuda_increase_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
    return result


def child(spec: dict) -> dict:
    return child_throughput(spec) if spec["kind"] == "throughput" else child_memory(spec)


# ---- parent ---------------------------------------------------------------------------------------------


def run_child(script: str, spec: dict) -> dict:
    """Run ``script --child SPEC`` in a fresh process (its own peak memory, no state shared with other cases)
    and return the JSON it prints last."""
    done = subprocess.run(
        [sys.executable, script, "--child", json.dumps(spec)], capture_output=True, text=True, cwd=ROOT
    )
    if done.returncode != 0:
        raise RuntimeError(f"{spec}: failed\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(spec: dict) -> dict:
    result = run_child(__file__, spec)
    head = f"{result['device']:4} {result['case']:13} n={result['images']:3}"
    if spec["kind"] == "throughput":
        rates = "  ".join(f"{k} {v:.2f} img/s" for k, v in result["images_per_s"].items())
        print(f"{head} throughput  {rates}", flush=True)
    else:
        cuda = f"  +{result['peak_cuda_increase_mib']:.1f} MiB CUDA" if "peak_cuda_increase_mib" in result else ""
        print(f"{head} memory {result['method']:10} +{result['peak_rss_increase_mib']:7.1f} MiB RSS{cuda}", flush=True)
    return result


def run_case(name: str, device: str, threads: int, quick: bool) -> dict:
    override = QUICK[name] if quick else {}
    case = {**CASES[name], **override}
    n = case["images"]
    spec = {"case": name, "device": device, "threads": threads, "override": override}
    speed = measure({**spec, "kind": "throughput", "images": case["stream"], "reps": case["reps"]})
    memory = [
        measure({**spec, "kind": "memory", "method": method, "images": count})
        for method, count in [
            ("plain", n),
            ("extraction", n),
            ("extraction", 2 * n),
            ("extraction_float32", n),
            ("naive", n),
            ("naive", 2 * n),
        ]
    ]
    rates = speed["images_per_s"]
    peak = {(m["method"], m["images"]): m["peak_rss_increase_mib"] for m in memory}
    bounds = extraction_bounds(rates["plain"], speed)
    ratios = {dtype: rates[method] / rates["plain"] for dtype, method in EXTRACTION.items()}
    return {
        "case": name,
        "device": device,
        "image_size": override.get("size", CASES[name]["size"]),
        "batch_size": CASES[name]["batch"],
        "layers_hooked": speed["layers"],
        "model": speed["model"],
        "images_per_s": rates,
        "extraction_vs_plain_throughput": round(ratios["float64"], 3),
        "float32_extraction_vs_plain_throughput": round(ratios["float32"], 3),
        "float32_unmapped_extraction_vs_plain_throughput": round(
            rates["extraction_float32_unmapped"] / rates["plain"], 3
        ),
        "naive_vs_plain_throughput": round(rates["naive"] / rates["plain"], 3),
        "forward_macs_per_image": speed["forward_macs_per_image"],
        "mapped_layers_float32": speed["mapped_layers_float32"],
        **{f"{dtype}_gram_macs_per_image": speed[f"{dtype}_gram_macs_per_image"] for dtype in GEMM_DTYPES},
        **{
            f"{dtype}_gram_vs_forward_macs": round(
                speed[f"{dtype}_gram_macs_per_image"] / speed["forward_macs_per_image"], 3
            )
            for dtype in GEMM_DTYPES
        },
        **bounds,
        **{
            f"{dtype}_extraction_vs_{bound}": round(ratios[dtype] / bounds[f"{dtype}_{kind}"], 3)
            for dtype in GEMM_DTYPES
            for bound, kind in (("bound", "extraction_bound"), ("kernel_bound", "gram_kernel_bound"))
        },
        "peak_rss_increase_mib": {
            f"{method}@{count}": peak[(method, count)] for method, count in sorted(peak, key=lambda k: (k[0], k[1]))
        },
        "throughput_run": speed,
        "memory_runs": memory,
    }


EXTRACTION = {"float64": "extraction", "float32": "extraction_float32"}  # precision -> method


def extraction_bounds(plain_images_per_s: float, speed: dict) -> dict:
    """Per GEMM dtype, the most extraction/plain can be when the Gram products run in it: plain inference
    plus the symmetric minimum of the Gram multiply-adds that precision runs at the measured GEMM peak, with
    no other cost (the bound); and plain inference plus the accumulator's Gram kernels as timed alone (the
    kernel bound)."""
    bounds = {}
    for dtype in GEMM_DTYPES:
        rate = speed[f"{dtype}_gemm_macs_per_s"]
        gram_seconds = speed[f"{dtype}_gram_macs_per_image"] / rate  # per image, at GEMM peak
        bounds[f"{dtype}_gemm_gmacs_per_s"] = round(rate / 1e9, 2)
        bounds[f"{dtype}_extraction_bound"] = round(1 / (1 + plain_images_per_s * gram_seconds), 3)
        kernel = speed[f"{dtype}_gram_kernel_seconds_per_image"]
        bounds[f"{dtype}_gram_kernel_bound"] = round(1 / (1 + plain_images_per_s * kernel), 3)
    return bounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check that the script runs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    from eigpipe import provenance

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    start, load_before = time.perf_counter(), os.getloadavg()
    results = [run_case(name, dev, args.threads, args.quick) for dev in devices for name in args.cases]
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cpu": provenance.cpu_model(),
            "cores": os.cpu_count(),
            "threads": args.threads,
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average_before_after": [round(x, 2) for x in (*load_before, *os.getloadavg())],
        },
        "torch": torch.__version__,
        "numpy": np.__version__,
        "quick": args.quick,
        "memory_method": "peak RSS above the post-warm-up RSS, psutil sampled every 2 ms, one fresh process each",
        "throughput_method": "methods interleaved round by round in one process, best round per method",
        "plain": "the same transform + backbone/FPN forward that extraction runs, without hooks",
        "naive": "hooks keep every feature map (float32, CPU), then image-averaged second moment and np.cov",
        "extraction_float32_unmapped": "float32 extraction without the conv3 statistics mapped from conv2's (what "
        "GroupNorm models run)",
        "target": "CPU: float32 extraction >= 0.6 x plain at standard width (resnet50_fpn, 512 px); float64 "
        "extraction >= 0.85 x its bound there; demo float64 extraction >= 0.6 x plain",
        "wall_seconds": round(time.perf_counter() - start, 1),
        "results": results,
    }
    provenance.write_json(args.out, report)  # atomically: a killed run leaves the previous results in place
    for r in results:
        print(
            f"{r['device']} {r['case']}: extraction/plain float64 {r['extraction_vs_plain_throughput']} "
            f"(bound {r['float64_extraction_bound']}, kernel bound {r['float64_gram_kernel_bound']}), "
            f"float32 {r['float32_extraction_vs_plain_throughput']} (bound {r['float32_extraction_bound']}, "
            f"kernel bound {r['float32_gram_kernel_bound']}; no layer mapped "
            f"{r['float32_unmapped_extraction_vs_plain_throughput']}), naive/plain {r['naive_vs_plain_throughput']}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
