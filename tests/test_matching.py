"""The bootstrap over images: AP re-accumulated from one evaluate()'s per-image matching equals a COCOeval run on
the resampled images themselves (duplicates as new images), and the file that keeps the matching."""

from __future__ import annotations

import contextlib
import io
import time

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from eigpipe import matching
from eigpipe.errors import EigpipeError

CATEGORIES = [1, 2, 5]  # category 5 has one ground truth only, so some resamples leave it out


def _coco(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _study(rng: np.random.Generator, n_images: int = 12) -> tuple[dict, list[dict]]:
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


def _evaluate(gt: dict, results: list[dict]) -> COCOeval:
    coco = _coco(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco, coco.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def _resampled_study(gt: dict, results: list[dict], image_ids: list[int]) -> tuple[dict, list[dict]]:
    """The study on the resampled images: the j-th drawn image becomes image j + 1 (copies are new images)."""
    images, annotations, copies = [], [], []
    for new_id, old_id in enumerate(image_ids, start=1):
        images.append({"id": new_id, "width": 100, "height": 100})
        for ann in gt["annotations"]:
            if ann["image_id"] == old_id:
                annotations.append({**ann, "image_id": new_id, "id": len(annotations) + 1})
        copies += [{**r, "image_id": new_id} for r in results if r["image_id"] == old_id]
    return {**gt, "images": images, "annotations": annotations}, copies


def test_the_kept_matching_reaccumulates_to_cocoeval_numbers():
    gt, results = _study(np.random.default_rng(0))
    evaluator = _evaluate(gt, results)
    found = matching.average_precision(matching.from_evaluator(evaluator))
    assert found == {"AP": evaluator.stats[0], "AP50": evaluator.stats[1], "AP75": evaluator.stats[2]}


@pytest.mark.parametrize("seed", [1, 2])
def test_bootstrap_equals_cocoeval_on_the_resampled_images(seed):
    gt, results = _study(np.random.default_rng(seed))
    matches = matching.from_evaluator(_evaluate(gt, results))
    samples = matching.resamples(matches.n_images, count=4, seed=seed)
    boot = matching.bootstrap(matches, samples)
    for b, images in enumerate(samples):
        direct = _evaluate(*_resampled_study(gt, results, [int(matches.image_ids[i]) for i in images]))
        assert [boot[name][b] for name in ("AP", "AP50", "AP75")] == pytest.approx(list(direct.stats[:3]), abs=1e-12)
    only = int(np.flatnonzero(matches.image_ids == 3)[0])  # the one image with a ground truth of category 5
    assert any(only not in images for images in samples)  # a resample without it leaves category 5 out (-1)
    assert len(set(boot["AP"])) > 1  # the resamples differ


def test_resamples_are_reproducible_and_sorted():
    a, b = matching.resamples(50, 3, seed=7), matching.resamples(50, 3, seed=7)
    assert np.array_equal(a, b) and a.shape == (3, 50) and (np.diff(a, axis=1) >= 0).all()
    assert not np.array_equal(a, matching.resamples(50, 3, seed=8))


def test_matching_file_round_trip_and_damage(tmp_path, monkeypatch):
    gt, results = _study(np.random.default_rng(3))
    matches = matching.from_evaluator(_evaluate(gt, results))
    path = matching.write(tmp_path / "e.matches.npz", {"bbox": matches}, {"run": "r"})
    meta, read = matching.read(path)
    assert meta == {"run": "r", "iou_types": ["bbox"]}
    later = time.time() + 7200
    monkeypatch.setattr(time, "time", lambda: later)  # two hours later: no clock time in the file
    again = matching.write(tmp_path / "again.matches.npz", {"bbox": matches}, {"run": "r"})
    assert again.read_bytes() == path.read_bytes()  # no time stamps: a rerun writes the same bytes
    assert matching.average_precision(read["bbox"]) == matching.average_precision(matches)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(EigpipeError, match="not a readable per-image matching file"):
        matching.read(path)
    with pytest.raises(EigpipeError, match="not found"):
        matching.read(tmp_path / "missing.npz")
