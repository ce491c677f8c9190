"""COCO evaluation of a detector checkpoint with pycocotools (bbox, and segm for Mask R-CNN)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval
from torch.utils.data import DataLoader, Subset
from torchvision.ops import box_convert

from eigpipe import matching, provenance, runtime
from eigpipe.complexity import model_complexity
from eigpipe.errors import DataError, EigpipeError, NumericalError
from eigpipe.models import load_checkpoint
from eigpipe.outputs import Kind, claim_outputs, json_with

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
EVALUATION = json_with(("bbox", "complexity", "checkpoint_sha256"), "an eigpipe evaluation JSON")
MATCHES = Kind("an eigpipe per-image matching file", matching.is_matching_file)


class _NonFinite(Exception):
    def __init__(self, part: str, index: int | None) -> None:
        super().__init__(part)
        self.part, self.index = part, index


def _tensors(output: object) -> list[torch.Tensor]:
    if torch.is_tensor(output):
        return [output]
    items = output.values() if isinstance(output, dict) else output if isinstance(output, list | tuple) else ()
    return [tensor for item in items for tensor in _tensors(item)]


def _first_bad_image(output: object) -> int | None:
    """None when every tensor of a module's output is finite; else the index of the first image whose feature
    maps ([N, C, H, W]) are not, or -1 for tensors not batched by image (per-proposal outputs)."""
    for tensor in _tensors(output):
        if not torch.isfinite(tensor).all():
            if tensor.dim() != 4:
                return -1
            return int((~torch.isfinite(tensor.flatten(1)).all(1)).nonzero()[0])
    return None


@contextlib.contextmanager
def finite_outputs(model: torch.nn.Module) -> Iterator[None]:
    """Raise _NonFinite as soon as the backbone, the RPN head or the box predictor computes NaN or Inf.

    torchvision's post-processing drops boxes with non-finite scores, so a broken model would otherwise
    publish "no detections" (AP 0) instead of failing; the hooks are always removed."""
    parts = {"backbone": model.backbone, "RPN head": model.rpn.head, "box predictor": model.roi_heads.box_predictor}

    def hook(part: str):  # noqa: ANN202
        def check(_module: torch.nn.Module, _inputs: object, output: object) -> None:
            if (index := _first_bad_image(output)) is not None:
                raise _NonFinite(part, None if index < 0 else index)

        return check

    handles = [module.register_forward_hook(hook(part)) for part, module in parts.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def to_coco_results(output: dict[str, torch.Tensor], image_id: int, category_ids: list[int | None]) -> list[dict]:
    """One image's predictions as COCO result records (xywh boxes, category ids, RLE masks); labels whose
    category id is None (torchvision's "N/A" outputs of an imported COCO model) are no category."""
    boxes = box_convert(output["boxes"].cpu(), in_fmt="xyxy", out_fmt="xywh")
    records = []
    masks = output.get("masks")
    for k, (box, label, score) in enumerate(
        zip(boxes.tolist(), output["labels"].tolist(), output["scores"].tolist(), strict=True)
    ):
        if category_ids[label - 1] is None:
            continue
        record = {"image_id": image_id, "category_id": category_ids[label - 1], "bbox": box, "score": score}
        if masks is not None:
            binary = (masks[k, 0] > 0.5).cpu().numpy().astype(np.uint8)
            rle = mask_utils.encode(np.asfortranarray(binary))
            record["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
        records.append(record)
    return records


def predict(
    model: torch.nn.Module, dataset: Any, category_ids: list[int], device: torch.device, batch_size: int, workers: int
) -> list[dict]:
    """COCO result records of every image, in dataset order; ``workers`` decode images (0: in this process)."""
    from eigpipe.data.coco import collate

    results: list[dict] = []
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=collate,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator(),
    )  # global RNG untouched
    progress = runtime.progress(total=len(loader), desc="evaluate", unit="batch")
    with torch.inference_mode(), finite_outputs(model), progress as bar:
        for images, targets in loader:
            try:
                outputs = model([image.to(device, non_blocking=True) for image in images])
            except _NonFinite as exc:
                ids = [int(t["image_id"]) for t in targets]
                which = f"image id {ids[exc.index]}" if exc.index is not None else f"image ids {ids}"
                raise NumericalError(f"{which}: the {exc.part} computes non-finite values (NaN or Inf)") from None
            for output, target in zip(outputs, targets, strict=True):
                if not all(torch.isfinite(v).all() for k, v in output.items() if k in ("boxes", "scores")):
                    raise NumericalError(f"image id {int(target['image_id'])}: non-finite detections")
                results.extend(to_coco_results(output, int(target["image_id"]), category_ids))
            bar.update()
    return results


def coco_stats(
    coco_gt: Any, results: list[dict], iou_type: str, image_ids: list[int]
) -> tuple[dict[str, float], matching.Matches]:
    """The 12 standard COCOeval numbers (zeros when there is no detection at all) and the per-image matching of
    that one ``evaluate()``, which the report's bootstrap over images re-accumulates."""
    if not results:
        params = COCOeval(iouType=iou_type).params
        empty = matching.without_detections(coco_gt, image_ids, params.iouThrs, params.recThrs)
        return dict.fromkeys(STAT_NAMES, 0.0), empty
    with contextlib.redirect_stdout(sys.stderr):
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = {name: float(value) for name, value in zip(STAT_NAMES, evaluator.stats, strict=True)}
    return stats, matching.from_evaluator(evaluator)


def _check_ground_truth(coco: Any, image_ids: list[int], annotations: Path) -> None:
    """AP is undefined without images, or when no evaluated image has a non-crowd annotation (COCOeval's -1)."""
    if not image_ids:
        raise DataError(f"{annotations}: no images to evaluate")
    if not coco.getAnnIds(imgIds=image_ids, iscrowd=False):
        raise DataError(
            f"{annotations}: the {len(image_ids)} evaluated images have no annotations that count (only crowd"
            " ones, or none): AP is undefined"
        )


def matches_path(out: Path) -> Path:
    """The per-image matching file beside an evaluation JSON: ``E.json`` -> ``E.matches.npz``."""
    return Path(out).with_suffix(".matches.npz")


def evaluate_checkpoint(
    cfg: dict, checkpoint: Path, annotations: Path, images: Path, out: Path, matches_out: Path | None = None
) -> dict[str, Any]:
    """COCO metrics, params and MACs of a detector checkpoint on a split (sections evaluate, runtime), and the
    per-image matching of each IoU type in ``matches_out`` (default beside ``out``, see ``matches_path``).

    Evaluation draws no random numbers, so it reads no seed."""
    from eigpipe.data.coco import CocoDetection

    section = cfg["evaluate"]
    matches_out = Path(matches_out) if matches_out else matches_path(out)
    claim_outputs((out, EVALUATION), (matches_out, MATCHES), inputs=[checkpoint, annotations, images])
    env = runtime.setup(cfg["runtime"], seed=0)
    model, meta = load_checkpoint(checkpoint, env.device, required=("category_ids", "iteration"), task="detection")
    dataset = CocoDetection(annotations, images, train=False)
    if list(dataset.category_ids) != [c for c in meta["category_ids"] if c is not None]:
        raise EigpipeError(
            f"{annotations}: categories {dataset.category_ids} differ from the checkpoint's {meta['category_ids']}"
        )
    count = min(len(dataset), section["max_images"] or len(dataset))
    image_ids = list(dataset.ids[:count])
    _check_ground_truth(dataset.coco, image_ids, annotations)
    try:
        results = predict(
            model,
            Subset(dataset, range(count)),
            meta["category_ids"],
            env.device,
            section["batch_size"],
            section["workers"],
        )
    except NumericalError as exc:
        raise NumericalError(f"{checkpoint} on {annotations}: {exc}") from None
    size = meta["model_config"]["min_size"]
    iou_types = ["bbox", "segm"] if meta["model_name"] == "mask_rcnn" else ["bbox"]
    evaluated = {iou_type: coco_stats(dataset.coco, results, iou_type, image_ids) for iou_type in iou_types}
    report: dict[str, Any] = {
        "run": meta.get("run"),
        "model_name": meta["model_name"],
        "init": meta.get("init"),
        "seed": meta.get("seed"),
        "widths": meta["model_config"]["widths"],
        "iteration": meta["iteration"],
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": meta["sha256"],
        "n_images": count,
        "n_detections": len(results),
        "published": meta.get("published"),  # an imported checkpoint's published AP, beside the measured one
        "schedule": meta.get("schedule"),
        "imported_from": meta.get("imported_from"),
        **{iou_type: stats for iou_type, (stats, _) in evaluated.items()},
        "complexity": {"input_size": [size, size], **model_complexity(model, size, size)},
        "provenance": provenance.record(config=cfg, inputs=[annotations], seed=None, device=str(env.device)),
    }
    keep = {"run": report["run"], "checkpoint_sha256": meta["sha256"], "n_images": count}
    matching.write(matches_out, {iou_type: found for iou_type, (_, found) in evaluated.items()}, keep)
    provenance.write_json(out, report)
    print(
        f"{meta.get('run')}: bbox AP {report['bbox']['AP']:.4f} AP50 {report['bbox']['AP50']:.4f} on {count} images",
        file=sys.stderr,
    )
    return report
