"""Checkpoints: eigpipe's own (weights + everything needed to rebuild the model) and torchvision's
ImageNet ResNet-50 state dicts read from a local file (never downloaded)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eigpipe.errors import EigpipeError
from eigpipe.layer_paths import BODY_PREFIXES
from eigpipe.models.classifier import Classifier
from eigpipe.models.detector import build_body, build_detector
from eigpipe.models.widths import Stage, WidthSpec
from eigpipe.provenance import publish, sha256_file

FORMAT = "eigpipe-checkpoint/1"


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Atomically write ``meta`` (plain data) and the model's state dict."""
    with publish(path) as tmp:
        torch.save({**meta, "format": FORMAT, "state_dict": unwrap(model).state_dict()}, tmp)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise EigpipeError(f"{path}: checkpoint not found")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files
        raise EigpipeError(f"{path}: not a readable torch checkpoint ({type(exc).__name__})") from None
    if not isinstance(raw, dict):
        raise EigpipeError(f"{path}: expected a dict checkpoint or state dict, got {type(raw).__name__}")
    return raw


def widths_from_state_dict(state: dict[str, torch.Tensor], prefix: str = "") -> WidthSpec:
    """Read a ResNet's widths off its conv weight shapes."""
    stages = []
    for i in range(1, 5):
        blocks, j = [], 0
        while f"{prefix}layer{i}.{j}.conv1.weight" in state:
            key = f"{prefix}layer{i}.{j}."
            blocks.append((state[key + "conv1.weight"].shape[0], state[key + "conv2.weight"].shape[0]))
            out = state[key + "conv3.weight"].shape[0]
            j += 1
        if not blocks:
            raise EigpipeError(f"state dict has no {prefix}layer{i}.0.conv1.weight: not a bottleneck ResNet")
        stages.append(Stage(out=out, blocks=tuple(blocks)))
    return WidthSpec(stem=state[f"{prefix}conv1.weight"].shape[0], stages=tuple(stages))


def torchvision_classifier_meta(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Meta for a plain torchvision ResNet state dict (BN; in eval mode BN acts as frozen BN)."""
    from eigpipe import config

    model_cfg = config.validate({"norm": "bn"}, "torchvision weights", config.schema()["properties"]["model"])
    return {
        "task": "classification",
        "model_name": "classifier",
        "model_config": model_cfg,
        "widths": widths_from_state_dict(state).to_dict(),
        "num_classes": int(state["fc.weight"].shape[0]) if "fc.weight" in state else 1000,
        "iteration": 0,
        "run": "classifier",
        "init": "torchvision",
        "categories": [],
    }


def build_model(meta: dict[str, Any]) -> nn.Module:
    widths = WidthSpec.from_dict(meta["widths"], source="checkpoint widths")
    if meta["model_name"] == "classifier":
        return Classifier(build_body(meta["model_config"], widths), meta["num_classes"])
    return build_detector(meta["model_name"], meta["model_config"], meta["num_classes"], widths)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a checkpoint (eigpipe's or a torchvision ResNet state dict), in eval mode."""
    raw = read_checkpoint(path)
    if raw.get("format") == FORMAT:
        meta = {k: v for k, v in raw.items() if k != "state_dict"}
        state = raw["state_dict"]
    else:
        state = raw
        meta = torchvision_classifier_meta(state)
        state = {(k if k.startswith("fc.") else "body." + k): v for k, v in state.items()}
    model = build_model(meta)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise EigpipeError(f"{path}: weights do not fit the model they describe ({str(exc).splitlines()[0]})") from None
    meta = copy.deepcopy(meta)
    meta["sha256"] = sha256_file(path)
    meta["path"] = str(path)
    return model.to(device).eval(), meta


def body_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The ResNet-body tensors of a classifier/detector checkpoint or torchvision state dict, unprefixed."""
    raw = read_checkpoint(path)
    state = raw["state_dict"] if raw.get("format") == FORMAT else raw
    for prefix in BODY_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def pretrained_input(path: str | Path) -> tuple[list[float], list[float]]:
    """(image mean, image std) the weights of a classifier/detector checkpoint or torchvision state dict expect."""
    from eigpipe.models.detector import IMAGENET_MEAN, IMAGENET_STD

    raw = read_checkpoint(path)
    model_cfg = raw.get("model_config", {}) if raw.get("format") == FORMAT else {}
    return list(model_cfg.get("image_mean", IMAGENET_MEAN)), list(model_cfg.get("image_std", IMAGENET_STD))


def load_pretrained_body(body: nn.Module, path: str | Path, bn_into_gn: bool = False) -> list[str]:
    """Copy pre-trained weights into a detector's body; return the source keys that were not used.

    Any shape or missing-weight mismatch is an error naming the tensor. BatchNorm-trained weights (with running
    statistics) initialise a GroupNorm body only when ``bn_into_gn`` asks for it: their affine terms are then
    copied and the statistics dropped, which is not the GN-trained ImageNet init of He et al.'s GN detectors.
    """
    source = body_state(path)
    target = body.state_dict()
    for key, value in target.items():
        if key not in source:
            if key.endswith("num_batches_tracked"):
                continue
            raise EigpipeError(f"{path}: pre-trained weights lack {key} (widths or architecture differ)")
        if source[key].shape != value.shape:
            raise EigpipeError(
                f"{path}: {key} has shape {list(source[key].shape)}, the model expects {list(value.shape)}"
                " (widths differ)"
            )
    statistics = next((k for k in source if k.endswith("running_var")), None)
    if statistics and any(isinstance(m, nn.GroupNorm) for m in body.modules()) and not bn_into_gn:
        raise EigpipeError(
            f"{path}: BatchNorm-trained weights ({statistics}) cannot initialise a GroupNorm body; use GroupNorm-"
            "trained ImageNet weights (eigpipe import --preset detectron2/R-50-GN) or set train.init_gn_from_bn"
        )
    body.load_state_dict({k: source[k] for k in target if k in source}, strict=False)
    return sorted(k for k in set(source) - set(target) if not k.endswith("num_batches_tracked"))
