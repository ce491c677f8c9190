"""A synthetic COCO bbox evaluation several test modules use: ground truth (with a crowd box and a category of
one instance) and scored detections with hits, misses, duplicates and tied scores, evaluated by COCOeval."""

from __future__ import annotations

import contextlib
import io

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

CATEGORIES = [1, 2, 5]  # category 5 has one ground truth only, so some resamples leave it out


def coco_from(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def scored_study(rng: np.random.Generator, n_images: int = 12) -> tuple[dict, list[dict]]:
    """Ground truth (with a crowd box) and scored detections: hits, misses, duplicates and tied scores."""
    images, annotations, results = [], [], []
    for image_id in range(1, n_images + 1):
        images.append({"id": image_id, "width": 100, "height": 100})
        for _ in range(rng.integers(0, 4)):
            category = int(rng.choice(CATEGORIES[:2]))
            x, y, w, h = (float(v) for v in rng.uniform([0, 0, 8, 8], [60, 60, 40, 40]))
            annotations.append({"image_id": image_id, "category_id": category, "bbox": [x, y, w, h]})
            for _ in range(rng.integers(0, 3)):  # near and far copies
                jitter = rng.normal(0, rng.choice([1.0, 6.0]), 4)
                box = [x + jitter[0], y + jitter[1], max(2.0, w + jitter[2]), max(2.0, h + jitter[3])]
                results.append({"image_id": image_id, "category_id": category, "bbox": box})
        for _ in range(rng.integers(0, 3)):  # background detections
            box = [float(v) for v in rng.uniform([0, 0, 5, 5], [80, 80, 20, 20])]
            results.append({"image_id": image_id, "category_id": int(rng.choice(CATEGORIES)), "bbox": box})
    annotations.append({"image_id": 3, "category_id": 5, "bbox": [10.0, 10.0, 20.0, 20.0]})
    annotations.append({"image_id": 4, "category_id": 1, "bbox": [0.0, 0.0, 50.0, 50.0], "iscrowd": 1})
    scores = rng.choice([0.9, 0.5, 0.3], size=len(results))  # few distinct scores: many ties
    scores[::3] = rng.uniform(0, 1, size=len(scores[::3]))
    for record, score in zip(results, scores, strict=True):
        record["score"] = float(score)
    for k, ann in enumerate(annotations, start=1):
        ann.update(id=k, area=ann["bbox"][2] * ann["bbox"][3], iscrowd=ann.get("iscrowd", 0))
    gt = {"images": images, "annotations": annotations, "categories": [{"id": c, "name": str(c)} for c in CATEGORIES]}
    return gt, results


def evaluate_bbox(gt: dict, results: list[dict]) -> COCOeval:
    coco = coco_from(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco, coco.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator
