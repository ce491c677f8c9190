"""The COCO-format Dataset: images decoded faithfully to 8-bit RGB and torchvision detection targets, read from
annotations validated by ``eigpipe.data.annotations`` (no image is opened to validate)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.functional import to_tensor

from eigpipe.data.annotations import validate
from eigpipe.errors import DataError

EIGHT_BIT = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"}  # convert("RGB") is faithful
SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}  # full scale 65535 (PNG, TIFF): scaled to 8 bit here


def read_image(file: Path, width: int, height: int) -> Image.Image:
    """The image at ``file`` decoded fully as 8-bit RGB (``read_rgb``), checked to have the recorded size."""
    image = read_rgb(file)
    if image.size != (width, height):
        raise DataError(f"{file} is {image.size[0]}x{image.size[1]} but the record says {width}x{height}")
    return image


def read_rgb(file: Path) -> Image.Image:
    """The image at ``file`` decoded fully as 8-bit RGB; a DataError starting with the file.

    16-bit grayscale is scaled to 8 bit (PIL's own conversion clips it to white); modes with no defined 8-bit
    scale (32-bit integer "I", float "F") or no faithful RGB conversion are refused, naming the mode. A file too
    large for PIL's decompression-bomb limit is refused like any other file PIL cannot read.
    """
    try:
        with Image.open(file) as opened:
            opened.load()  # decode every byte now: a truncated file fails here, not half-way through a job
            mode = opened.mode
            if mode in SIXTEEN_BIT:
                pixels = (np.asarray(opened, dtype=np.uint32) + 128) // 257  # round(v * 255 / 65535)
                image = Image.fromarray(pixels.astype(np.uint8), mode="L").convert("RGB")
            elif mode in EIGHT_BIT:
                image = opened.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{file} not found") from None
    except Exception as exc:  # PIL's plugins raise OSError, SyntaxError, ValueError, EOFError, struct.error ...
        raise DataError(f"{file} cannot be read as an image ({type(exc).__name__}: {exc})") from None
    if mode not in SIXTEEN_BIT | EIGHT_BIT:
        raise DataError(
            f"{file} has image mode {mode!r}, which the loader cannot convert to 8-bit RGB faithfully "
            "(convert it to 8-bit RGB or grayscale first)"
        )
    return image


class ImageError(DataError):
    """An image that fails to load during a job; its one line survives a DataLoader worker's re-raise."""

    def __init__(self, message: str) -> None:
        if "\n" in message:  # torch re-raises a worker's error as type(error)("Caught ...\n<traceback>")
            message = message.rstrip().rsplit("\n", 1)[-1].partition(f"{type(self).__name__}: ")[2] or message
        super().__init__(message)


class CocoDetection(torch.utils.data.Dataset):
    """Images and torchvision detection targets of a validated COCO-format dataset.

    ``train=True`` keeps only images with at least one usable (non-crowd, non-degenerate) annotation and
    only those annotations in the targets; ``train=False`` keeps every image and every non-degenerate
    annotation (crowd ones flagged by ``iscrowd``). Construction opens no image: ``eigpipe check-data`` checks
    the files, and an image that fails to load during a job raises a one-line ``ImageError``.
    """

    def __init__(
        self, annotations: str | Path, images: str | Path, train: bool, strict: bool = False, masks: bool = False
    ) -> None:
        self.report = validate(annotations, images, strict=strict)
        self.folder = Path(images)
        self.train, self.masks = train, masks
        self.coco = self.report.coco
        self.category_ids = sorted(self.coco.cats)
        self.label_of = {cat_id: label for label, cat_id in enumerate(self.category_ids, start=1)}
        self.categories = [self.coco.cats[cat_id]["name"] for cat_id in self.category_ids]
        self.num_classes = len(self.category_ids) + 1
        ids = sorted(self.coco.imgs)
        self.ids = [i for i in ids if self._annotations(i)] if train else ids
        if masks:
            self._check_masks()

    def __len__(self) -> int:
        return len(self.ids)

    def _annotations(self, image_id: int) -> list[dict]:
        keep = [ann for ann in self.coco.imgToAnns[image_id] if self.report.boxes[ann["id"]] is not None]
        return [ann for ann in keep if not ann["iscrowd"]] if self.train else keep

    def _check_masks(self) -> None:
        for image_id in self.ids:
            for ann in self._annotations(image_id):
                if not ann.get("segmentation"):
                    raise DataError(
                        f"{self.report.path}: annotation id {ann['id']} (image id {image_id}): "
                        "no segmentation, which mask targets need"
                    )

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image_id = self.ids[index]
        record = self.coco.imgs[image_id]
        try:
            image = to_tensor(read_image(self.folder / record["file_name"], record["width"], record["height"]))
        except DataError as exc:
            raise ImageError(f"{self.report.path}: image id {image_id} ({record['file_name']}): {exc}") from None
        anns = self._annotations(image_id)
        target: dict[str, Any] = {
            "boxes": torch.tensor([self.report.boxes[ann["id"]] for ann in anns], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([self.label_of[ann["category_id"]] for ann in anns], dtype=torch.int64),
            "image_id": image_id,
            "area": torch.tensor([ann["area"] for ann in anns], dtype=torch.float32),
            "iscrowd": torch.tensor([ann["iscrowd"] for ann in anns], dtype=torch.int64),
        }
        if self.masks:
            target["masks"] = self._masks(anns, record)
        return image, target

    def _masks(self, anns: list[dict], record: dict) -> torch.Tensor:
        height, width = int(record["height"]), int(record["width"])
        if not anns:
            return torch.zeros((0, height, width), dtype=torch.uint8)
        return torch.from_numpy(np.stack([self.coco.annToMask(ann) for ann in anns]).astype(np.uint8))


def hflip(image: torch.Tensor, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Mirror an image [C, H, W] and its target (xyxy boxes, masks) left-right; the inputs are not modified."""
    width = image.shape[-1]
    flipped = dict(target)
    if "boxes" in target:
        boxes = target["boxes"]
        flipped["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
    if "masks" in target:
        flipped["masks"] = target["masks"].flip(-1)
    return image.flip(-1), flipped


def collate(batch: list[tuple[Any, Any]]) -> tuple:
    """Batches of detection samples stay lists of (image, target), as torchvision's references collate them."""
    return tuple(zip(*batch, strict=True))
