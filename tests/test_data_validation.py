"""COCO-format validation (one-line errors naming file and record), segmentations, image-file checks, imperfect boxes,
and the detection Dataset (which opens no image until an item is read)."""

import copy
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from eigpipe import cli
from eigpipe.data import annotations, checks, coco
from eigpipe.errors import DataError

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def rle_of(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode()}


BLOCK = np.zeros((10, 20), dtype=np.uint8)
BLOCK[2:8, 10:16] = 1  # tight box [10, 2, 6, 6]

VALID = {
    "images": [
        {"id": 1, "file_name": "000001.png", "width": 20, "height": 10},
        {"id": 2, "file_name": "000002.png", "width": 16, "height": 16},
        {"id": 3, "file_name": "000003.png", "width": 12, "height": 8},  # no annotations
    ],
    "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],  # ids need not be contiguous
    "annotations": [
        {
            "id": 1,
            "image_id": 1,
            "category_id": 3,
            "bbox": [2, 1, 4, 5],
            "area": 20,
            "iscrowd": 0,
            "segmentation": [[2, 1, 6, 1, 6, 6, 2, 6]],
        },
        {
            "id": 2,
            "image_id": 1,
            "category_id": 7,
            "bbox": [10, 2, 6, 6],
            "area": 36,
            "iscrowd": 0,
            "segmentation": rle_of(BLOCK),
        },
        {
            "id": 3,
            "image_id": 1,
            "category_id": 7,
            "bbox": [0, 0, 20, 10],
            "area": 200,
            "iscrowd": 1,
            "segmentation": rle_of(np.ones((10, 20))),
        },
        {
            "id": 4,
            "image_id": 2,
            "category_id": 3,
            "bbox": [4, 4, 8, 8],
            "area": 64,
            "iscrowd": 0,
            "segmentation": [[4, 4, 12, 4, 12, 12, 4, 12]],
        },
    ],
}


@dataclass
class Dataset:
    ann: Path
    images: Path
    data: dict

    def write(self) -> None:
        self.ann.write_text(json.dumps(self.data))


@pytest.fixture
def ds(tmp_path: Path) -> Dataset:
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (20, 10), (200, 30, 0)).save(images / "000001.png")
    Image.new("L", (16, 16), 128).save(images / "000002.png")  # grayscale
    Image.new("RGBA", (12, 8), (0, 0, 255, 128)).save(images / "000003.png")
    dataset = Dataset(tmp_path / "instances.json", images, copy.deepcopy(VALID))
    dataset.write()
    return dataset


def check(ds: Dataset, *extra: str) -> int:
    return cli.main(["check-data", "--annotations", str(ds.ann), "--images", str(ds.images), *extra])


def edit(change):  # noqa: ANN001, ANN201
    """A case that changes the parsed JSON, then writes it."""

    def apply(ds: Dataset) -> None:
        change(ds.data)
        ds.write()

    return apply


def raw(content: bytes):  # noqa: ANN201
    return lambda ds: ds.ann.write_bytes(content)


def replace_dir(ds: Dataset) -> None:
    ds.ann.unlink()
    ds.ann.mkdir()


def dup_image(data: dict) -> None:
    data["images"].append({**data["images"][0], "file_name": "000002.png"})


def set_key(kind: str, index: int, key: str, value: object):  # noqa: ANN201
    return edit(lambda data: data[kind][index].__setitem__(key, value))


def drop_key(kind: str, index: int, key: str):  # noqa: ANN201
    return edit(lambda data: data[kind][index].pop(key))


BAD = [
    ("missing file", lambda ds: ds.ann.unlink(), ["annotation file not found"]),
    ("unreadable", replace_dir, ["cannot be read"]),
    ("empty", raw(b""), ["empty"]),
    ("blank", raw(b" \n"), ["empty"]),
    ("not json", raw(b'{"images": ['), ["not valid JSON", "line 1"]),
    ("not utf-8", raw(b'{"images": "\xff\xfe"}'), ["not valid JSON"]),
    ("top level list", raw(b"[]"), ["top level", "list"]),
    ("no images", edit(lambda d: d.pop("images")), ["'images'", "missing"]),
    ("no annotations", edit(lambda d: d.pop("annotations")), ["'annotations'", "missing"]),
    ("no categories", edit(lambda d: d.pop("categories")), ["'categories'", "missing"]),
    ("annotations not a list", edit(lambda d: d.__setitem__("annotations", {})), ["'annotations'", "not a list"]),
    ("image without id", drop_key("images", 1, "id"), ["images[1]", "'id'"]),
    ("image without file_name", drop_key("images", 1, "file_name"), ["image id 2", "'file_name'"]),
    ("image without width", drop_key("images", 1, "width"), ["image id 2", "'width'"]),
    ("image without height", drop_key("images", 1, "height"), ["image id 2", "'height'"]),
    ("image of zero width", set_key("images", 1, "width", 0), ["image id 2 (000002.png)", "width 0"]),
    ("annotation without id", drop_key("annotations", 0, "id"), ["annotations[0]", "'id'"]),
    ("annotation without image_id", drop_key("annotations", 1, "image_id"), ["annotation id 2", "'image_id'"]),
    ("annotation without category_id", drop_key("annotations", 1, "category_id"), ["annotation id 2", "'category_id'"]),
    ("annotation without bbox", drop_key("annotations", 1, "bbox"), ["annotation id 2", "'bbox'"]),
    ("bbox of 3 numbers", set_key("annotations", 3, "bbox", [1, 2, 3]), ["annotation id 4", "bbox [1, 2, 3]"]),
    ("bbox a string", set_key("annotations", 3, "bbox", "1 2 3 4"), ["annotation id 4", "bbox '1 2 3 4'"]),
    ("bbox with NaN", set_key("annotations", 3, "bbox", [1, 2, float("nan"), 4]), ["annotation id 4", "finite"]),
    ("bbox with a string", set_key("annotations", 3, "bbox", [1, 2, "3", 4]), ["annotation id 4", "bbox"]),
    ("bbox negative width", set_key("annotations", 3, "bbox", [1, 2, -3, 4]), ["annotation id 4", "negative"]),
    ("bbox negative height", set_key("annotations", 3, "bbox", [1, 2, 3, -0.5]), ["annotation id 4", "negative"]),
    ("unknown category", set_key("annotations", 1, "category_id", 5), ["annotation id 2", "category_id 5"]),
    # a negative area makes COCOeval's AP -1 (no ground truth of any size): refused as bad data
    ("negative area", set_key("annotations", 0, "area", -5.0), ["annotation id 1", "area -5.0", ">= 0"]),
    ("slightly negative area", set_key("annotations", 3, "area", -0.5), ["annotation id 4", "area -0.5"]),
    ("area a string", set_key("annotations", 2, "area", "big"), ["annotation id 3", "area 'big'"]),
    ("area NaN", set_key("annotations", 1, "area", float("nan")), ["annotation id 2", "area nan"]),
    ("area infinite", set_key("annotations", 1, "area", float("inf")), ["annotation id 2", "area inf"]),
    ("duplicate image id", edit(dup_image), ["duplicate image id 1", "images[3]"]),
    ("duplicate annotation id", set_key("annotations", 2, "id", 2), ["duplicate annotation id 2", "annotations[2]"]),
    ("annotation of no image", set_key("annotations", 0, "image_id", 99), ["annotation id 1", "image_id 99"]),
    ("image file missing", lambda ds: (ds.images / "000002.png").unlink(), ["image id 2 (000002.png)", "not found"]),
    (
        "image file unreadable",
        lambda ds: (ds.images / "000003.png").write_bytes(b"\x89PNG garbage"),
        ["image id 3 (000003.png)", "cannot be read as an image"],
    ),
    (
        "image size differs",
        lambda ds: Image.new("RGB", (21, 10)).save(ds.images / "000001.png"),
        ["image id 1 (000001.png)", "21x10", "20x10"],
    ),
    ("image folder missing", lambda ds: shutil.rmtree(ds.images), ["image folder", "not found"]),
]


@pytest.mark.parametrize(("name", "damage", "fragments"), BAD, ids=[case[0] for case in BAD])
def test_bad_input_is_one_line_naming_file_and_record(ds, capsys, name, damage, fragments):
    damage(ds)
    assert check(ds) == 1
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert out == "" and len(lines) == 1, err
    assert lines[0].startswith(f"eigpipe check-data: error: {ds.ann}: ")
    assert all(fragment in lines[0] for fragment in fragments), lines[0]
    assert "Traceback" not in err


def test_valid_dataset_prints_the_summary(ds, capsys):
    assert check(ds, "--strict") == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out == (
        "instances.json: 3 images, 4 annotations, 2 categories (0 boxes clipped, 0 dropped, 1 crowd, "
        "1 images without annotations)\n"
    )


def imperfect(data: dict) -> None:
    data["annotations"][1]["bbox"] = [15, 5, 10, 10]  # past the right and bottom edges of the 20x10 image
    data["annotations"][3]["bbox"] = [4, 4, 0, 8]  # zero width
    data["annotations"].append({"id": 5, "image_id": 2, "category_id": 7, "bbox": [16, 0, 5, 5]})  # outside


def test_imperfect_boxes_warn_once_or_fail_when_strict(ds, capsys):
    edit(imperfect)(ds)
    assert check(ds) == 0
    out, err = capsys.readouterr()
    assert err == (
        "warning: instances.json: 1 boxes clipped to the image, 2 degenerate boxes dropped "
        "(use --strict to make these errors)\n"
    )
    assert "(1 boxes clipped, 2 dropped, 1 crowd, 1 images without annotations)" in out
    assert check(ds, "--strict") == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "annotation id 2" in err and "past the image" in err


def test_training_targets_clip_and_drop_imperfect_boxes(ds, capsys):
    edit(imperfect)(ds)
    train = coco.CocoDetection(ds.ann, ds.images, train=True)
    assert train.ids == [1]  # image 2 keeps no usable box
    _, target = train[0]
    assert target["boxes"].tolist() == [[2, 1, 6, 6], [15, 5, 20, 10]]
    assert len(capsys.readouterr().err.splitlines()) == 1
    with pytest.raises(DataError, match="annotation id 2"):
        coco.CocoDetection(ds.ann, ds.images, train=True, strict=True)


def test_labels_images_and_eval_targets(ds):
    data = coco.CocoDetection(ds.ann, ds.images, train=False, masks=True)
    assert data.category_ids == [3, 7] and data.label_of == {3: 1, 7: 2}
    assert data.categories == ["cat", "dog"] and data.num_classes == 3
    assert data.ids == [1, 2, 3] and len(data) == 3
    shapes = [tuple(data[i][0].shape) for i in range(3)]
    assert shapes == [(3, 10, 20), (3, 16, 16), (3, 8, 12)]  # grayscale and RGBA become RGB
    image, target = data[0]
    assert image.dtype == torch.float32 and image.min() >= 0 and image.max() <= 1
    assert image[:, 0, 0].tolist() == pytest.approx([200 / 255, 30 / 255, 0])
    assert target["image_id"] == 1 and target["labels"].tolist() == [1, 2, 2]
    assert target["iscrowd"].tolist() == [0, 0, 1] and target["area"].tolist() == [20, 36, 200]
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (3, 10, 20)
    np.testing.assert_array_equal(target["masks"][1].numpy(), BLOCK)
    _, empty = data[2]  # the image without annotations stays for evaluation
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,) and empty["masks"].shape == (0, 8, 12)


def test_training_skips_crowd_and_images_without_annotations(ds):
    train = coco.CocoDetection(ds.ann, ds.images, train=True, masks=True)
    assert train.ids == [1, 2]
    _, target = train[0]
    assert target["labels"].tolist() == [1, 2] and target["iscrowd"].tolist() == [0, 0]
    assert target["masks"].shape == (2, 10, 20)
    ds.data["annotations"][3]["iscrowd"] = 1  # image 2's only annotation
    ds.write()
    assert coco.CocoDetection(ds.ann, ds.images, train=True).ids == [1]
    assert annotations.validate(ds.ann, ds.images).n_crowd == 2


def test_missing_iscrowd_and_area_are_filled_for_cocoeval(ds):
    for ann in ds.data["annotations"]:
        ann.pop("area"), ann.pop("iscrowd"), ann.pop("segmentation")
    ds.write()
    report = annotations.validate(ds.ann, ds.images)
    assert [a["iscrowd"] for a in report.dataset["annotations"]] == [0, 0, 0, 0]
    assert [a["area"] for a in report.dataset["annotations"]] == [20, 36, 200, 64]
    assert report.coco.getAnnIds(imgIds=[1]) == [1, 2, 3]


def test_hflip_maps_boxes_and_masks(ds):
    data = coco.CocoDetection(ds.ann, ds.images, train=True, masks=True)
    image, target = data[0]
    before = {k: v.clone() if torch.is_tensor(v) else v for k, v in target.items()}
    flipped_image, flipped = coco.hflip(image, target)
    assert flipped["boxes"][1].tolist() == [4, 2, 10, 8]  # [10, 2, 16, 8] in a 20 px wide image
    ys, xs = np.nonzero(flipped["masks"][1].numpy())
    assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == [4, 2, 10, 8]
    assert torch.equal(flipped_image[:, :, 0], image[:, :, -1])
    assert flipped["labels"].tolist() == [1, 2] and flipped["image_id"] == 1
    back_image, back = coco.hflip(flipped_image, flipped)
    assert torch.equal(back_image, image) and torch.equal(back["boxes"], target["boxes"])
    assert torch.equal(back["masks"], target["masks"])
    assert all(torch.equal(target[k], before[k]) for k in ("boxes", "masks"))  # the input is untouched


def test_collate_keeps_lists(ds):
    data = coco.CocoDetection(ds.ann, ds.images, train=False)
    images, targets = coco.collate([data[0], data[1]])
    assert [tuple(i.shape) for i in images] == [(3, 10, 20), (3, 16, 16)]
    assert [t["image_id"] for t in targets] == [1, 2]


# ---- segmentations: structural, so a malformed one fails before training, not inside pycocotools -------------


def runs_of(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts: run lengths in column-major order, starting with a run of zeros."""
    flat = mask.ravel(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.r_[0, edges, flat.size]).tolist()
    return [0, *runs] if flat[0] else runs


COMPRESSED = rle_of(BLOCK)["counts"]
BAD_SEGMENTATIONS = [  # (case, annotation index, segmentation, fragments)
    ("polygon of an odd count", 0, [[2, 1, 6, 1, 6, 6, 2]], ["polygon 0 has 7 numbers"]),
    ("polygon of 4 numbers", 0, [[2, 1, 6, 1]], ["polygon 0 has 4 numbers"]),  # pycocotools reads it as a box
    ("empty polygon", 3, [[4, 4, 12, 4, 12, 12], []], ["polygon 1 has 0 numbers"]),
    ("polygon with a string", 0, [[2, 1, "6", 1, 6, 6]], ["polygon 0", "not a list of finite numbers"]),
    ("polygon with null", 0, [[2, 1, None, 1, 6, 6]], ["polygon 0", "not a list of finite numbers"]),
    ("polygon with NaN", 0, [[2, 1, float("nan"), 1, 6, 6]], ["polygon 0", "finite"]),
    ("polygon with infinity", 3, [[4, 4, 12, 4, float("inf"), 12]], ["polygon 0", "finite"]),
    ("polygon of points", 0, [[[2, 1], [6, 1], [6, 6]]], ["polygon 0", "finite"]),
    ("flat polygon", 0, [2, 1, 6, 1, 6, 6], ["polygon 0", "2 is not a list of numbers"]),
    ("segmentation a string", 0, "2 1 6 1 6 6", ["neither polygons"]),
    ("RLE of another size", 1, {"size": [10, 21], "counts": COMPRESSED}, ["RLE size [10, 21]", "[10, 20]"]),
    ("RLE transposed", 1, {"size": [20, 10], "counts": COMPRESSED}, ["RLE size [20, 10]", "[10, 20]"]),
    ("RLE size of one number", 1, {"size": [200], "counts": COMPRESSED}, ["RLE size [200]"]),
    ("crowd RLE of another size", 2, rle_of(np.ones((11, 20))), ["RLE size [11, 20]"]),
    ("RLE without size", 1, {"counts": COMPRESSED}, ["has no 'size' and 'counts'"]),
    ("compressed counts cut short", 1, {"size": [10, 20], "counts": COMPRESSED[:-1]}, ["RLE counts"]),
    ("compressed counts of other characters", 1, {"size": [10, 20], "counts": "zz~"}, ["cannot be decoded"]),
    ("compressed counts unterminated", 1, {"size": [10, 20], "counts": "a"}, ["cannot be decoded"]),
    ("uncompressed counts short", 1, {"size": [10, 20], "counts": [100]}, ["cover 100 pixels", "200"]),
    ("uncompressed counts long", 1, {"size": [10, 20], "counts": [100, 101]}, ["cover 201 pixels"]),
    ("uncompressed negative run", 1, {"size": [10, 20], "counts": [-1, 201]}, ["cannot be decoded"]),
    ("uncompressed fractional runs", 1, {"size": [10, 20], "counts": [100.5, 99.5]}, ["cannot be decoded"]),
    ("uncompressed string run", 1, {"size": [10, 20], "counts": ["200"]}, ["cannot be decoded"]),
    ("counts a number", 1, {"size": [10, 20], "counts": 200}, ["neither a list of run lengths"]),
]


@pytest.mark.parametrize(
    ("name", "index", "segmentation", "fragments"), BAD_SEGMENTATIONS, ids=[case[0] for case in BAD_SEGMENTATIONS]
)
def test_malformed_segmentation_is_one_line_naming_annotation_and_image(ds, name, index, segmentation, fragments):
    ann = ds.data["annotations"][index]
    ann["segmentation"] = segmentation
    ds.write()
    image = next(im for im in ds.data["images"] if im["id"] == ann["image_id"])
    for attempt in (
        lambda: annotations.validate(ds.ann, ds.images),
        lambda: coco.CocoDetection(ds.ann, ds.images, train=True, masks=True),
    ):
        with pytest.raises(DataError) as info:
            attempt()
        message = str(info.value)
        assert "\n" not in message
        assert message.startswith(
            f"{ds.ann}: annotation id {ann['id']} (image id {image['id']}, {image['file_name']}): segmentation"
        ), message
        assert all(fragment in message for fragment in fragments), message


@pytest.mark.parametrize("shape", [(1, 1), (10, 20), (37, 23)])
def test_every_rle_pycocotools_writes_passes_and_decodes_and_a_cut_one_fails(tmp_path, shape):
    rng = np.random.default_rng(shape[0])
    masks = [np.zeros(shape), np.ones(shape), rng.random(shape) < 0.5, rng.random(shape) < 0.05]
    anns = []
    for k, mask in enumerate(masks):
        compressed, uncompressed = rle_of(mask), {"size": list(shape), "counts": runs_of(mask)}
        for j, rle in enumerate((compressed, uncompressed)):
            anns.append(
                {
                    "id": 2 * k + j + 1,
                    "image_id": 1,
                    "category_id": 1,
                    "bbox": [0, 0, 1, 1],
                    "segmentation": rle,
                    "iscrowd": 1,
                }
            )
    anns.append(
        {
            "id": 99,
            "image_id": 1,
            "category_id": 1,
            "bbox": [0, 0, 1, 1],
            "iscrowd": 0,
            "segmentation": [[0.5, 0.5, 0.9, 0.5, 0.9, 0.9], [0, 0, 1, 0, 1, 1, 0, 1]],
        }
    )
    data = {
        "images": [{"id": 1, "file_name": "a.png", "width": shape[1], "height": shape[0]}],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": anns,
    }
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps(data))
    report = annotations.validate(ann_file, tmp_path)
    for k, mask in enumerate(masks):
        for j in (0, 1):
            np.testing.assert_array_equal(report.coco.annToMask(report.coco.anns[2 * k + j + 1]), mask)
    for ann in anns[:-1]:  # one run short: pycocotools would decode it into uninitialised memory
        rle = ann["segmentation"]
        ann["segmentation"] = {**rle, "counts": rle["counts"][:-1]}
        ann_file.write_text(json.dumps(data))
        with pytest.raises(DataError, match=f"annotation id {ann['id']} .*segmentation RLE counts"):
            annotations.validate(ann_file, tmp_path)
        ann["segmentation"] = rle


def test_mask_targets_need_a_segmentation(ds):
    for ann in ds.data["annotations"]:
        ann.pop("segmentation")
    ds.data["annotations"][3]["segmentation"] = []
    ds.write()
    assert coco.CocoDetection(ds.ann, ds.images, train=True).ids == [1, 2]  # boxes alone train a box detector
    with pytest.raises(DataError, match=r"instances.json: annotation id 1 \(image id 1\): no segmentation"):
        coco.CocoDetection(ds.ann, ds.images, train=True, masks=True)


# ---- construction opens no image; check_data decodes every one the way the loader does ------------------------


def test_construction_opens_no_image(ds, monkeypatch):
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("an image was opened")

    monkeypatch.setattr(Image, "open", refuse)
    for train in (True, False):
        assert len(coco.CocoDetection(ds.ann, ds.images, train=train, masks=True)) == (2 if train else 3)
    monkeypatch.undo()
    for file in ds.images.iterdir():
        file.unlink()
    data = coco.CocoDetection(ds.ann, ds.images, train=False)
    assert data.ids == [1, 2, 3]
    with pytest.raises(coco.ImageError, match=r"image id 1 \(000001.png\): .*000001.png not found"):
        data[0]


def noisy(width: int, height: int, mode: str = "RGB") -> Image.Image:
    """Incompressible content, so that a cut file ends inside the pixel data."""
    pixels = np.random.default_rng(width * height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def replace_first(
    image: Image.Image, name: str = "000001.png", cut: float = 1.0, drop: int = 0, zero: int = 0, **save: object
) -> Callable[[Dataset], None]:
    """Image id 1 (20x10) becomes ``image`` saved as ``name``, then cut to a share of its bytes, or its last
    ``drop`` bytes dropped, or ``zero`` bytes in its middle zeroed."""

    def damage(ds: Dataset) -> None:
        (ds.images / "000001.png").unlink()
        ds.data["images"][0]["file_name"] = name
        ds.write()
        file = ds.images / name
        image.save(file, **save)
        raw = bytearray(file.read_bytes())
        middle = len(raw) // 2
        raw[middle : middle + zero] = bytes(len(raw[middle : middle + zero]))
        file.write_bytes(bytes(raw[: int(len(raw) * cut) - drop]))

    return damage


def first_file(ds: Dataset) -> Path:
    return ds.images / ds.data["images"][0]["file_name"]


BAD_FILES = [  # image id 1 is recorded as 20x10
    ("PNG cut to half", replace_first(noisy(20, 10), cut=0.5), ["cannot be read as an image", "truncated"]),
    ("PNG cut to 90%", replace_first(noisy(20, 10), cut=0.9), ["cannot be read as an image", "truncated"]),
    ("PNG zeroed mid-stream", replace_first(noisy(20, 10), zero=16), ["cannot be read as an image"]),
    ("grayscale PNG cut to half", replace_first(noisy(20, 10, "L"), cut=0.5), ["truncated"]),
    ("JPEG cut to half", replace_first(noisy(20, 10), "000001.jpg", cut=0.5), ["image id 1 (000001.jpg)", "truncated"]),
    ("JPEG without its last 2 bytes", replace_first(noisy(20, 10), "000001.jpg", drop=2), ["truncated"]),
    ("progressive JPEG cut", replace_first(noisy(20, 10), "000001.jpg", cut=0.6, progressive=True), ["truncated"]),
    ("zero-byte file", lambda ds: first_file(ds).write_bytes(b""), ["cannot be read as an image"]),
    ("not an image", lambda ds: first_file(ds).write_bytes(b"\x89PNG garbage"), ["cannot be read as an image"]),
    ("missing file", lambda ds: first_file(ds).unlink(), ["000001.png not found"]),
    ("a folder", lambda ds: (first_file(ds).unlink(), first_file(ds).mkdir()), ["cannot be read as an image"]),
    ("wider than recorded", replace_first(noisy(21, 10)), ["is 21x10 but the record says 20x10"]),
    ("transposed", replace_first(noisy(10, 20), "000001.jpg"), ["is 10x20 but the record says 20x10"]),
    ("32-bit integer TIFF", replace_first(Image.new("I", (20, 10), 70000), "000001.tif"), ["image mode 'I'"]),
    ("float TIFF", replace_first(Image.new("F", (20, 10), 0.5), "000001.tif"), ["image mode 'F'"]),
    ("Lab TIFF", replace_first(Image.new("LAB", (20, 10)), "000001.tif"), ["image mode 'LAB'"]),
]


@pytest.mark.parametrize(("name", "damage", "fragments"), BAD_FILES, ids=[case[0] for case in BAD_FILES])
def test_bad_image_file_fails_the_check_and_the_job_in_one_line(ds, capsys, name, damage, fragments):
    damage(ds)
    data = coco.CocoDetection(ds.ann, ds.images, train=False)  # structure only: construction still succeeds
    with pytest.raises(DataError) as info:
        checks.check_data({}, ds.ann, ds.images)
    message = str(info.value)
    record = ds.data["images"][0]
    assert "\n" not in message and message.startswith(f"{ds.ann}: image id 1 ({record['file_name']}): "), message
    assert all(fragment.lower() in message.lower() for fragment in fragments), message
    assert capsys.readouterr().out == ""  # no summary for a failed check
    with pytest.raises(coco.ImageError) as during_job:
        data[0]
    assert str(during_job.value) == message  # the job names the same file and reason as the check


def pixels16(*values: int) -> np.ndarray:
    return np.resize(np.array(values, dtype=np.uint16), (16, 16))


def palette_with_transparency() -> Image.Image:
    image = Image.fromarray(np.resize(np.arange(3, dtype=np.uint8), (16, 16)), mode="P")
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    image.info["transparency"] = 0
    return image


GRAY16 = pixels16(0, 128, 129, 32896, 65278, 65535)  # 8 bit: round(v / 257)
FAITHFUL = [  # (case, image id 2 as saved (16x16), extension, expected 8-bit RGB)
    ("16-bit grayscale PNG", Image.fromarray(GRAY16), "png", np.resize([0, 0, 1, 128, 254, 255], (16, 16))),
    (
        "16-bit big-endian TIFF",
        Image.fromarray(GRAY16.astype(">u2")),
        "tif",
        np.resize([0, 0, 1, 128, 254, 255], (16, 16)),
    ),
    ("bilevel PNG", Image.fromarray(np.resize([True, False], (16, 16))), "png", np.resize([255, 0], (16, 16))),
    (
        "grayscale with alpha",
        Image.merge("LA", [Image.new("L", (16, 16), 77), Image.new("L", (16, 16), 0)]),
        "png",
        np.full((16, 16), 77),
    ),
    ("palette with transparency", palette_with_transparency(), "png", None),
]


@pytest.mark.parametrize(("name", "image", "suffix", "expected"), FAITHFUL, ids=[case[0] for case in FAITHFUL])
def test_odd_modes_pass_and_load_faithfully(ds, capsys, name, image, suffix, expected):
    (ds.images / "000002.png").unlink()
    ds.data["images"][1]["file_name"] = f"000002.{suffix}"
    ds.write()
    image.save(ds.images / f"000002.{suffix}")
    checks.check_data({}, ds.ann, ds.images)
    assert capsys.readouterr().out.startswith("instances.json: 3 images")
    loaded = coco.CocoDetection(ds.ann, ds.images, train=False)[1][0]
    rgb = (loaded * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    if expected is None:  # palette: each index's colour, transparency ignored as the alpha of RGBA is
        expected_rgb = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=np.uint8)[np.asarray(image)]
    else:
        expected_rgb = np.repeat(np.asarray(expected, dtype=np.uint8)[..., None], 3, axis=2)
    np.testing.assert_array_equal(rgb, expected_rgb)


def test_check_prints_the_summary_and_returns_the_report(ds, capsys):
    report = checks.check_data({}, ds.ann, ds.images, strict=True)
    assert capsys.readouterr().out == report.summary() + "\n"
    assert (report.n_images, report.n_annotations, report.n_crowd) == (3, 4, 1)


@pytest.mark.parametrize("jobs", [0, -2, 1.5, "2", True])
def test_jobs_must_be_a_positive_integer(ds, jobs):
    with pytest.raises(DataError, match="jobs: must be a positive integer"):
        checks.check_data({}, ds.ann, ds.images, jobs=jobs)


def test_parallel_check_gives_the_serial_result(ds, capsys, monkeypatch):
    monkeypatch.setattr(checks, "CHUNK", 1)  # one image per task: three tasks, so two workers share them
    serial = checks.check_data({}, ds.ann, ds.images, jobs=1)
    parallel = checks.check_data({}, ds.ann, ds.images, jobs=2)
    assert parallel.summary() == serial.summary() and parallel.boxes == serial.boxes
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0] == out[1]
    (ds.images / "000002.png").write_bytes(b"")
    Image.new("RGB", (13, 8)).save(ds.images / "000003.png")
    errors = []
    for jobs in (1, 2, 3):
        with pytest.raises(DataError) as info:
            checks.check_data({}, ds.ann, ds.images, jobs=jobs)
        errors.append(str(info.value))
    assert errors[0] == errors[1] == errors[2] and "image id 2 (000002.png)" in errors[0]  # the first in file order


def test_a_decode_failure_in_a_dataloader_worker_is_one_line(ds):
    data = coco.CocoDetection(ds.ann, ds.images, train=False)
    file = ds.images / "000002.png"
    noisy(16, 16).save(file)
    file.write_bytes(file.read_bytes()[:300])
    loader = torch.utils.data.DataLoader(data, batch_size=1, num_workers=1, collate_fn=coco.collate)
    with pytest.raises(DataError) as info:
        list(loader)
    assert str(info.value) == (
        f"{ds.ann}: image id 2 (000002.png): {file} cannot be read as an image (OSError: image file is truncated)"
    )


def crash(folder: Path, images: list) -> None:
    os._exit(1)  # a decoder that takes its worker down (a segfault, the out-of-memory killer)


def test_a_worker_that_dies_is_one_line(ds, monkeypatch):
    monkeypatch.setattr(checks, "CHUNK", 2)
    monkeypatch.setattr(checks, "_problems", crash)  # forked workers inherit the patch
    with pytest.raises(DataError) as info:
        checks.check_data({}, ds.ann, ds.images, jobs=2)
    assert str(info.value) == (
        f"{ds.ann}: image id 1 (000001.png): a decoding worker died reading this image or one of the next 1"
    )
