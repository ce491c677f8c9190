"""The bootstrap over images: AP re-accumulated from one evaluate()'s per-image matching equals a COCOeval run on
the resampled images themselves (duplicates as new images), and the file that keeps the matching."""

from __future__ import annotations

import time

import numpy as np
import pytest

from eigpipe import matching
from eigpipe.errors import EigpipeError
from tests.coco_study import evaluate_bbox, scored_study


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
    gt, results = scored_study(np.random.default_rng(0))
    evaluator = evaluate_bbox(gt, results)
    found = matching.average_precision(matching.from_evaluator(evaluator))
    assert found == {"AP": evaluator.stats[0], "AP50": evaluator.stats[1], "AP75": evaluator.stats[2]}


@pytest.mark.parametrize("seed", [1, 2])
def test_bootstrap_equals_cocoeval_on_the_resampled_images(seed):
    gt, results = scored_study(np.random.default_rng(seed))
    matches = matching.from_evaluator(evaluate_bbox(gt, results))
    samples = matching.resamples(matches.n_images, count=4, seed=seed)
    boot = matching.bootstrap(matches, samples)
    for b, images in enumerate(samples):
        direct = evaluate_bbox(*_resampled_study(gt, results, [int(matches.image_ids[i]) for i in images]))
        assert [boot[name][b] for name in ("AP", "AP50", "AP75")] == pytest.approx(list(direct.stats[:3]), abs=1e-12)
    only = int(np.flatnonzero(matches.image_ids == 3)[0])  # the one image with a ground truth of category 5
    assert any(only not in images for images in samples)  # a resample without it leaves category 5 out (-1)
    assert len(set(boot["AP"])) > 1  # the resamples differ


def test_resamples_are_reproducible_and_sorted():
    a, b = matching.resamples(50, 3, seed=7), matching.resamples(50, 3, seed=7)
    assert np.array_equal(a, b) and a.shape == (3, 50) and (np.diff(a, axis=1) >= 0).all()
    assert not np.array_equal(a, matching.resamples(50, 3, seed=8))


def test_matching_file_round_trip_and_damage(tmp_path, monkeypatch):
    gt, results = scored_study(np.random.default_rng(3))
    matches = matching.from_evaluator(evaluate_bbox(gt, results))
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
    path.write_text('{"bbox": {}}')  # an evaluation JSON given for it: NumPy's pickle advice would mislead
    with pytest.raises(EigpipeError, match=r"not a readable per-image matching file \(not an .npz archive\)$"):
        matching.read(path)
