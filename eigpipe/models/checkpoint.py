"""Checkpoints: eigpipe's own (weights + everything needed to rebuild the model) and torchvision's
ImageNet ResNet-50 state dicts read from a local file (never downloaded).

Whatever a checkpoint holds is checked before it is used: a meta field that is missing or of the wrong
type, a state dict of another architecture (a basic-block ResNet-18), a tensor missing or of another shape
are each one line naming the file and the field or tensor.
"""

from __future__ import annotations

import copy
import errno
import os
import re
import shutil
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eigpipe.errors import EigpipeError, NumericalError
from eigpipe.layer_paths import BODY_PREFIXES
from eigpipe.models.classifier import Classifier
from eigpipe.models.detector import DETECTORS, build_body, build_detector
from eigpipe.models.widths import Stage, WidthSpec
from eigpipe.outputs import Kind, torch_archive_strings
from eigpipe.provenance import publish, sha256_file

FORMAT = "eigpipe-checkpoint/1"
CHECKPOINT = Kind("an eigpipe checkpoint", lambda path: FORMAT in torch_archive_strings(path))
MODELS = {"detection": DETECTORS, "classification": ("classifier",)}


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Atomically write ``meta`` (plain data) and the model's state dict."""
    save_torch_file({**meta, "format": FORMAT, "state_dict": unwrap(model).state_dict()}, path)


def save_torch_file(contents: Any, path: str | Path) -> None:
    """``torch.save`` published atomically. torch reports a failed write as a RuntimeError naming no file and no
    reason: it becomes an OSError naming ``path``, "No space left on device" when the disk is full."""
    with publish(path) as tmp:
        try:
            torch.save(contents, tmp)
        except RuntimeError:
            if shutil.disk_usage(tmp.parent).free > 0:
                raise OSError(
                    errno.EIO, "the write failed (torch gives no reason: a quota, a device error?)", str(path)
                ) from None
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None


def weights_file(path: str | Path) -> Path:
    """``path`` as a weights file to read, or a one-line error: a folder, or nothing there."""
    path = Path(path)
    if not path.is_file():
        raise EigpipeError(f"{path}: {'a folder, not a weights file' if path.is_dir() else 'weights file not found'}")
    return path


def load_torch_file(path: Path, what: str) -> Any:
    """A torch file's contents, read without running code from it (``weights_only``); where torch cannot read it,
    a one-line error ``{path}: not {what} (why)``: a pickled Python object other than tensors and plain containers
    (a whole model saved with torch.save) is named, a damaged or foreign file is said to be one."""
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4" for a plain pickle: the error says it
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged or foreign files
        pickled = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        reason = (
            f"it holds a pickled {pickled[1]}, which eigpipe does not unpickle: save a state_dict() instead"
            if pickled
            else f"a damaged file or not a torch file: {type(exc).__name__}"
        )
        raise EigpipeError(f"{path}: not {what} ({reason})") from None


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise EigpipeError(f"{path}: checkpoint not found")
    raw = load_torch_file(path, "a readable torch checkpoint")
    if not isinstance(raw, dict):
        raise EigpipeError(f"{path}: expected a dict checkpoint or state dict, got {type(raw).__name__}")
    return raw


def _conv_out(state: dict[str, Any], key: str, source: str) -> int:
    """Output channels of a conv weight of the state dict (a 4-d tensor), else a one-line error."""
    if key not in state:
        raise EigpipeError(f"{source}: the state dict has no {key}: not a bottleneck ResNet (ResNet-50 family)")
    value = state[key]
    if not isinstance(value, torch.Tensor) or value.dim() != 4:
        shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise EigpipeError(f"{source}: {key} has shape {shape}, not a conv weight [out, in, kh, kw]")
    return int(value.shape[0])


def widths_from_state_dict(state: dict[str, torch.Tensor], prefix: str = "", source: str = "state dict") -> WidthSpec:
    """Read a bottleneck ResNet's widths off its conv weight shapes; a basic-block ResNet (18/34) or a missing
    weight is a one-line error naming ``source`` and the tensor."""
    if f"{prefix}layer1.0.conv2.weight" in state and not any(k.endswith(".conv3.weight") for k in state):
        raise EigpipeError(
            f"{source}: a ResNet of basic blocks (ResNet-18/34: no conv3 in any block); eigpipe's models are"
            " bottleneck ResNets (ResNet-50 family)"
        )
    stages = []
    for i in range(1, 5):
        blocks, j, out = [], 0, 0
        while f"{prefix}layer{i}.{j}.conv1.weight" in state:
            key = f"{prefix}layer{i}.{j}."
            blocks.append(
                (_conv_out(state, key + "conv1.weight", source), _conv_out(state, key + "conv2.weight", source))
            )
            out = _conv_out(state, key + "conv3.weight", source)
            j += 1
        if not blocks:
            raise EigpipeError(f"{source}: the state dict has no {prefix}layer{i}.0.conv1.weight: not a ResNet")
        stages.append(Stage(out=out, blocks=tuple(blocks)))
    return WidthSpec(stem=_conv_out(state, f"{prefix}conv1.weight", source), stages=tuple(stages))


def _field(path: str | Path, name: str, problem: str) -> EigpipeError:
    return EigpipeError(f"{path}: checkpoint field '{name}' {problem}")


def _positive_int(meta: dict, name: str, path: str | Path, least: int) -> None:
    value = meta[name]
    if type(value) is not int or value < least:
        raise _field(path, name, f"is {value!r}, not an integer >= {least}")


def check_meta(
    path: str | Path, meta: dict[str, Any], required: Iterable[str] = (), task: str | None = None
) -> dict[str, Any]:
    """``meta`` of an eigpipe checkpoint if every field that rebuilds or labels the model is there and sound
    (plus ``required``), and its task is ``task`` when given; else a one-line error naming the file and field."""
    from eigpipe import config

    for name in ("task", "model_name", "model_config", "widths", "num_classes"):
        if name not in meta:
            raise _field(path, name, "is missing (not a complete eigpipe checkpoint)")
    found, name = meta["task"], meta["model_name"]
    if found not in MODELS:
        raise _field(path, "task", f"is {found!r}, not one of {', '.join(MODELS)}")
    if task is not None and found != task:
        raise EigpipeError(f"{path}: a {found} checkpoint ({name}); this stage needs a {task} checkpoint")
    if name not in MODELS[found]:
        known = ", ".join(MODELS[found])
        raise _field(path, "model_name", f"is {name!r}, not a {found} model eigpipe builds ({known})")
    for extra in required:
        if extra not in meta:
            raise _field(path, extra, "is missing (not a complete eigpipe checkpoint)")
    model_schema = config.schema()["properties"]["model"]
    if not isinstance(meta["model_config"], dict):
        raise _field(path, "model_config", f"is a {type(meta['model_config']).__name__}, not a model section")
    missing = [key for key in model_schema["properties"] if key not in meta["model_config"]]
    if missing:
        raise _field(path, "model_config", f"lacks the key {missing[0]!r}")
    config.validate(copy.deepcopy(meta["model_config"]), str(path), subschema=model_schema, prefix="model_config")
    try:
        WidthSpec.from_dict(meta["widths"], source=f"{path}: checkpoint field 'widths'")
    except (TypeError, AttributeError, KeyError):
        raise _field(path, "widths", "is not a widths spec (stem, stages)") from None
    _positive_int(meta, "num_classes", path, 2 if task == "detection" else 1)
    if "iteration" in meta:
        _positive_int(meta, "iteration", path, 0)
    if "category_ids" in meta:
        _check_category_ids(path, meta)
    return meta


def _check_category_ids(path: str | Path, meta: dict[str, Any]) -> None:
    """A detector names the COCO category of each label but the background (None: torchvision's "N/A" labels);
    a classifier names none."""
    ids = meta["category_ids"]
    if meta["task"] == "classification":
        if ids != []:
            raise _field(path, "category_ids", "is not empty (a classifier has no COCO categories)")
        return
    if not (
        isinstance(ids, list)
        and all(type(i) is int or i is None for i in ids)
        and any(type(i) is int for i in ids)
        and len(ids) == meta["num_classes"] - 1
    ):
        raise _field(path, "category_ids", f"is not a list of {meta['num_classes'] - 1} integer category ids")


def check_state(path: str | Path, state: Any, expected: dict[str, torch.Tensor], strict: bool = True) -> None:
    """A one-line error naming the first tensor that ``state`` lacks, has of another shape, or (``strict``) has
    beyond ``expected`` (a model's state dict); running-statistic counters may be missing."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EigpipeError(f"{path}: the state dict is not a mapping of tensor names to tensors")
    for key, value in expected.items():
        if key not in state:
            if key.endswith("num_batches_tracked"):
                continue
            raise EigpipeError(
                f"{path}: the weights lack {key} (shape {list(value.shape)}): widths or architecture differ"
            )
        if state[key].shape != value.shape:
            raise EigpipeError(
                f"{path}: {key} has shape {list(state[key].shape)}, the model expects {list(value.shape)}"
                " (widths differ)"
            )
    extra = [key for key in state if key not in expected] if strict else []
    if extra:
        raise EigpipeError(f"{path}: the weights have {extra[0]}, which the model does not (architecture differs)")


def torchvision_classifier_meta(state: dict[str, torch.Tensor], source: str = "state dict") -> dict[str, Any]:
    """Meta for a plain torchvision ResNet state dict (BN; in eval mode BN acts as frozen BN)."""
    from eigpipe import config

    model_cfg = config.validate({"norm": "bn"}, "torchvision weights", config.schema()["properties"]["model"])
    return {
        "task": "classification",
        "model_name": "classifier",
        "model_config": model_cfg,
        "widths": widths_from_state_dict(state, source=source).to_dict(),
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


def checkpoint_parts(
    path: str | Path, required: Iterable[str] = (), task: str | None = None
) -> tuple[dict[str, Any], Any]:
    """(checked meta, state dict) of an eigpipe checkpoint or a torchvision ResNet state dict (see check_meta)."""
    raw = read_checkpoint(path)
    if raw.get("format") == FORMAT:
        if "state_dict" not in raw:
            raise _field(path, "state_dict", "is missing (not a complete eigpipe checkpoint)")
        meta = check_meta(path, {k: v for k, v in raw.items() if k != "state_dict"}, required, task)
        check_state(path, raw["state_dict"], {}, strict=False)  # tensors by name, whoever reads them
        return meta, raw["state_dict"]
    if "format" in raw or "state_dict" in raw:
        raise EigpipeError(f"{path}: checkpoint format {raw.get('format')!r} is not {FORMAT!r} (another tool's?)")
    check_state(path, raw, {}, strict=False)  # tensors only, before their names are read
    meta = check_meta(path, torchvision_classifier_meta(raw, source=str(path)), required, task)
    return meta, {(k if k.startswith("fc.") else "body." + k): v for k, v in raw.items()}


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", required: Iterable[str] = (), task: str | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a checkpoint (eigpipe's or a torchvision ResNet state dict), in eval mode; the meta
    fields in ``required`` must be there too, and its task be ``task`` when given."""
    meta, state = checkpoint_parts(path, required, task)
    try:
        model = build_model(meta)
    except (ValueError, TypeError, KeyError) as exc:  # fields that pass their checks but not together
        raise EigpipeError(f"{path}: the checkpoint's model cannot be built ({type(exc).__name__}: {exc})") from None
    check_state(path, state, model.state_dict())
    broken = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if broken is not None:
        raise NumericalError(f"{path}: tensor {broken} has non-finite values (NaN or Inf)")
    model.load_state_dict(state)
    meta = copy.deepcopy(meta)
    meta["sha256"] = sha256_file(path)
    meta["path"] = str(path)
    return model.to(device).eval(), meta


def body_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The ResNet-body tensors of a classifier/detector checkpoint or torchvision state dict, unprefixed."""
    _meta, state = checkpoint_parts(path)
    for prefix in BODY_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    raise EigpipeError(f"{path}: the weights hold no ResNet body (no tensor under {', '.join(BODY_PREFIXES)})")


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
    check_state(path, source, target, strict=False)
    statistics = next((k for k in source if k.endswith("running_var")), None)
    if statistics and any(isinstance(m, nn.GroupNorm) for m in body.modules()) and not bn_into_gn:
        raise EigpipeError(
            f"{path}: BatchNorm-trained weights ({statistics}) cannot initialise a GroupNorm body; use GroupNorm-"
            "trained ImageNet weights (eigpipe import --preset detectron2/R-50-GN) or set train.init_gn_from_bn"
        )
    body.load_state_dict({k: source[k] for k in target if k in source}, strict=False)
    return sorted(k for k in set(source) - set(target) if not k.endswith("num_batches_tracked"))
