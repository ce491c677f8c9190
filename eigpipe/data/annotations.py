"""COCO-format annotations (real COCO 2017 included): structural validation without opening any image.

Validation fails on the first structural problem (JSON, records, ids, boxes, segmentations) with a one-line
DataError naming the file and the record; image files are checked by ``eigpipe.data.checks``. Imperfect boxes
that real datasets carry (edges past the image, zero width or height) are clipped or dropped the way
torchvision's detection references do, with one warning line, unless ``strict``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import reprlib
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from pycocotools.coco import COCO

from eigpipe.errors import DataError

Box = tuple[float, float, float, float]
REQUIRED = {
    "images": ("id", "file_name", "width", "height"),
    "annotations": ("id", "image_id", "category_id", "bbox"),
    "categories": ("id", "name"),
}
SINGULAR = {"images": "image", "annotations": "annotation", "categories": "category"}
_short = reprlib.Repr()  # values shown in one-line errors stay short
_short.maxlist, _short.maxstring, _short.maxother = 6, 60, 60


@dataclass
class ValidationReport:
    """What ``validate`` found; ``dataset`` is the parsed JSON and ``boxes`` the clipped xyxy per annotation id
    (None where the box is degenerate and dropped)."""

    path: Path
    n_images: int
    n_annotations: int
    n_categories: int
    n_crowd: int
    n_clipped: int
    n_dropped: int
    n_images_without_annotations: int
    dataset: dict = field(repr=False)
    boxes: dict[int, Box | None] = field(repr=False)

    @cached_property
    def coco(self) -> COCO:
        """The pycocotools index of the dataset (built once, without pycocotools' prints)."""
        coco = COCO()
        coco.dataset = self.dataset
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return coco

    def summary(self) -> str:
        return (
            f"{self.path.name}: {self.n_images} images, {self.n_annotations} annotations, "
            f"{self.n_categories} categories ({self.n_clipped} boxes clipped, {self.n_dropped} dropped, "
            f"{self.n_crowd} crowd, {self.n_images_without_annotations} images without annotations)"
        )


# ---- validation ---------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def load_json(path: Path) -> dict:
    """The parsed annotation file; a DataError for a missing, unreadable, empty or non-JSON file."""
    if not path.exists():
        raise DataError(f"{path}: annotation file not found")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: annotation file cannot be read ({exc.strerror or exc})") from None
    if not raw.strip():
        raise DataError(f"{path}: annotation file is empty")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not valid JSON (not UTF-8 text)") from None
    except RecursionError:
        raise DataError(f"{path}: not an annotation file (JSON nested too deeply)") from None
    if not isinstance(data, dict):
        raise DataError(
            f"{path}: the top level must be an object with images, annotations and categories, "
            f"not a {type(data).__name__}"
        )
    for key in REQUIRED:
        if not isinstance(data.get(key), list):
            problem = "missing" if key not in data else "not a list"
            raise DataError(f"{path}: top-level key '{key}' is {problem}")
    return data


def _check_records(path: Path, data: dict, key: str) -> dict[int, dict]:
    """Records of ``data[key]`` by id, after checking each is an object with the required keys and a unique id."""
    by_id: dict[int, dict] = {}
    singular = SINGULAR[key]
    for position, record in enumerate(data[key]):
        if not isinstance(record, dict):
            raise DataError(f"{path}: {key}[{position}] is not an object")
        name = f"{singular} id {_short.repr(record['id'])}" if "id" in record else f"{key}[{position}]"
        for required in REQUIRED[key]:
            if required not in record:
                raise DataError(f"{path}: {name} has no '{required}'")
        if not _is_int(record["id"]):
            raise DataError(f"{path}: {key}[{position}] has a non-integer id {_short.repr(record['id'])}")
        if record["id"] in by_id:
            raise DataError(f"{path}: duplicate {singular} id {record['id']} ({key}[{position}])")
        by_id[record["id"]] = record
    return by_id


def _check_image_record(path: Path, image: dict) -> None:
    for key in ("width", "height"):
        value = image[key]
        if not (_is_number(value) and value > 0 and float(value).is_integer()):
            raise DataError(
                f"{path}: image id {image['id']} ({image['file_name']}): {key} {_short.repr(value)} "
                f"is not a positive integer"
            )
    if not isinstance(image["file_name"], str) or not image["file_name"]:
        raise DataError(
            f"{path}: image id {image['id']}: file_name {_short.repr(image['file_name'])} is not a file name"
        )


def _check_annotation(path: Path, ann: dict, images: dict[int, dict], categories: dict[int, dict]) -> None:
    name = f"annotation id {ann['id']}"
    if not _is_int(ann["image_id"]) or ann["image_id"] not in images:
        raise DataError(f"{path}: {name}: image_id {_short.repr(ann['image_id'])} is not an image of the file")
    if not _is_int(ann["category_id"]) or ann["category_id"] not in categories:
        raise DataError(f"{path}: {name}: category_id {_short.repr(ann['category_id'])} is not in categories")
    bbox = ann["bbox"]
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        raise DataError(f"{path}: {name}: bbox {_short.repr(bbox)} is not a list of 4 finite numbers [x, y, w, h]")
    if bbox[2] < 0 or bbox[3] < 0:
        raise DataError(f"{path}: {name}: bbox {_short.repr(bbox)} has a negative width or height")
    if ann.get("iscrowd", 0) not in (0, 1):
        raise DataError(f"{path}: {name}: iscrowd {_short.repr(ann['iscrowd'])} is not 0 or 1")
    if "area" in ann and not (_is_number(ann["area"]) and ann["area"] >= 0):  # COCOeval's size ranges read it
        raise DataError(f"{path}: {name}: area {_short.repr(ann['area'])} is not a number >= 0")
    _check_segmentation(path, ann, images[ann["image_id"]])


def _polygon_problem(polygon: Any) -> str | None:
    if not isinstance(polygon, list):
        return f"{_short.repr(polygon)} is not a list of numbers"
    try:  # one C-speed pass: a string or None fails, a NaN or infinity makes the sum non-finite
        finite = math.isfinite(sum(polygon, 0.0))
    except (TypeError, OverflowError):
        finite = False
    if not finite:
        return f"{_short.repr(polygon)} is not a list of finite numbers"
    if len(polygon) < 6 or len(polygon) % 2:
        return f"has {len(polygon)} numbers, not an even count of at least 6 (x, y of 3 or more points)"
    return None


def _string_total(counts: str) -> int | None:
    """Pixels covered by a compressed COCO RLE string (pycocotools' rleFrString), None if it does not decode."""
    runs: list[int] = []
    value = shift = 0
    for byte in counts.encode():
        char = byte - 48  # six bits per character, offset by '0'
        if not 0 <= char < 64:
            return None
        value |= (char & 0x1F) << shift
        shift += 5
        if char & 0x20:  # more characters of this run length follow
            continue
        if char & 0x10:  # negative
            value |= -1 << shift
        value += runs[-2] if len(runs) > 2 else 0  # from the fourth on, a run is stored as a difference
        if value < 0:
            return None
        runs.append(value)
        value = shift = 0
    return None if shift else sum(runs)


def _rle_problem(rle: dict, image: dict) -> str | None:
    if "size" not in rle or "counts" not in rle:
        return f"{_short.repr(rle)} has no 'size' and 'counts'"
    height, width = image["height"], image["width"]
    if rle["size"] != [height, width]:
        return f"size {_short.repr(rle['size'])} is not the image's [height, width] [{height}, {width}]"
    counts = rle["counts"]
    if isinstance(counts, str):
        total = _string_total(counts)
    elif isinstance(counts, list):
        try:  # run lengths are non-negative integers: a float makes the sum a float, a string fails
            total = sum(counts) if not counts or min(counts) >= 0 else None
        except TypeError:
            total = None
    else:
        return f"counts {_short.repr(counts)} is neither a list of run lengths nor a compressed string"
    if type(total) is not int:
        return f"counts {_short.repr(counts)} cannot be decoded"
    if total != height * width:
        return f"counts cover {total} pixels, not the {height * width} of the {width}x{height} image"
    return None


def _check_segmentation(path: Path, ann: dict, image: dict) -> None:
    """Polygons (even counts of at least 6 finite numbers) or an RLE of the image's size that decodes."""
    segmentation = ann.get("segmentation")
    name = f"annotation id {ann['id']} (image id {image['id']}, {image['file_name']})"
    if isinstance(segmentation, list):
        for index, polygon in enumerate(segmentation):
            if (problem := _polygon_problem(polygon)) is not None:
                raise DataError(f"{path}: {name}: segmentation polygon {index} {problem}")
    elif isinstance(segmentation, dict):
        if (problem := _rle_problem(segmentation, image)) is not None:
            raise DataError(f"{path}: {name}: segmentation RLE {problem}")
    elif segmentation is not None:
        raise DataError(f"{path}: {name}: segmentation is neither polygons (a list) nor RLE (an object)")


def clip_box(bbox: list[float], width: float, height: float) -> tuple[Box | None, bool]:
    """COCO [x, y, w, h] -> (xyxy clipped to the image, or None when degenerate; whether clipping changed it)."""
    x1, y1 = bbox[0], bbox[1]
    x2, y2 = x1 + bbox[2], y1 + bbox[3]
    clipped = (min(max(x1, 0.0), width), min(max(y1, 0.0), height), min(max(x2, 0.0), width), min(max(y2, 0.0), height))
    changed = clipped != (x1, y1, x2, y2)
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        return None, changed
    return tuple(float(v) for v in clipped), changed


def _boxes(path: Path, data: dict, images: dict[int, dict], strict: bool) -> tuple[dict[int, Box | None], int, int]:
    """Clipped xyxy boxes by annotation id, and how many non-crowd boxes were clipped and dropped."""
    boxes: dict[int, Box | None] = {}
    n_clipped = n_dropped = 0
    for ann in data["annotations"]:
        image = images[ann["image_id"]]
        box, changed = clip_box(ann["bbox"], image["width"], image["height"])
        boxes[ann["id"]] = box
        if ann.get("iscrowd", 0):
            continue
        if strict and (changed or box is None):
            what = "is degenerate (zero width or height inside the image)" if box is None else "extends past the image"
            raise DataError(
                f"{path}: annotation id {ann['id']}: bbox {ann['bbox']} {what} "
                f"({image['width']}x{image['height']}, image id {image['id']})"
            )
        n_dropped += box is None
        n_clipped += changed and box is not None
    return boxes, n_clipped, n_dropped


def validate(annotations: str | Path, images: str | Path, strict: bool = False) -> ValidationReport:
    """Check a COCO-format annotation file's structure (no image is opened); raise DataError on the first problem.

    Clipped and degenerate boxes are counted (one warning line on stderr), or are errors when ``strict``.
    Missing ``iscrowd`` and ``area`` keys are filled in (0 and the box area), as COCOeval needs them.
    """
    path, folder = Path(annotations), Path(images)
    data = load_json(path)
    if not folder.is_dir():
        raise DataError(f"{path}: image folder {folder} not found")
    categories = _check_records(path, data, "categories")
    by_id = _check_records(path, data, "images")
    for image in data["images"]:
        _check_image_record(path, image)
    _check_records(path, data, "annotations")
    for ann in data["annotations"]:
        _check_annotation(path, ann, by_id, categories)
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
    boxes, n_clipped, n_dropped = _boxes(path, data, by_id, strict)
    annotated = {ann["image_id"] for ann in data["annotations"]}
    report = ValidationReport(
        path=path,
        n_images=len(by_id),
        n_annotations=len(data["annotations"]),
        n_categories=len(categories),
        n_crowd=sum(1 for ann in data["annotations"] if ann["iscrowd"]),
        n_clipped=n_clipped,
        n_dropped=n_dropped,
        n_images_without_annotations=len(by_id.keys() - annotated),
        dataset=data,
        boxes=boxes,
    )
    if n_clipped or n_dropped:
        print(
            f"warning: {path.name}: {n_clipped} boxes clipped to the image, {n_dropped} degenerate boxes dropped "
            "(use --strict to make these errors)",
            file=sys.stderr,
        )
    return report
