"""Cost of covariance extraction: images/s and peak memory of plain inference, hooked extraction with
the streaming accumulator, and a naive store-every-feature-then-numpy approach.

    .venv/bin/python benchmarks/covariance.py            # CPU (and CUDA when there is one), < 5 min on 2 cores
    .venv/bin/python benchmarks/covariance.py --quick    # a smoke run of the script itself

Each measurement runs in a fresh subprocess so its peak memory is its own; throughput is the best of a few
repetitions (the machine may be shared), memory the peak over them. Memory is the peak resident set
size (RSS, sampled every 2 ms by psutil in a thread) above the RSS after building the model and one warm-up
batch; on CUDA, the peak of torch.cuda.max_memory_allocated above the allocation before the measured loop.
Writes benchmarks/results/covariance.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "covariance.json"

DEMO_MODEL = {  # config/config.yaml's model section: ResNet-50 topology at 1/8 width, GN, FPN 64, 128 px
    "depths": [3, 4, 6, 3],
    "width_multiplier": 0.125,
    "norm": "gn",
    "gn_groups": 8,
    "fpn_channels": 64,
    "box_head": {"type": "mlp", "representation_size": 256},
    "anchor_sizes": [8, 16, 32, 64, 128],
    "min_size": 128,
    "max_size": 128,
}
R50_MODEL = {  # torchvision-like ResNet-50 FPN (standard widths, BN in eval mode), 512 px
    "depths": [3, 4, 6, 3],
    "width_multiplier": 1.0,
    "norm": "bn",
    "fpn_channels": 256,
    "min_size": 512,
    "max_size": 512,
}
CASES = {
    "demo": {"model": DEMO_MODEL, "size": 128, "images": 64, "batch": 8, "reps": 3},
    "resnet50_fpn": {"model": R50_MODEL, "size": 512, "images": 4, "batch": 2, "reps": 2},
}
QUICK = {"demo": {"images": 16}, "resnet50_fpn": {"images": 2, "size": 256}}


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
    from eigpipe.covariance import backbone_runner, input_transform

    transform, forward = input_transform(model, meta).eval(), backbone_runner(model, meta, layers)
    with torch.inference_mode():
        for images, _ in data:
            batched, _ = transform([img.to(device) for img in images])
            forward(batched.tensors, batched)


def extraction(model: torch.nn.Module, meta: dict, layers: list, data: list, device: torch.device) -> None:
    from eigpipe.covariance import accumulate

    _, accs = accumulate(model, meta, layers, data, device)
    for acc in accs.values():  # what the store writes
        acc.second_moment.cpu(), acc.mean.cpu()


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


METHODS = {"plain": plain, "extraction": extraction, "naive": naive}


def child(spec: dict) -> dict:
    from eigpipe.covariance import select_layers

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    case = {**CASES[spec["case"]], **spec.get("override", {})}
    case["model"] = {**case["model"], "min_size": case["size"], "max_size": case["size"]}
    model, meta = build(case, device)
    layers = select_layers(model, ["default"])
    method = METHODS[spec["method"]]
    method(model, meta, layers, batches(case, case["batch"]), device)  # warm-up (allocator, kernels)
    data = batches(case, spec["images"])
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    with PeakRSS() as rss:
        for _ in range(spec.get("reps", 1)):  # best of reps: the machine may be shared
            start = time.perf_counter()
            method(model, meta, layers, data, device)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    seconds = min(times)
    result = {
        **spec,
        "seconds": round(seconds, 3),
        "all_seconds": [round(t, 3) for t in times],
        "images_per_s": round(spec["images"] / seconds, 3),
        "peak_rss_increase_mib": round(rss.delta_mib, 1),
        "layers": len(layers),
    }
    if cuda:
        result["peak_cuda_increase_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
    return result


# ---- parent ---------------------------------------------------------------------------------------------


def measure(spec: dict) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, cwd=ROOT
    )
    if done.returncode != 0:
        raise RuntimeError(f"{spec}: failed\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        f"{result['device']:4} {result['case']:13} {result['method']:10} n={result['images']:3}  "
        f"{result['images_per_s']:8.2f} img/s  +{result['peak_rss_increase_mib']:7.1f} MiB RSS"
        + (f"  +{result['peak_cuda_increase_mib']:.1f} MiB CUDA" if "peak_cuda_increase_mib" in result else ""),
        flush=True,
    )
    return result


def run_case(name: str, device: str, threads: int, quick: bool) -> dict:
    override = QUICK[name] if quick else {}
    n = override.get("images", CASES[name]["images"])
    spec = {"case": name, "device": device, "threads": threads, "override": override}
    reps = CASES[name]["reps"]
    rows = [measure({**spec, "method": m, "images": n, "reps": reps}) for m in ("plain", "extraction", "naive")]
    rows += [measure({**spec, "method": m, "images": 2 * n}) for m in ("extraction", "naive")]
    by = {(r["method"], r["images"]): r for r in rows}
    return {
        "case": name,
        "device": device,
        "image_size": override.get("size", CASES[name]["size"]),
        "batch_size": CASES[name]["batch"],
        "model": CASES[name]["model"],
        "measurements": rows,
        "extraction_vs_plain_throughput": round(
            by[("extraction", n)]["images_per_s"] / by[("plain", n)]["images_per_s"], 3
        ),
        "naive_vs_plain_throughput": round(by[("naive", n)]["images_per_s"] / by[("plain", n)]["images_per_s"], 3),
        "extraction_peak_rss_mib": {
            str(n): by[("extraction", n)]["peak_rss_increase_mib"],
            str(2 * n): by[("extraction", 2 * n)]["peak_rss_increase_mib"],
        },
        "naive_peak_rss_mib": {
            str(n): by[("naive", n)]["peak_rss_increase_mib"],
            str(2 * n): by[("naive", 2 * n)]["peak_rss_increase_mib"],
        },
    }


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
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    start = time.perf_counter()
    results = [run_case(name, dev, args.threads, args.quick) for dev in devices for name in args.cases]
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "threads": args.threads,
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "torch": torch.__version__,
        "numpy": np.__version__,
        "quick": args.quick,
        "memory_method": "peak RSS above the post-warm-up RSS, psutil sampled every 2 ms, in a fresh process",
        "target": "extraction >= 0.6 x plain-inference throughput on CPU",
        "wall_seconds": round(time.perf_counter() - start, 1),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for r in results:
        print(
            f"{r['device']} {r['case']}: extraction/plain = {r['extraction_vs_plain_throughput']}, "
            f"naive/plain = {r['naive_vs_plain_throughput']}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
