"""Cost of eigpipe's training step against a bare torchvision-references loop on the same model, data and batch.

    .venv/bin/python benchmarks/train.py               # the demo detector on CPU (and CUDA when there is one)
    .venv/bin/python benchmarks/train.py --amp bf16    # both loops under mixed precision
    .venv/bin/python benchmarks/train.py --quick       # a smoke run of the script itself

eigpipe's loop is ``eigpipe.train.loop.run`` as the train stage calls it (seeded batches and flips, the
loss check, logging, resume state); the bare loop is torchvision's references/detection ``train_one_epoch``
(RandomSampler, random flips, autocast + GradScaler, one .item() per loss). Both start from the same
weights, read the same synthetic images at the demo's batch size and run interleaved in one process,
round by round (after an untimed warm-up of both), the first loop alternating. A step is timed from one loss
computation's start to the next (data loading, forward, backward, optimizer and logging included); each round
drops its first step.
The result is the median over rounds of (eigpipe's median step) / (the bare loop's median step).
Writes benchmarks/results/train.json.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "train.json"
FULL = {"rounds": 5, "steps": 10, "train_images": 64}
QUICK = {"rounds": 2, "steps": 3, "train_images": 8}


METHOD = (
    "interleaved rounds in one process, first loop alternating; a step runs from one loss computation's start to "
    "the next; each round's first step dropped"
)


def stamping(loss_fn: Any, stamps: list[float]) -> Any:
    """``loss_fn`` that records when each step's loss computation starts."""

    def timed(*args: Any) -> Any:
        stamps.append(time.perf_counter())
        return loss_fn(*args)

    return timed


def eigpipe_loop(model: torch.nn.Module, dataset: Any, cfg: dict, env: Any, steps: int, out: Path) -> list[float]:
    """``steps`` steps of eigpipe's training loop; the start time of each step's loss computation."""
    from eigpipe.config import detector_schedule
    from eigpipe.data import coco
    from eigpipe.provenance import section_hash
    from eigpipe.train import loop
    from eigpipe.train.batches import AugmentedDataset
    from eigpipe.train.state import RunFolder

    schedule = {**detector_schedule(cfg["train"], "scratch"), "steps": steps, "snapshots": []}
    stamps: list[float] = []
    meta = {"task": "detection", "model_name": "faster_rcnn", "model_config": cfg["model"], "run": "bench"}
    job = loop.Job(
        model=model,
        dataset=AugmentedDataset(dataset, partial(loop.flip_detection, schedule["hflip"]), cfg["seed"]),
        collate=coco.collate,
        loss_fn=stamping(loop._detection_loss, stamps),
        schedule=schedule,
        meta=meta,
        folder=RunFolder(out, section_hash(schedule)),
        env=env,
        seed=cfg["seed"],
    )
    loop.run(job)
    return stamps


class Flipped(torch.utils.data.Dataset):
    """The references' RandomHorizontalFlip(0.5) on a detection dataset (torch's global RNG)."""

    def __init__(self, dataset: Any, probability: float) -> None:
        self.dataset, self.probability = dataset, probability

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        from eigpipe.data.coco import hflip

        image, target = self.dataset[index]
        return hflip(image, target) if torch.rand(1) < self.probability else (image, target)


def bare_loop(model: torch.nn.Module, dataset: Any, cfg: dict, env: Any, steps: int) -> list[float]:
    """``steps`` steps of torchvision's references/detection train_one_epoch; the start time of each step."""
    from eigpipe.data.coco import collate
    from eigpipe.train.schedule import lr_factor

    schedule, device = cfg["train"]["schedule"], env.device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params, lr=schedule["lr"], momentum=schedule["momentum"], weight_decay=schedule["weight_decay"]
    )
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor({**schedule, "steps": steps}))
    sampler = torch.utils.data.RandomSampler(dataset)
    batches = torch.utils.data.BatchSampler(sampler, schedule["batch_size"], drop_last=True)
    loader = torch.utils.data.DataLoader(
        Flipped(dataset, schedule["hflip"]), batch_sampler=batches, collate_fn=collate, num_workers=schedule["workers"]
    )
    amp = schedule["amp"]
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(amp)
    model.to(device).train()
    stamps: list[float] = []
    while len(stamps) < steps:
        for images, targets in loader:
            if len(stamps) == steps:
                break
            stamps.append(time.perf_counter())
            images = [image.to(device) for image in images]
            targets = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss_dict = model(images, targets)
                losses = sum(loss for loss in loss_dict.values())
            loss_value = losses.item()
            if not math.isfinite(loss_value):
                sys.exit(f"Loss is {loss_value}, stopping training")
            optimizer.zero_grad()
            if scaler is not None:
                scaler.scale(losses).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                losses.backward()
                optimizer.step()
            lr_scheduler.step()
            _logged = {k: v.item() for k, v in loss_dict.items()}  # the references' MetricLogger.update
    stamps.append(time.perf_counter())
    return stamps


def step_times(stamps: list[float]) -> list[float]:
    """Seconds per step from consecutive loss-computation starts, without the first (warm-up) step."""
    return [b - a for a, b in zip(stamps[1:], stamps[2:], strict=False)]


def detection_dataset(cfg: dict, folder: Path, train_images: int) -> Any:
    """A synthetic detection training set of ``train_images`` images (data.synthetic's image size) in ``folder``."""
    from eigpipe.data import coco, synthetic

    data_cfg = copy.deepcopy(cfg["data"])
    data_cfg["synthetic"].update(train_images=train_images, val_images=1)
    data_cfg["synthetic"]["classification"].update(train_per_class=1, val_per_class=1)
    synthetic.generate({"data": data_cfg, "seed": cfg["seed"]}, out=folder / "data")
    detection = folder / "data" / "detection"
    return coco.CocoDetection(detection / "instances_train.json", detection / "train", train=True)


def compare_loops(cfg: dict, env: Any, dataset: Any, rounds: int, steps: int, folder: Path) -> dict:
    """``rounds`` interleaved rounds of ``steps`` timed steps of each loop on one initial model: step times and
    the median over rounds of eigpipe's median step / the bare loop's."""
    from eigpipe.models import build_detector

    torch.manual_seed(cfg["seed"])
    initial = build_detector("faster_rcnn", cfg["model"], dataset.num_classes)
    times: dict[str, list[list[float]]] = {"eigpipe": [], "bare": []}
    eigpipe_loop(copy.deepcopy(initial), dataset, cfg, env, 3, folder / "warm-up")  # process warm-up
    bare_loop(copy.deepcopy(initial), dataset, cfg, env, 2)
    for r in range(rounds):
        order = ["eigpipe", "bare"] if r % 2 == 0 else ["bare", "eigpipe"]
        for name in order:
            model = copy.deepcopy(initial)
            if name == "eigpipe":  # the first step of every round is a warm-up
                stamps = eigpipe_loop(model, dataset, cfg, env, steps + 2, folder / f"run{r}")
            else:
                stamps = bare_loop(model, dataset, cfg, env, steps + 1)
            times[name].append(step_times(stamps)[:steps])
        medians = {name: statistics.median(rounds_[-1]) for name, rounds_ in times.items()}
        print(
            f"round {r}: s/step eigpipe {medians['eigpipe']:.4f} bare {medians['bare']:.4f} "
            f"ratio {medians['eigpipe'] / medians['bare']:.3f}",
            flush=True,
        )
    ratios = [statistics.median(e) / statistics.median(b) for e, b in zip(times["eigpipe"], times["bare"], strict=True)]
    best = {name: min(min(r) for r in rounds_) for name, rounds_ in times.items()}
    return {
        "seconds_per_step": {name: [[round(t, 4) for t in r] for r in rounds_] for name, rounds_ in times.items()},
        "median_seconds_per_step": {
            name: round(statistics.median([t for r in rounds_ for t in r]), 4) for name, rounds_ in times.items()
        },
        "round_ratios": [round(x, 3) for x in ratios],
        "eigpipe_vs_bare_step_time": round(statistics.median(ratios), 3),
        "eigpipe_vs_bare_best_step": round(best["eigpipe"] / best["bare"], 3),  # robust when the machine is shared
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check that the script runs")
    parser.add_argument("--amp", choices=["off", "fp16", "bf16"], default="off", help="train.schedule.amp of both")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    from eigpipe import config, runtime

    sizes = QUICK if args.quick else FULL
    cfg = config.load(ROOT / "config" / "config.yaml")
    cfg["train"]["schedule"]["amp"] = args.amp
    cfg["runtime"]["threads"] = args.threads
    env = runtime.setup(cfg["runtime"], cfg["seed"])
    start, load_before = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        dataset = detection_dataset(cfg, Path(tmp), sizes["train_images"])
        timing = compare_loops(cfg, env, dataset, sizes["rounds"], sizes["steps"], Path(tmp))
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cores": os.cpu_count(),
            "threads": args.threads,
            "device": str(env.device),
            "cuda": torch.cuda.get_device_name(0) if env.device.type == "cuda" else None,
            "load_average_before_after": [round(x, 2) for x in (*load_before, *os.getloadavg())],
        },
        "torch": torch.__version__,
        "quick": args.quick,
        "model": cfg["model"],
        "batch_size": cfg["train"]["schedule"]["batch_size"],
        "amp": args.amp,
        "rounds": sizes["rounds"],
        "steps_per_round": sizes["steps"],
        "method": METHOD,
        "target": "eigpipe's step within 5% of the bare loop (ratio <= 1.05)",
        **timing,
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    from eigpipe.provenance import write_json

    write_json(args.out, report)  # atomically: a killed run leaves the previous results in place
    print(
        f"{env.device} demo detector, batch {report['batch_size']}, amp {args.amp}: eigpipe/bare step time = "
        f"{report['eigpipe_vs_bare_step_time']} (median of {sizes['rounds']} rounds; best steps: "
        f"{report['eigpipe_vs_bare_best_step']})"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
