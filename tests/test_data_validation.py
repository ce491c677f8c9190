"""COCO-format validation (one-line errors naming file and record), imperfect boxes, and the detection Dataset."""

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from eigpipe import cli
from eigpipe.data import coco
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
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [2, 1, 4, 5], "area": 20, "iscrowd": 0,
         "segmentation": [[2, 1, 6, 1, 6, 6, 2, 6]]},
        {"id": 2, "image_id": 1, "category_id": 7, "bbox": [10, 2, 6, 6], "area": 36, "iscrowd": 0,
         "segmentation": rle_of(BLOCK)},
        {"id": 3, "image_id": 1, "category_id": 7, "bbox": [0, 0, 20, 10], "area": 200, "iscrowd": 1,
         "segmentation": rle_of(np.ones((10, 20)))},
        {"id": 4, "image_id": 2, "category_id": 3, "bbox": [4, 4, 8, 8], "area": 64, "iscrowd": 0,
         "segmentation": [[4, 4, 12, 4, 12, 12, 4, 12]]},
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
    ("annotation without category_id", drop_key("annotations", 1, "category_id"),
     ["annotation id 2", "'category_id'"]),
    ("annotation without bbox", drop_key("annotations", 1, "bbox"), ["annotation id 2", "'bbox'"]),
    ("bbox of 3 numbers", set_key("annotations", 3, "bbox", [1, 2, 3]), ["annotation id 4", "bbox [1, 2, 3]"]),
    ("bbox a string", set_key("annotations", 3, "bbox", "1 2 3 4"), ["annotation id 4", "bbox '1 2 3 4'"]),
    ("bbox with NaN", set_key("annotations", 3, "bbox", [1, 2, float("nan"), 4]), ["annotation id 4", "finite"]),
    ("bbox with a string", set_key("annotations", 3, "bbox", [1, 2, "3", 4]), ["annotation id 4", "bbox"]),
    ("bbox negative width", set_key("annotations", 3, "bbox", [1, 2, -3, 4]), ["annotation id 4", "negative"]),
    ("bbox negative height", set_key("annotations", 3, "bbox", [1, 2, 3, -0.5]), ["annotation id 4", "negative"]),
    ("unknown category", set_key("annotations", 1, "category_id", 5), ["annotation id 2", "category_id 5"]),
    ("duplicate image id", edit(dup_image), ["duplicate image id 1", "images[3]"]),
    ("duplicate annotation id", set_key("annotations", 2, "id", 2), ["duplicate annotation id 2", "annotations[2]"]),
    ("annotation of no image", set_key("annotations", 0, "image_id", 99), ["annotation id 1", "image_id 99"]),
    ("image file missing", lambda ds: (ds.images / "000002.png").unlink(), ["image id 2 (000002.png)", "not found"]),
    ("image file unreadable", lambda ds: (ds.images / "000003.png").write_bytes(b"\x89PNG garbage"),
     ["image id 3 (000003.png)", "cannot be read as an image"]),
    ("image size differs", set_key("images", 0, "width", 21), ["image id 1 (000001.png)", "20x10", "21x10"]),
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
    assert out == ("instances.json: 3 images, 4 annotations, 2 categories (0 boxes clipped, 0 dropped, 1 crowd, "
                   "1 images without annotations)\n")


def imperfect(data: dict) -> None:
    data["annotations"][1]["bbox"] = [15, 5, 10, 10]  # past the right and bottom edges of the 20x10 image
    data["annotations"][3]["bbox"] = [4, 4, 0, 8]  # zero width
    data["annotations"].append({"id": 5, "image_id": 2, "category_id": 7, "bbox": [16, 0, 5, 5]})  # outside


def test_imperfect_boxes_warn_once_or_fail_when_strict(ds, capsys):
    edit(imperfect)(ds)
    assert check(ds) == 0
    out, err = capsys.readouterr()
    assert err == ("warning: instances.json: 1 boxes clipped to the image, 2 degenerate boxes dropped "
                   "(use --strict to make these errors)\n")
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
    assert coco.validate(ds.ann, ds.images).n_crowd == 2


def test_missing_iscrowd_and_area_are_filled_for_cocoeval(ds):
    for ann in ds.data["annotations"]:
        ann.pop("area"), ann.pop("iscrowd"), ann.pop("segmentation")
    ds.write()
    report = coco.validate(ds.ann, ds.images)
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
