"""From an upstream state dict to an eigpipe model: renaming rules, the class layout, the folded channel order,
and the checks that name what does not fit (one line each, before anything is written)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from eigpipe.errors import EigpipeError
from eigpipe.models.checkpoint import load_torch_file

Rename = Callable[[re.Match], str]
STEM = "conv1.weight"  # the stem conv, under the body's prefix
CLS_SCORE = "roi_heads.box_predictor.cls_score"
BBOX_PRED = "roi_heads.box_predictor.bbox_pred"
MASK_LOGITS = "roi_heads.mask_predictor.mask_fcn_logits"
BOX_FC = re.compile(r"roi_heads\.box_head\.upstream_fc(\d+)\.(weight|bias)")  # placeholders of the importers
BOX_CONV = re.compile(r"roi_heads\.box_head\.(\d+)\.0\.weight")


@dataclass
class Mapped:
    """An upstream state dict under eigpipe's names; ``origin`` gives each tensor's upstream key."""

    state: dict[str, torch.Tensor] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)


def torch_file(path: Path, what: str, key: str, required: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, whole file) of a torch file holding a state dict of tensors under ``key`` (or, unless
    ``required``, at its top level); read without running code (``weights_only``). ``what`` names the format."""
    raw = load_torch_file(path, what)
    nested = isinstance(raw, dict) and isinstance(raw.get(key), dict)
    state = raw[key] if nested else (None if required else raw)
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        where = f"under '{key}'" if required else f"at its top level or under '{key}'"
        raise EigpipeError(f"{path}: not {what} (no state dict of tensors {where})")
    for name, value in state.items():
        check_tensor(path, name, value)
    return dict(state), raw


def check_tensor(source: Path, key: str, value: object, target: torch.Tensor | None = None) -> None:
    """A one-line error naming ``source`` and ``key`` unless ``value`` is a dense tensor and, where it fills the
    floating-point ``target`` (a parameter or buffer of a model), floating point, finite, and not negative as a
    running variance. Integer targets (BatchNorm's ``num_batches_tracked``) take any dense tensor."""
    if not isinstance(value, torch.Tensor):
        raise EigpipeError(f"{source}: key {key} is a {type(value).__name__}, not a tensor")
    if value.layout != torch.strided:
        raise EigpipeError(f"{source}: key {key} is a {value.layout} tensor; weights are read as dense tensors")
    if target is None or not target.is_floating_point():
        return
    if not value.is_floating_point():
        raise EigpipeError(f"{source}: key {key} holds {value.dtype} values, not floating point")
    if not torch.isfinite(value).all():
        raise EigpipeError(f"{source}: key {key} has non-finite values (NaN or Inf)")
    if key.endswith("running_var") and (value < 0).any():
        raise EigpipeError(f"{source}: key {key} has negative values (a running variance)")


def rule(pattern: str, target: str | Rename) -> tuple[re.Pattern, Rename]:
    """An upstream-key pattern and the eigpipe key it lands on (a template with \\1, ... or a function)."""
    return re.compile(pattern), (target if callable(target) else lambda m: m.expand(target))


def rename(
    state: dict[str, torch.Tensor],
    rules: Sequence[tuple[re.Pattern, Rename]],
    dropped: Iterable[str],
    source: Path,
    family: str,
) -> Mapped:
    """Rename every key by the first rule it matches; keys matching ``dropped`` (patterns of state that is not
    a weight, e.g. counters) are set aside. A key no rule takes lands nowhere: an error naming it."""
    skip = [re.compile(p) for p in dropped]
    mapped = Mapped()
    for key in sorted(state):
        if any(p.fullmatch(key) for p in skip):
            mapped.dropped.append(key)
            continue
        target = next((fn(m) for pattern, fn in rules if (m := pattern.fullmatch(key))), None)
        if target is None:
            raise EigpipeError(f"{source}: key {key} lands nowhere in the model (not a {family} key eigpipe knows)")
        if target in mapped.state:
            raise EigpipeError(f"{source}: keys {mapped.origin[target]} and {key} land on the same tensor {target}")
        mapped.state[target] = state[key]
        mapped.origin[target] = key
    return mapped


def place_box_fcs(mapped: Mapped) -> None:
    """Box-head fc layers, renamed ``roi_heads.box_head.upstream_fc<k>`` (k from 1), go where torchvision's heads
    keep them: after the convs and a flatten in FastRCNNConvFCHead (a Sequential), or as fc6/fc7 of TwoMLPHead."""
    convs = sum(1 for key in mapped.state if BOX_CONV.fullmatch(key))
    for key in [k for k in mapped.state if BOX_FC.fullmatch(k)]:
        k, kind = BOX_FC.fullmatch(key).groups()  # type: ignore[union-attr]
        index = convs + 1 + 2 * (int(k) - 1) if convs else f"fc{5 + int(k)}"
        _move(mapped, key, f"roi_heads.box_head.{index}.{kind}")


def _move(mapped: Mapped, old: str, new: str) -> None:
    mapped.state[new] = mapped.state.pop(old)
    mapped.origin[new] = mapped.origin.pop(old)


def background_first(mapped: Mapped, source: Path) -> None:
    """Upstream layout "K classes, background last" (detectron2, mmdetection) to torchvision's "background is
    label 0": the classifier's background row moves to the front; the class-specific box deltas and mask logits,
    which have no background entry, get a zero one (torchvision never reads it)."""
    if f"{CLS_SCORE}.weight" not in mapped.state:
        return
    classes = rows(mapped, f"{CLS_SCORE}.weight", source) - 1
    for kind in ("weight", "bias"):
        key = f"{CLS_SCORE}.{kind}"
        if key in mapped.state:
            rows(mapped, key, source)
            value = mapped.state[key]
            mapped.state[key] = torch.cat([value[-1:], value[:-1]])
    for prefix, per_class in ((BBOX_PRED, 4), (MASK_LOGITS, 1)):
        for kind in ("weight", "bias"):
            key = f"{prefix}.{kind}"
            if key not in mapped.state:
                continue
            value = mapped.state[key]
            if rows(mapped, key, source) != per_class * classes:
                raise EigpipeError(
                    f"{source}: {mapped.origin[key]} has {value.shape[0]} rows; {classes} classes (the classifier's "
                    f"{classes + 1} minus background) need {per_class * classes}"
                )
            mapped.state[key] = torch.cat([value.new_zeros((per_class, *value.shape[1:])), value])


def fold_channel_order(mapped: Mapped, prefix: str, channel_order: str, source: Path) -> None:
    """An upstream model reading BGR gets its stem conv's input channels reversed, so that it reads RGB."""
    key = prefix + STEM
    value = mapped.state[key]
    if value.dim() != 4:
        raise EigpipeError(
            f"{source}: key {mapped.origin[key]} has shape {list(value.shape)}, not a conv weight [out, in, kh, kw]"
        )
    if channel_order == "BGR":
        mapped.state[key] = value.flip(1)


def num_classes(mapped: Mapped, source: Path) -> int | None:
    """Classifier outputs (background included for detectors), or None when the file has no classifier."""
    for key in (f"{CLS_SCORE}.weight", "fc.weight"):
        if key in mapped.state:
            return rows(mapped, key, source)
    return None


def rows(mapped: Mapped, key: str, source: Path) -> int:
    """The first dimension of a mapped weight or bias (its rows: classes, box deltas, mask logits); a 0-d tensor,
    which has none, is named with its upstream key and shape (other shapes are checked against the model)."""
    value = mapped.state[key]
    if value.dim() == 0:
        raise EigpipeError(f"{source}: key {mapped.origin[key]} has shape [], not one row per output")
    return int(value.shape[0])


def fill(model: nn.Module, mapped: Mapped, source: Path) -> None:
    """Load every tensor into ``model``, after checking that each lands on a tensor of the model with the same
    shape and that each of the model's tensors is filled (BatchNorm's batch counters excepted)."""
    target = model.state_dict()
    for key, value in mapped.state.items():
        upstream = mapped.origin[key]
        if key not in target:
            raise EigpipeError(f"{source}: key {upstream} lands nowhere in the model (it would be {key})")
        if tuple(value.shape) != tuple(target[key].shape):
            raise EigpipeError(
                f"{source}: key {upstream} has shape {list(value.shape)}, the model's {key} takes "
                f"{list(target[key].shape)}"
            )
        check_tensor(source, upstream, value, target[key])
    missing = [k for k in target if k not in mapped.state and not k.endswith("num_batches_tracked")]
    if missing:
        raise EigpipeError(
            f"{source}: the model's {missing[0]} is filled by no key of the file ({len(missing)} tensors unfilled)"
        )
    state = {k: v.to(target[k].dtype) for k, v in mapped.state.items()}
    model.load_state_dict(state, strict=False)
