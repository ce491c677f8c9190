"""The training loop (after torchvision's references/detection), shared by classification and detection."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from eigpipe import provenance, runtime
from eigpipe.codehash import code_hash
from eigpipe.config import detector_schedule
from eigpipe.errors import DataError, EigpipeError, NumericalError
from eigpipe.models import build_detector, from_model_config, load_pretrained_body, save_checkpoint
from eigpipe.models.checkpoint import unwrap
from eigpipe.outputs import claim_outputs
from eigpipe.train.batches import AugmentedDataset, IterationSampler
from eigpipe.train.schedule import build_optimizer
from eigpipe.train.state import RUN_FOLDER, RunFolder

LossFn = Callable[[nn.Module, Any, torch.device], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class Job:
    model: nn.Module
    dataset: Dataset
    collate: Callable | None
    loss_fn: LossFn
    schedule: dict
    meta: dict[str, Any]
    folder: RunFolder
    env: runtime.Runtime
    seed: int
    finish: Callable[[nn.Module], dict[str, float]] | None = None
    extra_meta: dict[str, Any] = field(default_factory=dict)


def _format_eta(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"


def _progress(iteration: int, steps: int, loss: float, parts: dict[str, float], lr: float, rate: float) -> None:
    detail = " ".join(f"{k.removeprefix('loss_')} {v:.3f}" for k, v in parts.items())
    eta = _format_eta((steps - iteration) * rate)
    print(f"it {iteration}/{steps} loss {loss:.4f} ({detail}) lr {lr:.5f} {rate:.3f} s/it ETA {eta}", file=sys.stderr)


def resume_fingerprint(meta: dict[str, Any], stage: str, **extra: Any) -> str:
    """What a saved training state must match to be resumed: the config, the resolved widths, the content of
    every input file (a widths file, init checkpoint or dataset rewritten at the same path starts anew) and the
    stage's code and library versions (what Snakemake reruns a job for)."""
    record = meta["provenance"]
    keys = ("task", "model_name", "init", "widths", "run")
    return provenance.section_hash(
        {
            **{key: meta[key] for key in keys},
            "config": record["config_hash"],
            "inputs": record["inputs"],
            "code": code_hash(stage),
            **extra,
        }
    )


def _save_model(job: Job, path: Path, iteration: int) -> None:
    save_checkpoint(path, job.model, {**job.meta, **job.extra_meta, "iteration": iteration})


AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def mixed_precision(amp: str, device: torch.device) -> tuple[Callable[[], Any], torch.amp.GradScaler]:
    """(autocast context factory, GradScaler) for ``amp`` off | fp16 | bf16; the scaler is enabled for fp16 only."""
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    if amp == "off":
        return contextlib.nullcontext, scaler
    return partial(torch.autocast, device.type, dtype=AMP_DTYPES[amp]), scaler


def _resume(job: Job, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler) -> int:
    state = job.folder.prepare(job.schedule) if job.env.is_main else None
    if job.env.distributed:  # the main rank judges (and may clear) the folder; the others read what it kept
        torch.distributed.barrier()
        state = state if job.env.is_main else job.folder.kept_state()
    if state is None:
        return 0
    unwrap(job.model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None and job.env.device.type == "cuda":  # the GPU's samplers draw from it
        torch.cuda.set_rng_state(state["cuda_rng"], job.env.device)
    print(f"resuming {job.folder.out} from iteration {state['iteration']}", file=sys.stderr)
    return state["iteration"]


def run(job: Job) -> None:
    """Train ``job.model`` for the schedule's steps, publishing snapshots, the final model and metrics."""
    try:
        _train(job)
    except BaseException:
        if job.env.is_main:
            if not job.folder.state_path.exists():
                job.folder.clear()  # stopped before any resume state: nothing of this attempt can be resumed
            job.folder.prune_empty()
        raise


def _train(job: Job) -> None:
    schedule, env, folder = job.schedule, job.env, job.folder
    steps, snapshots = schedule["steps"], set(schedule["snapshots"])
    job.model.to(env.device)
    optimizer, scheduler = build_optimizer(job.model, schedule)
    autocast, scaler = mixed_precision(schedule["amp"], env.device)
    start = _resume(job, optimizer, scheduler, scaler)
    model = job.model
    if env.distributed:
        if job.meta["model_config"]["norm"] == "sync_bn":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        device_ids = [env.local_rank] if env.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if start == 0 and 0 in snapshots and env.is_main:
        _save_model(job, folder.snapshot_path(0), 0)
        folder.keep_snapshot(0)
    loader = DataLoader(
        job.dataset,
        batch_sampler=IterationSampler(
            len(job.dataset), schedule["batch_size"], job.seed, start, steps, env.rank, env.world_size
        ),
        collate_fn=job.collate,
        num_workers=schedule["workers"],
        pin_memory=env.device.type == "cuda",  # the batches' copies to the GPU overlap its work
        generator=torch.Generator().manual_seed(job.seed),  # keeps the global RNG untouched (resume)
    )
    model.train()
    began, log_every = time.time(), schedule["log_every"]
    for iteration, batch in enumerate(loader, start):
        with autocast():
            loss, parts = job.loss_fn(model, batch, env.device)
        if not torch.isfinite(loss):
            raise NumericalError(f"{folder.out}: non-finite loss at iteration {iteration} ({parts})")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # the scaler is a pass-through unless amp is fp16
        if schedule["clip_grad_norm"]:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), schedule["clip_grad_norm"])
        scaler.step(optimizer)  # skips the step when fp16 gradients overflowed
        scaler.update()
        scheduler.step()
        done = iteration + 1
        if not env.is_main:
            continue
        if done % log_every == 0 or done == steps:
            rate = (time.time() - began) / (done - start)
            lr = optimizer.param_groups[0]["lr"]
            _progress(done, steps, loss.item(), parts, lr, rate)
            folder.log({"iteration": done, "loss": loss.item(), **parts, "lr": lr, "s_per_it": rate})
        if done in snapshots and done < steps:
            _save_model(job, folder.snapshot_path(done), done)
            folder.keep_snapshot(done)
        if done % schedule["checkpoint_every"] == 0 and done < steps:
            folder.save_state(
                {
                    "model": unwrap(model).state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state(env.device) if env.device.type == "cuda" else None,
                    "iteration": done,
                }
            )
    if env.is_main:
        if job.finish is not None:
            final_metrics = job.finish(unwrap(model))
            job.extra_meta.update(final_metrics)
            folder.log({"iteration": steps, **final_metrics})
        folder.publish_metrics()
        _save_model(job, folder.final_path, steps)  # last: final.pt marks a finished run
        folder.finished()
    if env.distributed:
        torch.distributed.barrier()


def _seed_and_env(cfg: dict) -> tuple[int, runtime.Runtime]:
    return cfg["seed"], runtime.setup(cfg["runtime"], cfg["seed"])


def _base_meta(
    cfg: dict, task: str, model_name: str, out: Path, init: str, inputs: list, seed: int, env: runtime.Runtime
) -> dict[str, Any]:
    model_cfg = cfg["model"]
    return {
        "task": task,
        "model_name": model_name,
        "model_config": model_cfg,
        "widths": from_model_config(model_cfg).to_dict(),
        "run": out.name,
        "init": init,
        "seed": seed,
        "provenance": provenance.record(config=cfg, inputs=inputs, seed=seed, device=str(env.device)),
    }


# -- detection -------------------------------------------------------------------------------------------


def _detection_loss(model: nn.Module, batch: Any, device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
    images, targets = batch
    images = [image.to(device, non_blocking=True) for image in images]
    targets = [
        {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets
    ]
    losses = model(images, targets)
    return sum(losses.values()), {k: v.item() for k, v in losses.items()}


def parse_init(init: str) -> tuple[str, Path | None]:
    if init == "scratch":
        return "scratch", None
    kind, _, path = init.partition(":")
    if kind != "pretrained" or not path:
        raise EigpipeError(f"--init: expected 'scratch' or 'pretrained:<checkpoint>', got {init!r}")
    if not Path(path).is_file():
        raise EigpipeError(f"--init: pre-trained weights {path} not found")
    return "pretrained", Path(path)


def _check_pretrained_input(model_cfg: dict, init_path: Path) -> None:
    """The detector must normalise its images as the pre-trained weights were trained to see them."""
    from eigpipe.models.checkpoint import pretrained_input

    mean, std = pretrained_input(init_path)
    ours = (list(model_cfg["image_mean"]), list(model_cfg["image_std"]))
    if not all(abs(a - b) <= 1e-6 * max(1.0, abs(b)) for a, b in zip([*ours[0], *ours[1]], [*mean, *std], strict=True)):
        raise EigpipeError(
            f"--init {init_path}: its weights expect image_mean {mean} and image_std {std}; model.image_mean and "
            f"model.image_std are {ours[0]} and {ours[1]}"
        )


def flip_detection(probability: float, sample: Any, rng: np.random.Generator) -> Any:
    """Seeded horizontal flip of an (image, target) detection sample (module level: picklable for workers)."""
    from eigpipe.data.coco import hflip

    return hflip(*sample) if rng.random() < probability else sample


def flip_classification(probability: float, sample: Any, rng: np.random.Generator) -> Any:
    """Seeded horizontal flip of an (image, label) classification sample."""
    image, label = sample
    return (image.flip(-1) if rng.random() < probability else image), label


def train_detector(cfg: dict, model_name: str, init: str, annotations: Path, images: Path, out: Path) -> None:
    """Train one detector (sections model, train, data, runtime, seed) into the run folder ``out``."""
    from eigpipe.data import coco

    init_kind, init_path = parse_init(init)
    claim_outputs((out, RUN_FOLDER), inputs=[annotations, images, init_path])
    provenance.check_writable(out / "final.pt")
    seed, env = _seed_and_env(cfg)
    dataset = coco.CocoDetection(
        annotations, images, train=True, strict=cfg["data"]["strict"], masks=model_name == "mask_rcnn"
    )
    model = build_detector(model_name, cfg["model"], dataset.num_classes)
    if init_path is not None:
        _check_pretrained_input(cfg["model"], init_path)
        unused = load_pretrained_body(model.backbone.body, init_path, cfg["train"]["init_gn_from_bn"])
        print(f"initialised body from {init_path} ({len(unused)} source tensors unused)", file=sys.stderr)
    out = Path(out)
    meta = _base_meta(cfg, "detection", model_name, out, init_kind, [annotations, init_path], seed, env)
    meta.update(
        num_classes=dataset.num_classes,
        categories=dataset.categories,
        category_ids=dataset.category_ids,
        init_source=str(init_path) if init_path else None,
    )
    schedule = detector_schedule(cfg["train"], init_kind)
    augment = partial(flip_detection, schedule["hflip"])
    job = Job(
        model=model,
        dataset=AugmentedDataset(dataset, augment, seed),
        collate=coco.collate,
        loss_fn=_detection_loss,
        schedule=schedule,
        meta=meta,
        folder=RunFolder(out, resume_fingerprint(meta, "train", images=provenance.listing_hash(images, modified=True))),
        env=env,
        seed=seed,
    )
    try:
        run(job)
    finally:
        runtime.teardown()


# -- classification --------------------------------------------------------------------------------------


def _classification_loss(model: nn.Module, batch: Any, device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
    images, labels = batch
    logits = model(images.to(device))
    loss = nn.functional.cross_entropy(logits, labels.to(device))
    accuracy = (logits.argmax(1) == labels.to(device)).float().mean().item()
    return loss, {"accuracy": accuracy}


def _class_image(path: str) -> Any:
    """An ImageFolder image through the pipeline's faithful reader: an error names the image (module level, so
    that loader workers can pickle it)."""
    from eigpipe.data.coco import ImageError, read_rgb

    try:
        return read_rgb(Path(path))
    except DataError as exc:
        raise ImageError(str(exc)) from None


def _image_folder(root: Path) -> Dataset:
    from torchvision import datasets, transforms

    from eigpipe.models.detector import IMAGENET_MEAN, IMAGENET_STD

    if not root.is_dir():
        raise EigpipeError(f"{root}: image folder not found")
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    try:
        return datasets.ImageFolder(root, transform=transform, loader=_class_image)
    except (FileNotFoundError, RuntimeError) as exc:
        raise EigpipeError(f"{root}: not an image folder with one sub-folder per class ({exc})") from None


def accuracy(model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 256) -> float:
    model.eval()
    correct = 0
    with torch.inference_mode():
        for images, labels in DataLoader(dataset, batch_size=batch_size):
            correct += (model(images.to(device)).argmax(1).cpu() == labels).sum().item()
    return correct / len(dataset)


def train_classifier(cfg: dict, data: Path, out: Path) -> None:
    """Pre-train the classifier (sections model, pretrain, runtime, seed) on ``data/train`` (ImageFolder) into
    ``out``; report accuracy on ``data/val`` if present."""
    from eigpipe.models import Classifier, build_body

    claim_outputs((out, RUN_FOLDER), inputs=[data], read_whole=[data])
    provenance.check_writable(out / "final.pt")
    seed, env = _seed_and_env(cfg)
    train_set = _image_folder(data / "train")
    model = Classifier(build_body(cfg["model"]), len(train_set.classes))
    meta = _base_meta(cfg, "classification", "classifier", out, "scratch", [], seed, env)
    meta.update(run="classifier", num_classes=len(train_set.classes), categories=train_set.classes)

    schedule = cfg["pretrain"]["schedule"]
    augment = partial(flip_classification, schedule["hflip"])

    def finish(model: nn.Module) -> dict[str, float]:
        if not (data / "val").is_dir():
            return {}
        value = accuracy(model, _image_folder(data / "val"), env.device)
        print(f"validation accuracy {value:.4f}", file=sys.stderr)
        return {"val_accuracy": value}

    job = Job(
        model=model,
        dataset=AugmentedDataset(train_set, augment, seed),
        collate=None,
        loss_fn=_classification_loss,
        schedule=schedule,
        meta=meta,
        folder=RunFolder(out, resume_fingerprint(meta, "pretrain", data=provenance.listing_hash(data, modified=True))),
        env=env,
        seed=seed,
        finish=finish,
    )
    try:
        run(job)
    finally:
        runtime.teardown()
