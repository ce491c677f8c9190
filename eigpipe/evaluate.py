"""COCO evaluation of a detector checkpoint with pycocotools (bbox, and segm for Mask R-CNN)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval
from torch.utils.data import DataLoader, Subset
from torchvision.ops import box_convert
from tqdm import tqdm

from eigpipe import matching, provenance, runtime
from eigpipe.complexity import model_complexity
from eigpipe.errors import EigpipeError
from eigpipe.models import load_checkpoint

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def to_coco_results(output: dict[str, torch.Tensor], image_id: int, category_ids: list[int]) -> list[dict]:
    """One image's predictions as COCO result records (xywh boxes, category ids, RLE masks)."""
    boxes = box_convert(output["boxes"].cpu(), in_fmt="xyxy", out_fmt="xywh")
    records = []
    masks = output.get("masks")
    for k, (box, label, score) in enumerate(
        zip(boxes.tolist(), output["labels"].tolist(), output["scores"].tolist(), strict=True)
    ):
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
    with torch.inference_mode():
        for images, targets in tqdm(loader, desc="evaluate", unit="batch", file=sys.stderr):
            outputs = model([image.to(device, non_blocking=True) for image in images])
            for output, target in zip(outputs, targets, strict=True):
                results.extend(to_coco_results(output, int(target["image_id"]), category_ids))
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
    provenance.check_writable(out)
    provenance.check_writable(matches_out)
    env = runtime.setup(cfg["runtime"], seed=0)
    model, meta = load_checkpoint(checkpoint, env.device)
    if meta["task"] != "detection":
        raise EigpipeError(f"{checkpoint}: a {meta['task']} checkpoint cannot be evaluated as a detector")
    dataset = CocoDetection(annotations, images, train=False)
    if list(dataset.category_ids) != list(meta["category_ids"]):
        raise EigpipeError(
            f"{annotations}: categories {dataset.category_ids} differ from the checkpoint's {meta['category_ids']}"
        )
    count = min(len(dataset), section["max_images"] or len(dataset))
    image_ids = list(dataset.ids[:count])
    results = predict(
        model,
        Subset(dataset, range(count)),
        meta["category_ids"],
        env.device,
        section["batch_size"],
        section["workers"],
    )
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
