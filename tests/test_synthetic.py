"""Synthetic shapes dataset: determinism, exact boxes of visible masks, layout, atomic publication."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from eigpipe import cli
from eigpipe.data import annotations, coco, synthetic
from eigpipe.errors import ConfigError

# pycocotools' decode trips a numpy 2 deprecation inside pycocotools itself
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SMALL = {
    "image_size": 128,
    "train_images": 12,
    "val_images": 6,
    "min_objects": 2,
    "max_objects": 4,
    "categories": ["square", "cross", "circle"],
    "classification": {"image_size": 32, "train_per_class": 3, "val_per_class": 2},
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    synthetic.generate({"data": {"source": "synthetic", "synthetic": SMALL}, "seed": 7}, out=out)
    return out


def load(root: Path, split: str) -> dict:
    return json.loads((root / "detection" / f"instances_{split}.json").read_text())


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def tight_box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def test_same_seed_gives_identical_bytes_and_another_seed_differs(dataset, tmp_path):
    synthetic.generate({"data": {"source": "synthetic", "synthetic": SMALL}, "seed": 7}, out=tmp_path / "again")
    synthetic.generate({"data": {"source": "synthetic", "synthetic": SMALL}, "seed": 8}, out=tmp_path / "other")
    first, again, other = files(dataset), files(tmp_path / "again"), files(tmp_path / "other")
    assert len(first) == 2 + 12 + 6 + 8 * (3 + 2) + 1
    assert first == again
    assert first.keys() == other.keys()
    assert first["detection/instances_train.json"] != other["detection/instances_train.json"]
    assert first["detection/train/000000.png"] != other["detection/train/000000.png"]


def test_splits_are_disjoint_and_every_image_follows_the_seed(dataset, tmp_path):
    """Each split draws from its own generators: no image repeats within or across the four splits, and another
    seed changes every image (validation and classification included)."""
    images = {name: data for name, data in files(dataset).items() if name.endswith(".png")}
    assert len(set(images.values())) == len(images) == 12 + 6 + 8 * (3 + 2)
    train, val = load(dataset, "train"), load(dataset, "val")
    boxes = {json.dumps(a["bbox"]) for a in train["annotations"]}
    assert not boxes & {json.dumps(a["bbox"]) for a in val["annotations"]}
    synthetic.generate({"data": {"source": "synthetic", "synthetic": SMALL}, "seed": 8}, out=tmp_path / "other")
    other = files(tmp_path / "other")
    assert all(other[name] != data for name, data in images.items())


def test_boxes_and_areas_are_those_of_the_visible_masks(dataset):
    for split in ("train", "val"):
        data = load(dataset, split)
        by_image: dict[int, list[np.ndarray]] = {}
        for ann in data["annotations"]:
            mask = mask_utils.decode(ann["segmentation"])
            assert mask.shape == (128, 128) and ann["segmentation"]["size"] == [128, 128]
            assert ann["bbox"] == tight_box(mask)
            assert ann["area"] == mask.sum() >= synthetic.MIN_VISIBLE_PIXELS
            assert ann["iscrowd"] == 0 and all(isinstance(v, float) for v in ann["bbox"])
            by_image.setdefault(ann["image_id"], []).append(mask)
        for masks in by_image.values():
            assert np.sum(masks, axis=0).max() == 1  # visible parts never overlap: occluded pixels go to the top


def test_images_counts_and_categories(dataset):
    for split, count in (("train", 12), ("val", 6)):
        data = load(dataset, split)
        assert [c["name"] for c in data["categories"]] == SMALL["categories"]
        assert [c["id"] for c in data["categories"]] == [1, 2, 3]
        assert {c["supercategory"] for c in data["categories"]} == {"shape"}
        assert [im["id"] for im in data["images"]] == list(range(count))
        assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])
        per_image = {im["id"]: 0 for im in data["images"]}
        for ann in data["annotations"]:
            per_image[ann["image_id"]] += 1
        assert all(2 <= n <= 4 for n in per_image.values()), per_image
        for image in data["images"]:
            with Image.open(dataset / "detection" / split / image["file_name"]) as opened:
                assert opened.mode == "RGB" and opened.size == (image["width"], image["height"]) == (128, 128)


def test_objects_touch_the_border_and_overlap(dataset):
    data = load(dataset, "train")
    boxes: dict[int, list[list[float]]] = {}
    for ann in data["annotations"]:
        boxes.setdefault(ann["image_id"], []).append(ann["bbox"])
    on_border = sum(x == 0 or y == 0 or x + w == 128 or y + h == 128 for x, y, w, h in sum(boxes.values(), []))

    def overlap(a: list[float], b: list[float]) -> bool:
        return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]

    overlapping = sum(overlap(a, b) for image in boxes.values() for i, a in enumerate(image) for b in image[i + 1 :])
    assert on_border >= 2 and overlapping >= 2
    sides = [max(w, h) / 128 for image in boxes.values() for _, _, w, h in image]
    assert min(sides) < 0.25 and max(sides) > 0.3


def test_classification_folder(dataset):
    from torchvision import datasets

    for split, per_class in (("train", 3), ("val", 2)):
        root = dataset / "classification" / split
        assert sorted(p.name for p in root.iterdir()) == sorted(synthetic.CLASSES)
        assert all(len(list((root / name).glob("*.png"))) == per_class for name in synthetic.CLASSES)
        folder = datasets.ImageFolder(root)
        assert len(folder) == 8 * per_class and folder.classes == sorted(synthetic.CLASSES)
        image, _ = folder[0]
        assert image.size == (32, 32) and image.mode == "RGB"
    assert {"circle_solid", "circle_striped", "cross_striped"} <= set(synthetic.CLASSES)


def test_manifest(dataset):
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["seed"] == 7 and manifest["categories"] == SMALL["categories"]
    assert manifest["counts"]["detection"]["train"]["images"] == 12
    assert manifest["counts"]["detection"]["val"]["objects"] == len(load(dataset, "val")["annotations"])
    assert manifest["counts"]["classification"]["val"] == dict.fromkeys(synthetic.CLASSES, 2)
    assert manifest["cfg"] == synthetic.settings(SMALL) and manifest["provenance"]["seed"] == 7


def test_generated_data_passes_validation_and_loads(dataset, capsys):
    split = dataset / "detection"
    report = annotations.validate(split / "instances_val.json", split / "val", strict=True)
    assert (report.n_images, report.n_clipped, report.n_dropped, report.n_crowd) == (6, 0, 0, 0)
    data = coco.CocoDetection(split / "instances_train.json", split / "train", train=True, masks=True)
    image, target = data[3]
    ann = data.coco.imgToAnns[data.ids[3]]
    assert image.shape == (3, 128, 128) and len(data) == 12 and data.categories == SMALL["categories"]
    np.testing.assert_array_equal(
        target["masks"].numpy(), np.stack([mask_utils.decode(a["segmentation"]) for a in ann])
    )
    assert capsys.readouterr().err == ""


def test_defaults_come_from_the_schema():
    filled = synthetic.settings({"train_images": 3})
    assert filled["train_images"] == 3 and filled["val_images"] == 200 and filled["max_objects"] == 5
    assert filled["classification"] == {"image_size": 64, "train_per_class": 500, "val_per_class": 100}
    with pytest.raises(ConfigError, match="min_objects"):
        synthetic.settings({"min_objects": 4, "max_objects": 2})


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def broken(*args: object) -> None:
        calls.append(args)
        if len(calls) == 5:
            raise RuntimeError("disk full")
        return original(*args)

    original = synthetic.classification_image
    monkeypatch.setattr(synthetic, "classification_image", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        synthetic.generate({"data": {"source": "synthetic", "synthetic": SMALL}, "seed": 7}, out=tmp_path / "data")
    assert len(calls) == 5 and list(tmp_path.iterdir()) == []


def test_cli_writes_the_dataset_and_reports_progress(tmp_path, capsys):
    section = {**SMALL, "train_images": 2, "val_images": 1, "min_objects": 1, "max_objects": 1}
    given = json.dumps({"data": {"source": "synthetic", "synthetic": section}, "seed": 3})
    assert cli.main(["synth-data", "--config-json", given, "--out", str(tmp_path / "data")]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "synth-data: detection/train 2 images, 2 objects"
    assert lines[3] == "synth-data: classification/val 16 images, 8 classes"
    assert len(load(tmp_path / "data", "val")["annotations"]) == 1


def test_min_visible_share_bounds_occlusion(monkeypatch: pytest.MonkeyPatch) -> None:
    """An object may hide at most (1 - min_visible_share) of any object beneath it."""
    under = np.zeros((64, 64), dtype=bool)
    under[10:30, 10:30] = True  # 400 px
    over = np.zeros((64, 64), dtype=bool)
    over[10:30, 10:22] = True  # hides 240 px of it: 40 % stays visible
    rng = np.random.default_rng(0)

    def place(share: float) -> np.ndarray | None:
        masks = iter([(under, 400), (over, 240)])
        monkeypatch.setattr(synthetic, "_candidate", lambda *args: next(masks))
        owner, areas = np.full((64, 64), -1, dtype=np.int16), []
        owner = synthetic._place(rng, owner, areas, "square", {"min_visible_share": share})
        return synthetic._place(rng, owner, areas, "square", {"min_visible_share": share})

    assert place(0.6) is None
    assert place(0.3) is not None
    with pytest.raises(ConfigError, match="min_visible_share"):
        synthetic.settings({**SMALL, "min_visible_share": 1.5})


WHOLE_SINGLE = {
    **SMALL,
    "categories": ["square", "circle", "cross"],
    "min_objects": 1,
    "max_objects": 1,
    "min_visible_share": 1.0,
}


def _whole_objects(section: dict, seed: int = 0) -> list[tuple[int, np.ndarray]]:
    """(category index, mask) of 20 single-object images whose objects are whole and unoccluded."""
    rng = np.random.default_rng(seed)
    return [obj for _ in range(20) for obj in synthetic.detection_image(rng, synthetic.settings(section))[1]]


def test_shapes_are_upright_unless_rotate_is_set() -> None:
    def square_fill(section: dict) -> list[float]:  # visible area / box area of each square
        return [m.sum() / np.prod(tight_box(m)[2:]) for kind, m in _whole_objects(section) if kind == 0]

    assert synthetic.settings({})["rotate"] is False
    assert set(square_fill(WHOLE_SINGLE)) == {1.0}  # an axis-aligned square fills its box
    assert min(square_fill({**WHOLE_SINGLE, "rotate": True})) < 0.9


def test_object_sizes_follow_the_configured_range() -> None:
    sides = [max(tight_box(m)[2:]) for _, m in _whole_objects({**WHOLE_SINGLE, "object_size": [0.3, 0.35]}, 1)]
    assert min(sides) >= 0.3 * 128 - 2 and max(sides) <= 0.35 * 128 + 2
    with pytest.raises(ConfigError, match="object_size"):
        synthetic.settings({**SMALL, "object_size": [0.5, 0.2]})
