"""The published checkpoints eigpipe imports by name: architecture, preprocessing, classes and published AP.

A file holds no config (detectron2's ``.pkl``) or one eigpipe does not parse (mmdetection's ``meta``), and the
configs of one family differ where it matters (detectron2's GN configs in PIXEL_STD, mmdetection's in channel
order), so each preset states what its upstream config says. Every value was read in the file named beside it:

- torchvision: ``torchvision/models/detection/faster_rcnn.py`` and ``mask_rcnn.py`` (the ``*_resnet50_fpn`` and
  ``_v2`` builders: FrozenBatchNorm with ``overwrite_eps(model, 0.0)`` for the first COCO weights, BatchNorm in the
  v2 body, FPN and heads, ``RPNHead(conv_depth=2)``, ``FastRCNNConvFCHead`` 4conv1fc); ``transform.py`` (ImageNet
  mean and std on RGB in [0, 1]); published AP: each weights enum's ``meta["_metrics"]``.
- detectron2: ``configs/Base-RCNN-FPN.yaml``, ``configs/Misc/{,scratch_}mask_rcnn_R_50_FPN_{3x,9x}_gn.yaml``,
  ``detectron2/config/defaults.py`` (``INPUT.FORMAT: BGR``, ``PIXEL_MEAN``, ``PIXEL_STD``, ``ROIAlignV2``,
  ``POOLER_SAMPLING_RATIO: 0``), ``layers/batch_norm.py`` (``GN``: ``GroupNorm(32, C)``); published AP:
  ``MODEL_ZOO.md``.
- mmdetection: ``configs/scratch/*_r50_fpn_gn-all_scratch_6x_coco.py`` (RGB, mean 123.675 116.28 103.53, std
  58.395 57.12 57.375 from ``configs/_base_/models/faster-rcnn_r50_fpn.py``), ``configs/gn/mask_rcnn_r50_fpn_gn-all_
  {2x,3x}_coco.py`` (BGR, mean 103.530 116.280 123.675, std 1), RoIAlign ``sampling_ratio=0`` with mmcv's default
  ``aligned=True``; published AP: ``configs/scratch/metafile.yml``, ``configs/gn/metafile.yml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FAMILIES = ("torchvision", "detectron2", "mmdet")


@dataclass(frozen=True)
class Preprocessing:
    """What the upstream model's first conv expects: images in ``channel_order`` with values in [0, value_range],
    minus ``mean``, divided by ``std`` (both in that channel order and range)."""

    channel_order: str  # "RGB" | "BGR"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    value_range: float
    source: str

    def rgb_unit(self) -> tuple[list[float], list[float]]:
        """The same normalisation for RGB images in [0, 1]: eigpipe's transform mean and std."""
        order = (2, 1, 0) if self.channel_order == "BGR" else (0, 1, 2)
        return (
            [self.mean[i] / self.value_range for i in order],
            [self.std[i] / self.value_range for i in order],
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "channel_order": self.channel_order,
            "mean": list(self.mean),
            "std": list(self.std),
            "value_range": self.value_range,
            "source": self.source,
        }


@dataclass(frozen=True)
class Preset:
    name: str  # "<family>/<upstream config name>"
    model_name: str  # faster_rcnn | mask_rcnn | classifier
    init: str  # how the upstream training started: pretrained | scratch
    schedule: str
    preprocessing: Preprocessing
    model: dict[str, Any]  # model-section keys; the schema fills the rest
    classes: int  # outputs of the file's classifier (background included for detectors)
    config: str  # the upstream config file
    published: dict[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.name.partition("/")[0]


TORCHVISION_INPUT = Preprocessing(
    "RGB", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1.0, "torchvision/models/detection/faster_rcnn.py"
)
DETECTRON2_INPUT = Preprocessing(
    "BGR", (103.530, 116.280, 123.675), (1.0, 1.0, 1.0), 255.0, "detectron2/config/defaults.py"
)
DETECTRON2_INPUT_STD = Preprocessing(
    "BGR",
    (103.530, 116.280, 123.675),
    (57.375, 57.12, 58.395),
    255.0,
    "detectron2 configs/Misc/scratch_mask_rcnn_R_50_FPN_9x_gn.yaml",
)
MMDET_SCRATCH_INPUT = Preprocessing(
    "RGB", (123.675, 116.28, 103.53), (58.395, 57.12, 57.375), 255.0, "mmdetection configs/_base_/models"
)
MMDET_GN_INPUT = Preprocessing(
    "BGR",
    (103.530, 116.280, 123.675),
    (1.0, 1.0, 1.0),
    255.0,
    "mmdetection configs/gn/mask_rcnn_r50_fpn_gn-all_2x_coco.py",
)

TORCHVISION_V1 = {
    "norm": "frozen_bn",
    "norm_eps": 0.0,
    "head_norm": "none",
    "box_head": {"type": "mlp", "representation_size": 1024},
    "mask_head_layers": [256, 256, 256, 256],
    "rpn_conv_depth": 1,
    "roi_align": {"aligned": False, "sampling_ratio": 2},
}
TORCHVISION_V2 = {
    **TORCHVISION_V1,
    "norm": "bn",
    "norm_eps": 1e-5,
    "head_norm": "bn",
    "box_head": {"type": "convfc", "representation_size": 1024, "conv_layers": [256, 256, 256, 256]},
    "rpn_conv_depth": 2,
}
# GN (32 groups) in body, FPN, 4conv1fc box head and mask head; RoIAlign aligned, adaptive sampling
GN_ALL = {
    "norm": "gn",
    "gn_groups": 32,
    "head_norm": "gn",
    "box_head": {"type": "convfc", "representation_size": 1024, "conv_layers": [256, 256, 256, 256]},
    "mask_head_layers": [256, 256, 256, 256],
    "rpn_conv_depth": 1,
    "roi_align": {"aligned": True, "sampling_ratio": 0},
}
DETECTRON2_GN = {**GN_ALL, "rpn_post_nms_top_n_train": 1000}  # Base-RCNN-FPN.yaml POST_NMS_TOPK_TRAIN


def _torchvision(name: str, model: dict, bbox: float, segm: float | None = None) -> Preset:
    model_name = "mask_rcnn" if name.startswith("maskrcnn") else "faster_rcnn"
    published = {"bbox_AP": bbox, "source": f"torchvision {model_name} weights enum meta['_metrics']"}
    if segm is not None:
        published["segm_AP"] = segm
    builder = "mask_rcnn.py" if model_name == "mask_rcnn" else "faster_rcnn.py"
    # v1: references/detection/README.md (26 epochs, ImageNet backbone, the builder's default weights_backbone);
    # v2: the weights meta names only the pull request of its recipe
    init, schedule = ("unknown", "recipe of the weights meta") if "v2" in name else ("pretrained", "26 epochs")
    return Preset(
        f"torchvision/{name}",
        model_name,
        init,
        schedule,
        TORCHVISION_INPUT,
        model,
        91,
        f"torchvision/models/detection/{builder}",
        published,
    )


def _detectron2(name: str, init: str, schedule: str, preprocessing: Preprocessing, bbox: float, segm: float) -> Preset:
    return Preset(
        f"detectron2/{name}",
        "mask_rcnn",
        init,
        schedule,
        preprocessing,
        DETECTRON2_GN,
        81,
        f"detectron2 configs/Misc/{name}.yaml",
        {"bbox_AP": bbox, "segm_AP": segm, "source": "detectron2 MODEL_ZOO.md"},
    )


def _mmdet(
    name: str, init: str, schedule: str, preprocessing: Preprocessing, bbox: float, segm: float | None
) -> Preset:
    folder = "scratch" if "scratch" in name else "gn"
    published = {"bbox_AP": bbox, "source": f"mmdetection configs/{folder}/metafile.yml"}
    if segm is not None:
        published["segm_AP"] = segm
    model_name = "mask_rcnn" if name.startswith("mask") else "faster_rcnn"
    return Preset(
        f"mmdet/{name}",
        model_name,
        init,
        schedule,
        preprocessing,
        GN_ALL,
        81,
        f"mmdetection configs/{folder}/{name}.py",
        published,
    )


CLASSIFIER = Preset(
    "detectron2/R-50-GN",
    "classifier",
    "imagenet",
    "ImageNet",
    DETECTRON2_INPUT,
    {"norm": "gn", "gn_groups": 32},
    1000,
    "detectron2 MODEL_ZOO.md (ImageNetPretrained/47261647/R-50-GN.pkl); key names: checkpoint/c2_model_loading.py",
)

PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        _torchvision("fasterrcnn_resnet50_fpn", TORCHVISION_V1, 37.0),
        _torchvision("fasterrcnn_resnet50_fpn_v2", TORCHVISION_V2, 46.7),
        _torchvision("maskrcnn_resnet50_fpn", TORCHVISION_V1, 37.9, 34.6),
        _torchvision("maskrcnn_resnet50_fpn_v2", TORCHVISION_V2, 47.4, 41.8),
        _detectron2("mask_rcnn_R_50_FPN_3x_gn", "pretrained", "3x", DETECTRON2_INPUT, 42.6, 38.6),
        _detectron2("scratch_mask_rcnn_R_50_FPN_3x_gn", "scratch", "3x", DETECTRON2_INPUT, 39.9, 36.6),
        _detectron2("scratch_mask_rcnn_R_50_FPN_9x_gn", "scratch", "9x", DETECTRON2_INPUT_STD, 43.7, 39.6),
        _mmdet("faster_rcnn_r50_fpn_gn-all_scratch_6x_coco", "scratch", "6x", MMDET_SCRATCH_INPUT, 40.7, None),
        _mmdet("mask_rcnn_r50_fpn_gn-all_scratch_6x_coco", "scratch", "6x", MMDET_SCRATCH_INPUT, 41.2, 37.4),
        _mmdet("mask_rcnn_r50_fpn_gn-all_2x_coco", "pretrained", "2x", MMDET_GN_INPUT, 40.2, 36.4),
        _mmdet("mask_rcnn_r50_fpn_gn-all_3x_coco", "pretrained", "3x", MMDET_GN_INPUT, 40.5, 36.7),
        CLASSIFIER,
    )
}

# What `--from FAMILY` assumes where the file cannot say (its model-zoo configs agree on these)
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "torchvision": {"roi_align": {"aligned": False, "sampling_ratio": 2}, "value_range": 1.0},
    "detectron2": {"roi_align": {"aligned": True, "sampling_ratio": 0}, "gn_groups": 32, "value_range": 255.0},
    "mmdet": {"roi_align": {"aligned": True, "sampling_ratio": 0}, "gn_groups": 32, "value_range": 255.0},
}


def find(name: str) -> Preset:
    from eigpipe.errors import EigpipeError

    if name not in PRESETS:
        raise EigpipeError(f"--preset {name}: unknown preset (known: {', '.join(PRESETS)})")
    return PRESETS[name]
