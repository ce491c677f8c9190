"""eigpipe on a CUDA GPU, checked in one prepared run: every stage as a GPU job, and the speeds that matter there.

    make gpu-check                        # python3 benchmarks/gpu.py on a CUDA machine (at most 8 minutes)
    python3 benchmarks/gpu.py --dry       # every section on the CPU at tiny sizes (tests/test_gpu_check.py)

Sections, each timed and recorded whatever happens to the others (a failing section keeps its error and the
run goes on; a section that would pass the time budget is skipped and says so):
  environment  the GPU, its driver and the versions of torch, torchvision and the packages eigpipe needs
  extraction   ResNet-50 FPN at standard widths (random weights, eval-mode BatchNorm) at 800 px: images/s of
               plain inference (TF32 and IEEE convolutions) and of float64 and float32 extraction; float32's
               error against float64; what TF32 convolutions would do to the statistics
  training     Faster R-CNN R50-FPN GN (config/coco.yaml's model) at 800 px, batch 2: eigpipe's training loop
               against a bare torchvision-references loop, in float32 (IEEE and TF32), bf16 and fp16 AMP
  dag          the smoke study's DAG with runtime.device cuda and --resources gpu=1 beside the same DAG on the
               CPU: it completes, every GPU job's log names the GPU it held, and the two trees agree within
               benchmarks/gpu_compare.py's tolerances
  cuda_tests   the tests marked `cuda` (skipped without a GPU): the float32 error budget on CUDA, real GPU claims
Writes benchmarks/results/gpu.json (``--out``) and a log beside it (``--log``); --dry writes under results/gpu-dry/.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import torch  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "gpu.json"
DRY_RESULTS = ROOT / "results" / "gpu-dry" / "gpu.json"
SIZES = {
    "full": {
        # 16 images a round: IEEE float32 convolutions ran at 4-7 images/s here (2026-12-04)
        "extraction": {"size": 800, "batch": 2, "images": 16, "rounds": 2, "width": 1.0, "error_images": 8},
        "training": {"size": 800, "batch": 2, "rounds": 2, "steps": 8, "train_images": 8},
        "dag_cores": 12,
    },
    "dry": {
        "extraction": {"size": 64, "batch": 2, "images": 4, "rounds": 1, "width": 0.0625, "error_images": 2},
        "training": {"size": 64, "batch": 2, "rounds": 1, "steps": 1, "train_images": 4},
        "dag_cores": 1,
    },
}
# dry mode: the smoke DAG only up to these targets (a scratch detector's evaluation and final store)
DRY_TARGETS = ["results/smoke/eval/faster_rcnn-scratch.json", "results/smoke/covariance/faster_rcnn-scratch/final.zarr"]
GPU_RULES = ("pretrain", "train_detector", "evaluate", "covariance")
AMP_CASES = {
    "float32_ieee": ("off", False),
    "float32_tf32": ("off", True),
    "bf16": ("bf16", False),
    "fp16": ("fp16", False),
}


# the sections in the order they run (the DAG, with the CUDA tests beside it, first: it is what most needs a GPU
# machine) and the seconds the DAG leaves for the later ones
RESERVE = {"dag": 0, "cuda_tests": 0, "extraction": 75, "training": 100}


class Budget:
    """Seconds left of the whole run's budget."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- environment -------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict[str, Any]:
    from eigpipe.provenance import versions

    found: dict[str, Any] = {
        "device": str(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "packages": versions(),
        "cpu_cores": os.cpu_count(),
    }
    with contextlib.suppress(ImportError):
        import snakemake

        found["packages"]["snakemake"] = snakemake.__version__
    found["startup_seconds"] = startup_seconds(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        found.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            compute_capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
        )
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            found["driver"] = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip()
    return found


def startup_seconds(device: torch.device) -> dict[str, float]:
    """What every job pays before its work: a fresh Python importing torch, and then initialising the device."""
    found = {}
    for name, code in (("import_torch", "import torch"), ("import_torch_and_init_device", INIT.format(device.type))):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
        found[name] = round(time.perf_counter() - start, 2)
    return found


INIT = "import torch; torch.zeros(1, device='{}').sum().item()"


# ---- extraction ----------------------------------------------------------------------------------------------


def extraction(device: torch.device, sizes: dict, budget: Budget) -> dict[str, Any]:
    """Throughput of plain inference and of extraction in both precisions, interleaved round by round (best round
    each), then the numerical differences on a few images: float32 against float64, TF32 features against IEEE."""
    import covariance as bench

    from eigpipe import config, runtime
    from eigpipe.spectral.layers import select_layers

    model_cfg = config.validate(
        {"width_multiplier": sizes["width"], "norm": "bn", "fpn_channels": 256, "zero_init_residual": False},
        "gpu check",
        config.schema()["properties"]["model"],
    )
    case = {"model": {**model_cfg, "min_size": sizes["size"], "max_size": sizes["size"]}, **sizes}
    model, meta = bench.build(case, device)
    layers = select_layers(model, ["default"])
    data = bench.batches(case, sizes["images"])

    def plain_in(precision: str) -> Callable[..., None]:
        def run(*args: Any) -> None:
            runtime.set_float32_precision(precision)
            bench.plain(*args)

        return run

    methods = {
        "plain_tf32": plain_in("tf32"),
        "plain_ieee": plain_in("ieee"),
        "extraction_float64": bench.extraction,
        "extraction_float32": lambda *a: bench.extraction(*a, precision="float32"),
        **{f"variant_{name}": variant(*spec) for name, spec in VARIANTS.items()},
    }
    for method in methods.values():  # warm-up: cuDNN's algorithm choice, the allocator
        method(model, meta, layers, data[:1], device)
    rounds: dict[str, list[float]] = {name: [] for name in methods}
    for r in range(sizes["rounds"]):
        if r and budget.left() < 120:
            break
        for name, method in methods.items():
            rounds[name].append(bench._timed(method, (model, meta, layers, data, device), device))
    rate = {name: round(sizes["images"] / min(times), 2) for name, times in rounds.items()}
    result: dict[str, Any] = {
        "model": "ResNet-50 FPN, standard widths" if sizes["width"] == 1.0 else f"width x{sizes['width']}",
        "image_size": sizes["size"],
        "batch_size": sizes["batch"],
        "layers": len(layers),
        "images_per_round": sizes["images"],
        "seconds_per_round": {name: [round(t, 3) for t in times] for name, times in rounds.items()},
        "images_per_s": rate,
        "float64_vs_plain_ieee": round(rate["extraction_float64"] / rate["plain_ieee"], 3),
        "float32_vs_plain_ieee": round(rate["extraction_float32"] / rate["plain_ieee"], 3),
        "float64_vs_plain_tf32": round(rate["extraction_float64"] / rate["plain_tf32"], 3),
        "float32_vs_plain_tf32": round(rate["extraction_float32"] / rate["plain_tf32"], 3),
        "target": "float64 extraction >= 0.8 x plain inference",
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = peak_memory(model, meta, layers, data[:2], device)
    result["errors"] = statistic_errors(model, meta, layers, data[: sizes["error_images"] // sizes["batch"]], device)
    return result


# Other ways to run the accumulator on a GPU, timed beside the shipped one (the CPU's tuning need not suit a GPU):
# one GEMM per layer instead of row panels below the diagonal; no per-layer finiteness check (a device sync);
# longer float32 chunks (each a cuBLAS product summed in float32) before the float64 sum
FULL_GEMM = {"panel_rows": classmethod(lambda cls, channels: channels)}
NO_SYNC = {"_check_finite": lambda means, indices: None}
VARIANTS = {
    "float64_full_gemm": ("float64", FULL_GEMM, {}),
    "float64_no_finite_check": ("float64", {}, NO_SYNC),
    "float64_full_gemm_no_finite_check": ("float64", FULL_GEMM, NO_SYNC),
    "float32_chunk_4096": ("float32", {"FLOAT32_CHUNK": {"cuda": 4096}}, {}),
    "float32_full_gemm_chunk_4096": ("float32", {**FULL_GEMM, "FLOAT32_CHUNK": {"cuda": 4096}}, {}),
}


def variant(precision: str, attributes: dict, functions: dict) -> Callable[..., None]:
    """Extraction with the accumulator's class ``attributes`` and module ``functions`` replaced."""
    from unittest import mock

    import covariance as bench

    from eigpipe.spectral import accumulator

    def patched(target: Any, replacements: dict) -> Any:
        return mock.patch.multiple(target, **replacements) if replacements else contextlib.nullcontext()

    def run(*args: Any) -> None:
        with patched(accumulator.CovarianceAccumulator, attributes), patched(accumulator, functions):
            bench.extraction(*args, precision=precision)

    return run


def peak_memory(model: Any, meta: dict, layers: list, data: list, device: torch.device) -> dict[str, float]:
    import covariance as bench

    found = {}
    for name, method in (("plain", bench.plain), ("extraction_float64", bench.extraction)):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        method(model, meta, layers, data, device)
        found[name] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return found


def statistic_errors(model: Any, meta: dict, layers: list, data: list, device: torch.device) -> dict[str, Any]:
    """Relative Frobenius errors of each layer's second moment and centred covariance, and the layers whose count
    of eigenvalues > 1e-3 (the paper's measure) changes: float32 extraction against float64, and float64
    extraction with the features computed in TF32 (what eigpipe prevents) against IEEE."""
    from unittest import mock

    import numpy as np

    from eigpipe import runtime
    from eigpipe.spectral.accumulator import CovarianceAccumulator
    from eigpipe.spectral.hooks import accumulate

    def stats(precision: str) -> dict[str, dict[str, np.ndarray]]:
        _, accs = accumulate(model, meta, layers, data, device, precision=precision)
        return {
            name: {
                "second_moment": acc.second_moment.cpu().double().numpy(),
                "covariance": acc.covariance.cpu().double().numpy(),
            }
            for name, acc in accs.items()
        }

    exact = stats("float64")
    for matrices in exact.values():
        matrices.update({f"{key}_count": count(matrices[key]) for key in ("second_moment", "covariance")})
    fast = stats("float32")
    with mock.patch.object(CovarianceAccumulator, "FLOAT32_CHUNK", {"cuda": 4096}):
        long_chunks = stats("float32")
    runtime.set_float32_precision("tf32")
    with mock.patch("eigpipe.spectral.hooks.ieee_float32", contextlib.nullcontext):
        tf32 = stats("float64")
    runtime.set_float32_precision("ieee")
    return {
        "float32_vs_float64": _errors(exact, fast),
        "float32_chunk_4096_vs_float64": _errors(exact, long_chunks),
        "tf32_features_vs_ieee": _errors(exact, tf32),
    }


def count(matrix: Any) -> int:
    """The paper's intrinsic dimension: eigenvalues above 1e-3."""
    import numpy as np

    return int((np.linalg.eigvalsh(matrix) > 1e-3).sum())


def _errors(exact: dict, other: dict) -> dict[str, Any]:
    import numpy as np

    found: dict[str, Any] = {}
    for key in ("second_moment", "covariance"):
        errors = [np.linalg.norm(other[n][key] - m[key]) / (np.linalg.norm(m[key]) or 1) for n, m in exact.items()]
        counts = [int(count(other[n][key]) != m[f"{key}_count"]) for n, m in exact.items()]
        found[key] = {
            "max_relative": float(f"{max(errors):.3g}"),
            "median_relative": float(f"{float(np.median(errors)):.3g}"),
            "layers_whose_count_changes": sum(counts),
            "layers": len(errors),
        }
    return found


# ---- training -----------------------------------------------------------------------------------------------


def training(device: torch.device, sizes: dict, budget: Budget, dry: bool) -> dict[str, Any]:
    """eigpipe's loop against the bare references loop, per precision, on the paper-scale GN detector."""
    import train as bench

    from eigpipe import config, runtime

    cfg = config.load(ROOT / "config" / "config.yaml")
    paper = config.load(ROOT / "config" / "coco.yaml")
    cfg["model"] = copy.deepcopy(SIZES_MODEL_DRY if dry else paper["model"])
    cfg["runtime"] = {**paper["runtime"], "device": device.type}  # not deterministic: as a paper-scale run trains
    cfg["model"].update(min_size=sizes["size"], max_size=sizes["size"])
    cfg["model"] = config.validate(cfg["model"], "gpu check", config.schema()["properties"]["model"])
    cfg["data"]["synthetic"]["image_size"] = sizes["size"]
    cfg["train"]["schedule"].update(batch_size=sizes["batch"], log_every=1000)
    cfg["runtime"]["threads"] = 4 if device.type == "cuda" else 1
    results: dict[str, Any] = {
        "model": "Faster R-CNN R50-FPN GN (config/coco.yaml model)" if not dry else "tiny GN detector",
        "image_size": sizes["size"],
        "batch_size": sizes["batch"],
        "method": bench.METHOD,
    }
    with tempfile.TemporaryDirectory() as tmp:
        dataset = bench.detection_dataset(cfg, Path(tmp), sizes["train_images"])
        for name, (amp, tf32) in AMP_CASES.items():
            if budget.left() < 60:
                results[name] = "skipped: out of time"
                continue
            cfg["train"]["schedule"]["amp"] = amp
            cfg["runtime"]["tf32"] = tf32
            env = runtime.setup(cfg["runtime"], cfg["seed"])
            log(f"training {name}")
            results[name] = bench.compare_loops(cfg, env, dataset, sizes["rounds"], sizes["steps"], Path(tmp) / name)
    medians = {
        name: value["median_seconds_per_step"]["eigpipe"] for name, value in results.items() if isinstance(value, dict)
    }
    if "float32_ieee" in medians:
        results["speed_up_over_float32_ieee"] = {
            name: round(medians["float32_ieee"] / seconds, 2) for name, seconds in medians.items()
        }
    return results


SIZES_MODEL_DRY = {"width_multiplier": 0.0625, "norm": "gn", "gn_groups": 4, "fpn_channels": 16, "fpn_norm": True}


# ---- the smoke DAG -----------------------------------------------------------------------------------------


def eigpipe_launcher(folder: Path) -> Path:
    """A folder with an `eigpipe` command for the rules (this Python, this checkout) when none is installed."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "eigpipe"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m eigpipe.cli "$@"\n')
    script.chmod(0o755)
    return folder


def dag(device: torch.device, sizes: dict, budget: Budget, dry: bool, out_log: Path, reserve: float) -> dict[str, Any]:
    """The smoke study on the device (one GPU job at a time) and on the CPU, side by side; then the comparison.
    Both runs are stopped when only ``reserve`` seconds (for the later sections) and the comparison's are left."""
    from gpu_compare import compare_trees

    from tests.workflow_helpers import make_workdir, write_config

    root = Path(tempfile.mkdtemp(prefix="eigpipe-gpu-dag-"))
    path = os.pathsep.join([str(eigpipe_launcher(root / "bin")), os.environ.get("PATH", "")])
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env = {**os.environ, "PATH": path, "PYTHONPATH": pythonpath, "EIGPIPE_GPU_LOCKS": str(root / "locks")}
    # a Python whose site-packages are read-only compiles torch's sources in every job (measured: 7 s to import
    # torch, 30-45 s a GPU job): one writable bytecode cache for all jobs pays that once
    env.setdefault("PYTHONPYCACHEPREFIX", str(root / "pycache"))
    runs = {"cpu": "cpu", "device": device.type}
    procs = {}
    for name, where in runs.items():
        workdir = make_workdir(root / name)
        study = write_config(root / f"{name}.yaml", "config/smoke.yaml", **{"runtime.device": where})
        cores = str(sizes["dag_cores"] if name == "cpu" else 4 if where == "cuda" else 1)
        args = [sys.executable, "-m", "snakemake", *(DRY_TARGETS if dry else []), "--cores", cores]
        args += ["--resources", "gpu=1"] if where == "cuda" else []
        args += ["--configfile", str(study)]  # last: it takes every argument up to the next option
        log(f"dag ({name}): {' '.join(args[1:])}")
        handle = open(root / f"{name}.out", "w")  # noqa: SIM115 (closed below)
        procs[name] = (subprocess.Popen(args, cwd=workdir, env=env, stdout=handle, stderr=subprocess.STDOUT), handle)
    results: dict[str, Any] = {"device_run": device.type, "wall_seconds": {}}
    start = time.monotonic()
    for name, (proc, handle) in procs.items():
        try:
            proc.wait(timeout=max(budget.left() - reserve - 30, 10))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        handle.close()
        results["wall_seconds"][name] = round(time.monotonic() - start, 1)
        results[f"{name}_returncode"] = proc.returncode
        with out_log.open("a") as sink:
            sink.write(f"\n==== snakemake ({name}) ====\n{(root / f'{name}.out').read_text()[-6000:]}")
    trees = {name: root / name / "results" / "smoke" for name in runs}
    results["gpu_claims"] = gpu_claims(trees["device"] / "logs", device)
    results["job_seconds"] = {name: job_seconds(tree / "benchmarks") for name, tree in trees.items()}
    if all(results[f"{name}_returncode"] == 0 for name in runs):
        comparison = compare_trees(trees["cpu"], trees["device"])
        results["comparison"] = {key: value for key, value in comparison.items() if key != "rows"}
        results["comparison"]["outside"] = [
            row for row in comparison["rows"] if row["status"] not in ("equal", "within")
        ]
    results["completed"] = all(results[f"{name}_returncode"] == 0 for name in runs)
    results["problems"] = [f"snakemake ({name}) exited {results[f'{name}_returncode']}" for name in runs]
    results["problems"] = [text for text in results["problems"] if not text.endswith(" 0")]
    if results["gpu_claims"]["every_job_claimed"] is False:
        results["problems"].append("a GPU job's log names no GPU it held")
    if "comparison" in results and not results["comparison"]["agree"]:
        results["problems"].append(f"CPU and {device.type} runs differ: {results['comparison']['not_comparable']}")
    shutil.rmtree(root, ignore_errors=True)
    return results


def job_seconds(benchmarks: Path) -> dict[str, list[float]]:
    """Wall seconds of each finished job, by rule, from Snakemake's benchmark files (the cached training rules
    keep none)."""
    found: dict[str, list[float]] = {}
    for tsv in sorted(benchmarks.rglob("*.tsv")):
        rule = tsv.relative_to(benchmarks).parts[0].removesuffix(".tsv")
        with contextlib.suppress(ValueError, IndexError):
            found.setdefault(rule, []).append(float(tsv.read_text().splitlines()[1].split("\t")[0]))
    return found


def gpu_claims(logs: Path, device: torch.device) -> dict[str, Any]:
    """Which GPU job logs say the job ran on a GPU it held (runtime.setup's line)."""
    found = {"jobs": 0, "claimed": 0, "devices": []}
    for rule in GPU_RULES:
        for job_log in sorted(logs.glob(f"{rule}.log")) + sorted(logs.glob(f"{rule}/**/*.log")):
            lines = [line for line in job_log.read_text().splitlines() if line.startswith("eigpipe: running on ")]
            found["jobs"] += 1
            found["claimed"] += bool(lines)
            found["devices"] += [line.removeprefix("eigpipe: running on ") for line in lines]
    found["devices"] = sorted(set(found["devices"]))
    found["every_job_claimed"] = (
        found["jobs"] > 0 and found["claimed"] == found["jobs"] if device.type == "cuda" else None
    )
    return found


# ---- the CUDA tests ------------------------------------------------------------------------------------------


def cuda_tests(budget: Budget, out_log: Path) -> dict[str, Any]:
    """pytest -m cuda: passed / failed / skipped, from its JUnit XML."""
    import xml.etree.ElementTree as ET

    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        args = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", f"--junitxml={report}"]
        proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=max(budget.left() - 30, 10))
        with out_log.open("a") as sink:
            sink.write(f"\n==== pytest -m cuda ====\n{proc.stdout[-8000:]}{proc.stderr[-2000:]}")
        suite = ET.parse(report).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
        failed = [
            case.get("name")
            for case in suite.iter("testcase")
            if case.find("failure") is not None or case.find("error") is not None
        ]
    return {
        **counts,
        "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
        "failed": failed,
        "returncode": proc.returncode,
        "problems": [f"{len(failed)} CUDA tests failed"] if failed or proc.returncode not in (0, 5) else [],
    }


# ---- the run -------------------------------------------------------------------------------------------------


_PUBLISHING = threading.Lock()  # the CUDA tests run in a thread beside the DAG


def publish(out: Path, report: dict) -> None:
    from eigpipe.provenance import write_json

    with _PUBLISHING:
        write_json(out, report)


def section(name: str, report: dict, out: Path, function: Callable[[], Any], budget: Budget, needs: float) -> None:
    """Run one section into ``report[name]`` (its error instead, if it fails) and publish the report so far."""
    if budget.left() < needs:
        report[name] = {"status": f"skipped: {budget.left():.0f} s left, it needs about {needs:.0f} s"}
    else:
        log(f"{name} ...")
        start = time.monotonic()
        try:
            found = function()
            problems = found.get("problems")
            report[name] = {"status": f"problems: {'; '.join(problems)}" if problems else "ok", **found}
        except Exception as exc:  # one failing section must not cost the others their device time
            report[name] = {
                "status": f"failed: {type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc()[-3000:],
            }
        report[name]["seconds"] = round(time.monotonic() - start, 1)
        log(f"{name}: {report[name]['status']} ({report[name]['seconds']} s)")
    publish(out, report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry", action="store_true", help="every section on the CPU at tiny sizes")
    parser.add_argument("--out", type=Path, help=f"results file (default {RESULTS.relative_to(ROOT)})")
    parser.add_argument("--log", type=Path, help="log of the DAG and test runs (default: gpu.log beside --out)")
    parser.add_argument("--budget", type=float, default=480, help="seconds for the whole run (default 480)")
    parser.add_argument("--sections", nargs="+", default=list(RESERVE), choices=list(RESERVE))
    args = parser.parse_args()
    if not args.dry and not torch.cuda.is_available():
        sys.exit("gpu.py: no CUDA device here; --dry runs the check on the CPU at tiny sizes")
    out = args.out or (DRY_RESULTS if args.dry else RESULTS)
    out_log = args.log or out.with_suffix(".log")
    out.parent.mkdir(parents=True, exist_ok=True)
    out_log.write_text("")
    device = torch.device("cpu" if args.dry else "cuda")
    sizes = SIZES["dry" if args.dry else "full"]
    budget = Budget(args.budget)
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d"),
        "dry": args.dry,
        "environment": environment(device),
    }
    torch.set_num_threads(4 if device.type == "cuda" else 1)
    reserve = sum(RESERVE[name] for name in args.sections if name in ("extraction", "training"))
    plan = {
        "dag": (lambda: dag(device, sizes, budget, args.dry, out_log, reserve), 120),
        "cuda_tests": (lambda: cuda_tests(budget, out_log), 30),
        "extraction": (lambda: extraction(device, sizes["extraction"], budget), RESERVE["extraction"]),
        "training": (lambda: training(device, sizes["training"], budget, args.dry), RESERVE["training"]),
    }
    beside_dag = []
    for name in args.sections:
        function, needs = plan[name]
        needs = needs if not args.dry else 0
        if name == "cuda_tests" and "dag" in args.sections:
            continue  # it runs beside the DAG, whose GPU jobs leave the GPU mostly idle
        if name == "dag" and "cuda_tests" in args.sections:
            tests = threading.Thread(target=section, args=("cuda_tests", report, out, plan["cuda_tests"][0], budget, 0))
            tests.start()
            beside_dag.append(tests)
        section(name, report, out, function, budget, needs)
    for thread in beside_dag:
        thread.join()
    report["wall_seconds"] = round(args.budget - budget.left(), 1)
    publish(out, report)
    failed = [name for name in args.sections if report[name]["status"] != "ok"]
    log(f"wrote {out} and {out_log}; sections not ok: {failed or 'none'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
