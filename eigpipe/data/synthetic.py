"""Synthetic shapes: a COCO-format detection set (boxes + visible-part instance masks) and a classification split.

Every image is drawn from its own generator ``np.random.default_rng([seed, split_code, ...index])``, so a
dataset is byte-identical for a given seed and config, and growing a split only appends images.

Later objects occlude earlier ones and each instance mask is the visible part. An object that would show
too little of itself, or hide too much of an object beneath it, is redrawn elsewhere rather than painted
unlabelled, so every painted shape has an annotation.
"""

from __future__ import annotations

import copy
import json
import math
import re
import sys
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from eigpipe import config, provenance
from eigpipe.errors import ConfigError
from eigpipe.outputs import Kind, claim_outputs, json_keys, only_files

SHAPES = ("circle", "square", "triangle", "cross")
FILLS = ("solid", "striped")
CLASSES = tuple(f"{shape}_{fill}" for shape in SHAPES for fill in FILLS)
SPLIT_CODES = {"detection/train": 0, "detection/val": 1, "classification/train": 2, "classification/val": 3}

CENTRE_MARGIN = 0.1  # object centres avoid this share of the side at each edge (about 1 object in 4 is cut)
CLASSIFICATION_SIZE_RANGE = (0.35, 0.75)
MIN_VISIBLE_PIXELS = 20
MIN_CONTRAST = 100.0  # RGB distance between an object's colour and the mean colour beneath it
ATTEMPTS_PER_OBJECT = 30
PNG_COMPRESSION = 1  # fast; PNG stays lossless and the bytes deterministic
DATASET_FILES = re.compile(
    r"manifest\.json|detection/instances_(train|val)\.json|detection/(train|val)/\d+\.png"
    r"|classification/(train|val)/[a-z_]+/\d+\.png"
)
DATASET = Kind(
    "a synthetic dataset folder made by eigpipe synth-data",
    lambda path: (
        {"counts", "classes", "seed", "provenance"} <= json_keys(path / "manifest.json")
        and only_files(path, DATASET_FILES)
    ),
    folder=True,
)


def settings(cfg: dict | None) -> dict:
    """The ``data.synthetic`` section with the schema's defaults filled in (a copy)."""
    section_schema = config.schema()["properties"]["data"]["properties"]["synthetic"]
    return config.validate(copy.deepcopy(cfg or {}), "config", subschema=section_schema, prefix="data.synthetic")


# ---- drawing ------------------------------------------------------------------------------------------


@cache
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel row and column coordinates (float32, read-only)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    y.flags.writeable = x.flags.writeable = False
    return y, x


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured float RGB background: smooth low-frequency noise blended with a colour gradient."""
    cells = int(rng.integers(3, 7))
    coarse = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
    smooth = np.array(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
    theta = rng.uniform(0, 2 * math.pi)
    c, s = math.cos(theta), math.sin(theta)
    low, high = (size - 1) * (min(c, 0) + min(s, 0)), (size - 1) * (max(c, 0) + max(s, 0))
    y, x = _grid(size)
    ramp = x * np.float32(c / (high - low)) + y * np.float32(s / (high - low)) - np.float32(low / (high - low))
    start, end = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    weight = np.float32(rng.uniform(0.3, 0.7))
    smooth *= weight
    smooth += (1 - weight) * start + ramp[..., None] * ((1 - weight) * (end - start))
    return smooth


def _rotated(points: np.ndarray, angle: float, cx: float, cy: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    rotation = np.array([[c, -s], [s, c]])
    return [(float(px + cx), float(py + cy)) for px, py in points @ rotation.T]


def shape_mask(kind: str, cx: float, cy: float, size: float, angle: float, canvas: int) -> np.ndarray:
    """Boolean mask of one shape on a ``canvas`` x ``canvas`` grid (coordinates may lie outside it)."""
    image = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(image)
    half = size / 2
    if kind == "circle":
        draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=1)
    elif kind == "square":
        corners = np.array([[-half, -half], [half, -half], [half, half], [-half, half]])
        draw.polygon(_rotated(corners, angle, cx, cy), fill=1)
    elif kind == "triangle":
        radius = size / math.sqrt(3)  # equilateral triangle of side ``size``
        corners = np.array([[radius * math.cos(a), radius * math.sin(a)] for a in np.arange(3) * 2 * math.pi / 3])
        draw.polygon(_rotated(corners, angle, cx, cy), fill=1)
    elif kind == "cross":  # a plus sign: two bars of length ``size``
        bar = size / 6
        for corners in (
            [[-half, -bar], [half, -bar], [half, bar], [-half, bar]],
            [[-bar, -half], [bar, -half], [bar, half], [-bar, half]],
        ):
            draw.polygon(_rotated(np.array(corners), angle, cx, cy), fill=1)
    else:
        raise ConfigError(f"data.synthetic: unknown shape {kind!r} (expected one of {', '.join(SHAPES)})")
    return np.asarray(image, dtype=bool)


def contrasting_colour(rng: np.random.Generator, beneath: np.ndarray) -> np.ndarray:
    """A random RGB colour far from ``beneath`` (the mean colour it will cover)."""
    for _ in range(20):
        colour = rng.integers(0, 256, 3).astype(np.float32)
        if np.linalg.norm(colour - beneath) >= MIN_CONTRAST:
            return colour
    return 255.0 - beneath


def stripes(rng: np.random.Generator, mask: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Colours [N, 3] of the N pixels of ``mask``: parallel stripes of two colours at a random angle."""
    period = max(3.0, rng.uniform(0.06, 0.14) * mask.shape[0])
    theta = rng.uniform(0, math.pi)
    ys, xs = np.nonzero(mask)
    phase = (xs * math.cos(theta) + ys * math.sin(theta)) / period + rng.uniform(0, 1)
    return np.where((phase % 1.0 < 0.5)[:, None], first, second)


def finish(rng: np.random.Generator, canvas: np.ndarray) -> np.ndarray:
    """Add pixel noise and quantise to uint8 RGB."""
    noisy = canvas + np.float32(rng.uniform(3, 12)) * rng.standard_normal(canvas.shape, dtype=np.float32)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, compress_level=PNG_COMPRESSION)


# ---- detection ----------------------------------------------------------------------------------------


def _angle(rng: np.random.Generator, rotate: bool) -> float:
    """A random orientation, or 0 (upright); drawn either way, so both settings consume the same stream."""
    angle = rng.uniform(0, 2 * math.pi)
    return angle if rotate else 0.0


def _candidate(rng: np.random.Generator, kind: str, size: int, cfg: dict) -> tuple[np.ndarray, int]:
    """A random shape drawn on a padded canvas: (its in-image mask, its full area)."""
    low, high = cfg["object_size"]
    pad = int(math.ceil(high * size * math.sqrt(2) / 2)) + 2
    extent = rng.uniform(low, high) * size
    cx, cy = rng.uniform(CENTRE_MARGIN * size, (1 - CENTRE_MARGIN) * size, 2) + pad
    full = shape_mask(kind, cx, cy, extent, _angle(rng, cfg["rotate"]), size + 2 * pad)
    return full[pad : pad + size, pad : pad + size], int(full.sum())


def _place(
    rng: np.random.Generator, owner: np.ndarray, full_areas: list[int], kind: str, cfg: dict
) -> np.ndarray | None:
    """The owner map with one more object on top (its full area appended to ``full_areas``), or None when it,
    or an object it covers, would show less than ``min_visible_share`` of its full area (in the image,
    unoccluded)."""
    mask, full = _candidate(rng, kind, owner.shape[0], cfg)
    min_share = cfg["min_visible_share"]
    if mask.sum() < max(MIN_VISIBLE_PIXELS, min_share * full):
        return None
    trial = owner.copy()
    trial[mask] = len(full_areas)
    visible = np.bincount(trial[trial >= 0].ravel(), minlength=len(full_areas) + 1)
    for index, area in enumerate([*full_areas, full]):
        if visible[index] < max(MIN_VISIBLE_PIXELS, min_share * area):
            return None
    full_areas.append(full)
    return trial


def detection_image(rng: np.random.Generator, cfg: dict) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """One RGB image and its objects as (category index, visible mask), later objects occluding earlier ones."""
    size, categories = cfg["image_size"], cfg["categories"]
    canvas = background(rng, size)
    owner = np.full((size, size), -1, dtype=np.int16)
    kinds: list[int] = []
    full_areas: list[int] = []
    wanted = int(rng.integers(cfg["min_objects"], cfg["max_objects"] + 1))
    for _ in range(ATTEMPTS_PER_OBJECT * wanted):
        if len(kinds) == wanted:
            break
        kind = int(rng.integers(len(categories)))
        trial = _place(rng, owner, full_areas, categories[kind], cfg)
        if trial is None:
            continue
        drawn = trial == len(kinds)
        canvas[drawn] = contrasting_colour(rng, canvas[drawn].mean(axis=0))
        owner = trial
        kinds.append(kind)
    if len(kinds) < cfg["min_objects"]:
        raise ConfigError(f"data.synthetic: cannot place {cfg['min_objects']} visible objects in a {size} px image")
    return finish(rng, canvas), [(kind, owner == index) for index, kind in enumerate(kinds)]


def annotation(mask: np.ndarray, ann_id: int, image_id: int, category_id: int) -> dict[str, Any]:
    """A COCO annotation: RLE of the visible mask, its tight box and pixel count."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    bbox = [float(x0), float(y0), float(xs.max() - x0 + 1), float(ys.max() - y0 + 1)]
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "iscrowd": 0,
        "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode()},
        "area": float(mask.sum()),
        "bbox": bbox,
    }


def detection_split(cfg: dict, seed: int, split: str, count: int, root: Path) -> dict[str, Any]:
    """Write ``count`` images under ``root/detection/<split>`` and return the COCO dict."""
    folder = root / "detection" / split
    folder.mkdir(parents=True)
    size, code = cfg["image_size"], SPLIT_CODES[f"detection/{split}"]
    images, annotations = [], []
    for index in range(count):
        pixels, objects = detection_image(np.random.default_rng([seed, code, index]), cfg)
        name = f"{index:06d}.png"
        save_png(pixels, folder / name)
        images.append({"id": index, "file_name": name, "width": size, "height": size})
        for kind, mask in objects:
            annotations.append(annotation(mask, len(annotations) + 1, index, kind + 1))
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(cfg["categories"])]
    return {
        "info": {"description": f"eigpipe synthetic shapes, detection/{split}", "seed": seed},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


# ---- classification -----------------------------------------------------------------------------------


def classification_image(
    rng: np.random.Generator, shape: str, striped: bool, size: int, rotate: bool = False
) -> np.ndarray:
    """One RGB image of a single shape, solid or striped, on a textured background."""
    canvas = background(rng, size)
    extent = rng.uniform(*CLASSIFICATION_SIZE_RANGE) * size
    cx, cy = rng.uniform(extent / 2, size - extent / 2, 2)
    mask = shape_mask(shape, cx, cy, extent, _angle(rng, rotate), size)
    first = contrasting_colour(rng, canvas[mask].mean(axis=0))
    if striped:
        second = contrasting_colour(rng, first)
        canvas[mask] = stripes(rng, mask, first, second)
    else:
        canvas[mask] = first
    return finish(rng, canvas)


def classification_split(cfg: dict, seed: int, split: str, per_class: int, root: Path) -> None:
    size, code = cfg["classification"]["image_size"], SPLIT_CODES[f"classification/{split}"]
    for class_index, name in enumerate(CLASSES):
        folder = root / "classification" / split / name
        folder.mkdir(parents=True)
        shape, fill = name.split("_")
        for index in range(per_class):
            rng = np.random.default_rng([seed, code, class_index, index])
            pixels = classification_image(rng, shape, fill == "striped", size, cfg["rotate"])
            save_png(pixels, folder / f"{index:05d}.png")


# ---- the whole dataset --------------------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n")


def generate(cfg: dict, out: Path) -> None:
    """Write the synthetic dataset (sections data, seed) to ``out`` atomically: nothing appears there unless
    all of it is written."""
    seed = cfg["seed"]
    cfg = settings(cfg["data"]["synthetic"])
    claim_outputs((out, DATASET))
    counts: dict[str, Any] = {"detection": {}, "classification": {}}
    with provenance.publish(out) as root:
        root.mkdir()
        for split in ("train", "val"):
            coco = detection_split(cfg, seed, split, cfg[f"{split}_images"], root)
            _write_json(root / "detection" / f"instances_{split}.json", coco)
            counts["detection"][split] = {"images": len(coco["images"]), "objects": len(coco["annotations"])}
            print(
                f"synth-data: detection/{split} {len(coco['images'])} images, {len(coco['annotations'])} objects",
                file=sys.stderr,
            )
        for split in ("train", "val"):
            per_class = cfg["classification"][f"{split}_per_class"]
            classification_split(cfg, seed, split, per_class, root)
            counts["classification"][split] = dict.fromkeys(CLASSES, per_class)
            print(
                f"synth-data: classification/{split} {per_class * len(CLASSES)} images, {len(CLASSES)} classes",
                file=sys.stderr,
            )
        manifest = {
            "counts": counts,
            "categories": cfg["categories"],
            "classes": list(CLASSES),
            "seed": seed,
            "cfg": cfg,
            "provenance": provenance.record(config=cfg, seed=seed),
        }
        _write_json(root / "manifest.json", manifest)
