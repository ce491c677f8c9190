"""pycocotools' per-image matching, kept and re-accumulated: the AP of any multiset of the evaluated images
(a bootstrap resample) without matching a box again.

``COCOeval.evaluate()`` matches every image's detections to its ground truth, per category and area range,
into ``evalImgs``; ``accumulate()`` concatenates the results of the evaluated images per category, sorts the
detections by score (a stable mergesort), counts true and false positives and samples the interpolated
precision at 101 recall thresholds (read in pycocotools 2.0.11, PythonAPI/pycocotools/cocoeval.py:
``evaluateImg``, ``accumulate``, ``summarize``). AP, AP50 and AP75 read only the area range "all" at 100
detections per image, so only those per-image results are kept: each detection's score and, per IoU threshold,
whether it matched a ground truth and whether it is ignored; and each (category, image)'s count of ground truths
that are not ignored. ``average_precision`` repeats ``accumulate``'s arithmetic on the images of a resample in
the order a COCOeval of those images, duplicates included, would see them, so it gives the same numbers
(tested against such a COCOeval). Torch-free: the report reads these files.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eigpipe.errors import EigpipeError
from eigpipe.provenance import publish

MAX_DETECTIONS = 100  # summarize()'s maxDets for AP
ARRAYS = ("category_ids", "image_ids", "iou_thresholds", "rec_thresholds", "gt_count")
DETECTIONS = ("det_category", "det_image", "det_score", "det_matched", "det_ignored")


@dataclass(frozen=True)
class Matches:
    """One evaluation's per-image matching (area "all"), detections in evalImgs order: by category, image, then
    the image's own score order."""

    category_ids: np.ndarray  # [K] as COCOeval sorted them
    image_ids: np.ndarray  # [I] as COCOeval sorted them
    iou_thresholds: np.ndarray  # [T]
    rec_thresholds: np.ndarray  # [R]
    gt_count: np.ndarray  # [K, I] ground truths not ignored
    det_category: np.ndarray  # [N] index into category_ids
    det_image: np.ndarray  # [N] index into image_ids
    det_score: np.ndarray  # [N]
    det_matched: np.ndarray  # [N, T] bool
    det_ignored: np.ndarray  # [N, T] bool

    @property
    def n_images(self) -> int:
        return len(self.image_ids)

    def spans(self) -> tuple[np.ndarray, np.ndarray]:
        """[K, I] start and end of each (category, image)'s detections."""
        keys = self.det_category.astype(np.int64) * self.n_images + self.det_image
        cells = np.arange(len(self.category_ids) * self.n_images).reshape(len(self.category_ids), self.n_images)
        return np.searchsorted(keys, cells, "left"), np.searchsorted(keys, cells, "right")


def from_evaluator(evaluator: Any) -> Matches:
    """The per-image matching of a COCOeval after ``evaluate()`` (area range "all", the first 100 detections)."""
    p = evaluator.params
    n_areas, n_images = len(p.areaRng), len(p.imgIds)
    area = p.areaRngLbl.index("all")
    gt_count = np.zeros((len(p.catIds), n_images), dtype=np.int64)
    columns: dict[str, list] = {name: [] for name in DETECTIONS}
    for k in range(len(p.catIds)):
        for i in range(n_images):
            e = evaluator.evalImgs[k * n_areas * n_images + area * n_images + i]
            if e is None:  # no ground truth and no detection of this category here
                continue
            gt_count[k, i] = int(np.count_nonzero(np.asarray(e["gtIgnore"]) == 0))
            scores = np.asarray(e["dtScores"][:MAX_DETECTIONS], dtype=np.float64)
            columns["det_category"].append(np.full(len(scores), k, dtype=np.int32))
            columns["det_image"].append(np.full(len(scores), i, dtype=np.int32))
            columns["det_score"].append(scores)
            columns["det_matched"].append(np.asarray(e["dtMatches"])[:, :MAX_DETECTIONS].T != 0)
            columns["det_ignored"].append(np.asarray(e["dtIgnore"])[:, :MAX_DETECTIONS].T != 0)
    n_t = len(p.iouThrs)
    empty = {"det_matched": np.zeros((0, n_t), bool), "det_ignored": np.zeros((0, n_t), bool)}
    detections = {
        name: np.concatenate(parts) if parts else empty.get(name, np.zeros(0)) for name, parts in columns.items()
    }
    return Matches(
        category_ids=np.asarray(p.catIds, dtype=np.int64),
        image_ids=np.asarray(p.imgIds, dtype=np.int64),
        iou_thresholds=np.asarray(p.iouThrs, dtype=np.float64),
        rec_thresholds=np.asarray(p.recThrs, dtype=np.float64),
        gt_count=gt_count,
        **detections,
    )


def without_detections(coco_gt: Any, image_ids: list[int], iou_thresholds: np.ndarray, rec: np.ndarray) -> Matches:
    """The matching of an evaluation with no detection at all (COCOeval cannot load empty results): only the
    ground truths count (crowd annotations are the ignored ones in area range "all")."""
    categories = np.asarray(sorted(coco_gt.getCatIds()), dtype=np.int64)
    images = np.asarray(sorted(set(image_ids)), dtype=np.int64)
    gt_count = np.zeros((len(categories), len(images)), dtype=np.int64)
    row, column = {c: k for k, c in enumerate(categories)}, {m: i for i, m in enumerate(images)}
    for ann in coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=list(images))):
        if not ann.get("iscrowd", 0) and not ann.get("ignore", 0):
            gt_count[row[ann["category_id"]], column[ann["image_id"]]] += 1
    n_t = len(iou_thresholds)
    return Matches(
        categories,
        images,
        np.asarray(iou_thresholds, float),
        np.asarray(rec, float),
        gt_count,
        np.zeros(0, np.int32),
        np.zeros(0, np.int32),
        np.zeros(0, np.float64),
        np.zeros((0, n_t), bool),
        np.zeros((0, n_t), bool),
    )


def _category_precision(matches: Matches, rows: np.ndarray, npig: int) -> np.ndarray:
    """[T, R] interpolated precision of one category from its detections ``rows`` in concatenation order."""
    order = np.argsort(-matches.det_score[rows], kind="mergesort")
    matched, ignored = matches.det_matched[rows][order], matches.det_ignored[rows][order]
    tp_sum = np.cumsum(matched & ~ignored, axis=0).astype(float)
    fp_sum = np.cumsum(~matched & ~ignored, axis=0).astype(float)
    n_det = len(rows)
    precision = np.zeros((len(matches.iou_thresholds), len(matches.rec_thresholds)))
    if n_det == 0:
        return precision
    for t in range(len(matches.iou_thresholds)):
        tp, fp = tp_sum[:, t], fp_sum[:, t]
        recall = tp / npig
        envelope = np.maximum.accumulate((tp / (fp + tp + np.spacing(1)))[::-1])[::-1]
        at = np.searchsorted(recall, matches.rec_thresholds, side="left")
        precision[t] = np.where(at < n_det, envelope[np.minimum(at, n_det - 1)], 0.0)
    return precision


def average_precision(matches: Matches, images: np.ndarray | None = None, spans: Any = None) -> dict[str, float]:
    """AP, AP50 and AP75 (area all, 100 detections) of the images at ``images`` (indices into image_ids, repeats
    allowed; all images once by default), as COCOeval would compute them on those images. ``spans``: a cached
    ``matches.spans()``."""
    images = np.arange(matches.n_images) if images is None else np.sort(np.asarray(images))
    starts, ends = spans if spans is not None else matches.spans()
    n_t, n_r, n_k = len(matches.iou_thresholds), len(matches.rec_thresholds), len(matches.category_ids)
    precision = -np.ones((n_t, n_r, n_k))
    for k in range(n_k):
        npig = int(matches.gt_count[k, images].sum())
        if npig == 0:  # accumulate() leaves the category out (-1)
            continue
        first, lengths = starts[k, images], ends[k, images] - starts[k, images]
        offsets = np.cumsum(lengths) - lengths
        rows = np.repeat(first - offsets, lengths) + np.arange(int(lengths.sum()))
        precision[:, :, k] = _category_precision(matches, rows, npig)
    return {
        "AP": _mean_defined(precision),
        "AP50": _mean_defined(precision[_threshold(matches, 0.5)]),
        "AP75": _mean_defined(precision[_threshold(matches, 0.75)]),
    }


def _threshold(matches: Matches, iou: float) -> np.ndarray:
    return np.where(matches.iou_thresholds == iou)[0]


def _mean_defined(values: np.ndarray) -> float:
    """summarize()'s mean over the entries that are not -1 (-1 when there are none)."""
    defined = values[values > -1]
    return float(np.mean(defined)) if len(defined) else -1.0


def resamples(n_images: int, count: int, seed: int) -> np.ndarray:
    """[count, n_images] bootstrap resamples of image indices (with replacement), each sorted."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.integers(0, n_images, size=(count, n_images)), axis=1)


def bootstrap(matches: Matches, samples: np.ndarray) -> dict[str, np.ndarray]:
    """{AP, AP50, AP75: [B]} over the resamples ``samples`` [B, n_images]."""
    spans = matches.spans()
    found = [average_precision(matches, images, spans) for images in samples]
    return {name: np.array([f[name] for f in found]) for name in ("AP", "AP50", "AP75")}


def write(path: Path, by_type: dict[str, Matches], meta: dict[str, Any]) -> Path:
    """One .npz of every IoU type's matching (keys ``<type>.<array>``) and a JSON ``meta`` record, atomically."""
    arrays: dict[str, np.ndarray] = {"meta": np.array(json.dumps({**meta, "iou_types": list(by_type)}))}
    for iou_type, matches in by_type.items():
        arrays.update({f"{iou_type}.{name}": getattr(matches, name) for name in (*ARRAYS, *DETECTIONS)})
    with publish(path) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    return Path(path)


def is_matching_file(path: Path) -> bool:
    """Whether ``path`` is a file ``write`` made (an .npz holding a ``meta`` record of IoU types)."""
    with np.load(path, allow_pickle=False) as data:
        return "meta" in data.files and "iou_types" in json.loads(str(data["meta"]))


def read(path: Path) -> tuple[dict[str, Any], dict[str, Matches]]:
    """(meta, {IoU type: Matches}) of a file ``write`` made; one-line errors for a missing or damaged one."""
    if Path(path).is_file() and not zipfile.is_zipfile(path):  # NumPy would read it as a pickle and say so
        raise EigpipeError(f"{path}: not a readable per-image matching file (not an .npz archive)")
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            by_type = {
                iou_type: Matches(**{name: data[f"{iou_type}.{name}"] for name in (*ARRAYS, *DETECTIONS)})
                for iou_type in meta["iou_types"]
            }
    except FileNotFoundError:
        raise EigpipeError(f"{path}: per-image matching file not found") from None
    except Exception as exc:  # zip, npy and JSON errors of a damaged file
        raise EigpipeError(f"{path}: not a readable per-image matching file ({type(exc).__name__}: {exc})") from None
    return meta, by_type
