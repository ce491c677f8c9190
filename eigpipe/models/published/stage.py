"""The ``eigpipe import`` stage: a published checkpoint becomes an ordinary eigpipe checkpoint.

The upstream preprocessing is folded in (the channel order into the stem conv, the mean and std into the
model's transform), the classes are put in torchvision's layout (background first) and mapped to COCO category
ids, and the source file's name, sha256 and preset go into the checkpoint's provenance. Every check runs before
the checkpoint is written, which happens atomically.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from eigpipe import config, provenance
from eigpipe.errors import EigpipeError
from eigpipe.models.checkpoint import weights_file
from eigpipe.models.published import from_detectron2, from_mmdet, from_torchvision, mapping
from eigpipe.models.published.presets import FAMILY_DEFAULTS, Preprocessing, Preset, find
from eigpipe.outputs import claim_outputs

FAMILY_MODULES = {"torchvision": from_torchvision, "detectron2": from_detectron2, "mmdet": from_mmdet}
RUN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # as the schema's names of imports (results/<study>/import/<run>.pt)


@dataclass
class Request:
    """What to import: a preset, or a family with the preprocessing the user states."""

    family: str
    preprocessing: Preprocessing
    preset: Preset | None = None
    model: dict[str, Any] = field(default_factory=dict)  # model-section keys given on the command line
    category_ids: list[int] | None = None


# model-section keys an import may set: how the imported detector runs, not what its weights are
TEST_TIME_KEYS = (
    "min_size",
    "max_size",
    "rpn_pre_nms_top_n_test",
    "rpn_post_nms_top_n_test",
    "box_detections_per_img",
    "box_score_thresh",
)


def make_request(
    preset: str | None = None,
    family: str | None = None,
    pixel_mean: list[float] | None = None,
    pixel_std: list[float] | None = None,
    channel_order: str | None = None,
    category_ids: list[int] | None = None,
    model: dict[str, Any] | None = None,
) -> Request:
    """What the command line asks to import; ``model`` sets test-time keys of the model section."""
    request = _request(preset, family, pixel_mean, pixel_std, channel_order)
    request.category_ids = _check_category_ids(category_ids)
    unknown = sorted(set(model or {}) - set(TEST_TIME_KEYS))
    if unknown:
        raise EigpipeError(
            f"--model-json: {unknown[0]} is set by the weights; an import sets only {', '.join(TEST_TIME_KEYS)}"
        )
    request.model = dict(model or {})
    return request


def _check_category_ids(ids: list[int] | None) -> list[int] | None:
    """Dataset category ids, one per class: whole numbers >= 0, each given once."""
    seen: set[int] = set()
    for value in ids or []:
        if value < 0:
            raise EigpipeError(f"--category-ids: {value} is negative (category ids are whole numbers >= 0)")
        if value in seen:
            raise EigpipeError(f"--category-ids: {value} is given twice (each class has its own category id)")
        seen.add(value)
    return ids


def _request(
    preset: str | None,
    family: str | None,
    pixel_mean: list[float] | None,
    pixel_std: list[float] | None,
    channel_order: str | None,
) -> Request:
    if (preset is None) == (family is None):
        raise EigpipeError(
            "give either --preset NAME or --from FAMILY (with --pixel-mean, --pixel-std, --channel-order)"
        )
    if preset is not None:
        if pixel_mean or pixel_std or channel_order:
            raise EigpipeError(
                f"--preset {preset} fixes the preprocessing; --pixel-mean/--pixel-std/--channel-order go with --from"
            )
        chosen = find(preset)
        return Request(chosen.family, chosen.preprocessing, chosen)
    if not (pixel_mean and pixel_std and channel_order):
        raise EigpipeError(f"--from {family}: give --pixel-mean, --pixel-std and --channel-order (a file holds none)")
    value_range = FAMILY_DEFAULTS[family]["value_range"]
    stated = Preprocessing(channel_order, tuple(pixel_mean), tuple(pixel_std), value_range, "command line")  # type: ignore[arg-type]
    return Request(family, stated)


def _read(request: Request, path: Path) -> tuple[mapping.Mapped, str, dict[str, Any]]:
    """(mapped state, kind "detector" | "caffe2", upstream meta) of the weights file."""
    module = FAMILY_MODULES[request.family]
    if request.family == "detectron2":
        state, kind = from_detectron2.read(path)
        from_detectron2.check_pixel_statistics(state, request.preprocessing, path)
        return from_detectron2.to_eigpipe(state, kind, path), kind, {}
    if request.family == "mmdet":
        state, meta = from_mmdet.read(path)
        versions = {k: str(v) for k, v in meta.items() if k.endswith("_version")}
        return from_mmdet.to_eigpipe(state, path), "detector", versions
    return module.to_eigpipe(module.read(path), path), "detector", {}


def _count(state: dict, pattern: str) -> int:
    count = 0
    while pattern.format(count) in state:
        count += 1
    return count


def _outputs(mapped: mapping.Mapped, key: str, source: Path) -> int:
    """Output channels (rows) of the model's tensor ``key``, which the architecture is read off; one no key of the
    file fills is named."""
    if key not in mapped.state:
        raise EigpipeError(f"{source}: the model's {key} is filled by no key of the file (the architecture needs it)")
    return mapping.rows(mapped, key, source)


def _inferred_model(mapped: mapping.Mapped, family: str, task: str, source: Path) -> tuple[str, dict[str, Any]]:
    """(model name, model-section keys) read off the file's tensors (``--from``)."""
    state = mapped.state
    prefix = "backbone.body." if task == "detection" else "body."
    keys = {k: v for k, v in FAMILY_DEFAULTS[family].items() if k in ("roi_align", "gn_groups")}
    keys["norm"] = "frozen_bn" if f"{prefix}bn1.running_mean" in state else "gn"
    if task == "classification":
        return "classifier", keys
    if "backbone.fpn.inner_blocks.0.1.weight" in state:
        keys["head_norm"] = "frozen_bn" if "backbone.fpn.inner_blocks.0.1.running_mean" in state else "gn"
    else:
        keys["head_norm"] = "none"
    keys["fpn_channels"] = _outputs(mapped, "backbone.fpn.inner_blocks.0.0.weight", source)
    keys["rpn_conv_depth"] = max(1, _count(state, "rpn.head.conv.{}.0.weight"))
    convs = _count(state, "roi_heads.box_head.{}.0.weight")
    if convs:
        layers = [_outputs(mapped, f"roi_heads.box_head.{i}.0.weight", source) for i in range(convs)]
        size = _outputs(mapped, f"roi_heads.box_head.{convs + 1}.weight", source)
        keys["box_head"] = {"type": "convfc", "conv_layers": layers, "representation_size": size}
    else:
        keys["box_head"] = {
            "type": "mlp",
            "representation_size": _outputs(mapped, "roi_heads.box_head.fc6.weight", source),
        }
    masks = _count(state, "roi_heads.mask_head.{}.0.weight")
    if masks:
        keys["mask_head_layers"] = [_outputs(mapped, f"roi_heads.mask_head.{i}.0.weight", source) for i in range(masks)]
    return ("mask_rcnn" if masks else "faster_rcnn"), keys


def _categories(request: Request, classes: int, path: Path, upstream_key: str) -> tuple[list[int | None], list[str]]:
    """COCO category id and name of each label 1..classes-1 (None for torchvision's "N/A" labels)."""
    from torchvision.models._meta import _COCO_CATEGORIES

    if request.category_ids:
        if len(request.category_ids) != classes - 1:
            raise EigpipeError(
                f"--category-ids: {len(request.category_ids)} ids for a model of {classes - 1} classes ({path})"
            )
        return list(request.category_ids), [str(i) for i in request.category_ids]
    named = list(enumerate(_COCO_CATEGORIES))[1:]
    if request.family == "torchvision" and classes == len(_COCO_CATEGORIES):
        return [None if name == "N/A" else i for i, name in named], [name for _, name in named]
    coco = [(i, name) for i, name in named if name != "N/A"]
    if classes == len(coco) + 1:
        return [i for i, _ in coco], [name for _, name in coco]
    raise EigpipeError(
        f"{path}: {upstream_key} has {classes} outputs ({classes - 1} classes and background), not COCO's "
        f"{len(coco)}: give --category-ids with the dataset's {classes - 1} category ids"
    )


def _published(chosen: Preset | None) -> dict[str, Any] | None:
    """The published AP as COCOeval reports it (a fraction, like the evaluation's own ``AP``), and its source."""
    if chosen is None or not chosen.published:
        return None
    return {k: round(v / 100, 4) if k.endswith("_AP") else v for k, v in chosen.published.items()}


def _build(task: str, model_name: str, model_cfg: dict, classes: int, widths: Any) -> nn.Module:
    from eigpipe.models import Classifier, build_body, build_detector

    if task == "classification":
        return Classifier(build_body(model_cfg, widths), classes)
    return build_detector(model_name, model_cfg, classes, widths)


def convert(
    weights: Path, request: Request, run: str | None = None, init: str | None = None, labels: dict | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """The eigpipe model (eval mode) and checkpoint meta of a published weights file."""
    from eigpipe.models import standard
    from eigpipe.models.checkpoint import widths_from_state_dict

    weights = weights_file(weights)
    mapped, kind, upstream_meta = _read(request, weights)
    task = "classification" if kind == "caffe2" else "detection"
    chosen = request.preset
    if chosen is not None and (chosen.model_name == "classifier") != (task == "classification"):
        what = "an ImageNet classifier" if chosen.model_name == "classifier" else "a detector"
        raise EigpipeError(f"{weights}: preset {chosen.name} imports {what}; this file holds a {kind} state")
    if task == "detection":
        mapping.place_box_fcs(mapped)
        if FAMILY_MODULES[request.family].BACKGROUND_LAST:
            mapping.background_first(mapped, weights)
    prefix = "backbone.body." if task == "detection" else "body."
    if prefix + mapping.STEM not in mapped.state:
        raise EigpipeError(
            f"{weights}: the model's {prefix}{mapping.STEM} (the stem conv) is filled by no key of the file"
        )
    mapping.fold_channel_order(mapped, prefix, request.preprocessing.channel_order, weights)

    if chosen is not None:
        model_name, keys, widths = chosen.model_name, dict(chosen.model), standard()
    else:
        model_name, keys = _inferred_model(mapped, request.family, task, weights)
        widths = widths_from_state_dict(mapped.state, prefix, source=str(weights))
        keys["depths"] = widths.depths
    mean, std = request.preprocessing.rgb_unit()
    model_cfg = config.validate(
        {**keys, **request.model, "image_mean": mean, "image_std": std},
        f"import {chosen.name if chosen else request.family}",
        config.schema()["properties"]["model"],
        prefix="model",
    )
    cls_key = mapping.CLS_SCORE + ".weight" if task == "detection" else "fc.weight"
    classes = mapping.num_classes(mapped, weights)
    if classes is None:
        raise EigpipeError(f"{weights}: the model's {cls_key} (the classifier) is filled by no key of the file")
    if chosen is not None and classes != chosen.classes:
        raise EigpipeError(
            f"{weights}: {mapped.origin[cls_key]} has {classes} outputs; preset {chosen.name} takes {chosen.classes}"
        )
    ids, names = (
        ([], []) if task == "classification" else _categories(request, classes, weights, mapped.origin[cls_key])
    )
    model = _build(task, model_name, model_cfg, classes, widths)
    mapping.fill(model, mapped, weights)

    relabelled = FAMILY_MODULES[request.family].BACKGROUND_LAST and task == "detection"
    source = {
        "file": weights.name,
        "sha256": provenance.sha256_file(weights),
        "preset": chosen.name if chosen else None,
        "family": request.family,
        "config": chosen.config if chosen else None,
        "preprocessing": request.preprocessing.to_dict(),
        "class_layout": "background moved from last to label 0" if relabelled else "as in the file",
        "dropped": mapped.dropped,
        "upstream_versions": upstream_meta,
    }
    record = provenance.record(config=source, inputs=[weights], seed=None, device="cpu")
    record["source"] = source
    meta = {
        "task": task,
        "model_name": model_name,
        "model_config": model_cfg,
        "widths": widths.to_dict(),
        "num_classes": classes,
        "categories": names,
        "category_ids": ids,
        "iteration": 0,
        "run": run or (chosen.name.partition("/")[2] if chosen else weights.stem),
        "init": init or (chosen.init if chosen else None),
        "schedule": (labels or {}).get("schedule") or (chosen.schedule if chosen else None),
        "imported_from": (labels or {}).get("source") or (chosen.config if chosen else weights.name),
        "seed": None,
        "published": _published(chosen),
        "provenance": record,
    }
    return model.eval(), meta


def import_checkpoint(
    cfg: dict,
    weights: Path,
    out: Path,
    preset: str | None = None,
    family: str | None = None,
    run: str | None = None,
    init: str | None = None,
    pixel_mean: list[float] | None = None,
    pixel_std: list[float] | None = None,
    channel_order: str | None = None,
    category_ids: list[int] | None = None,
    model_json: str | None = None,
    schedule: str | None = None,
    source_label: str | None = None,
) -> dict[str, Any]:
    """The ``eigpipe import`` stage (no config sections): write an eigpipe checkpoint; return its meta."""
    from eigpipe.models import save_checkpoint
    from eigpipe.models.checkpoint import CHECKPOINT

    claim_outputs((out, CHECKPOINT), inputs=[weights])
    weights_file(weights)
    if run is not None and (not RUN_NAME.fullmatch(run) or set(run) == {"."}):
        raise EigpipeError(f"--run: {run!r} is not a run name (letters, digits, _ . -; not dots only)")
    model = config.parse_json(model_json, "--model-json") if model_json else {}
    if not isinstance(model, dict):
        raise EigpipeError("--model-json: give an object of model-section keys")
    request = make_request(preset, family, pixel_mean, pixel_std, channel_order, category_ids, model)
    model, meta = convert(Path(weights), request, run, init, {"schedule": schedule, "source": source_label})
    save_checkpoint(out, model, meta)
    print(
        f"import: {Path(weights).name} ({meta['provenance']['source']['preset'] or request.family}) -> {out}: "
        f"{meta['model_name']}, {meta['num_classes']} outputs, {len(meta['provenance']['source']['dropped'])} "
        "entries dropped",
        file=sys.stderr,
    )
    return meta
