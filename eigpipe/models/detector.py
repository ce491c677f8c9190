"""torchvision Faster R-CNN / Mask R-CNN with FPN on a configurable-width ResNet body."""

from __future__ import annotations

from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from eigpipe.models.poolers import AlignedMultiScaleRoIAlign
from eigpipe.models.resnet import ResNet, box_head_norm_for, freeze_for_trainable_layers, head_norm_for, norm_factory
from eigpipe.models.widths import WidthSpec, from_model_config

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
DETECTORS = ("faster_rcnn", "mask_rcnn")
FPN_LEVELS = ["0", "1", "2", "3"]  # the RoI heads pool from P2..P5, as torchvision's defaults do


def build_body(model_cfg: dict, widths: WidthSpec | None = None) -> ResNet:
    widths = widths or from_model_config(model_cfg)
    norm = norm_factory(model_cfg["norm"], model_cfg["gn_groups"], model_cfg["norm_eps"])
    return ResNet(widths, norm, model_cfg["zero_init_residual"])


def build_backbone(model_cfg: dict, widths: WidthSpec | None = None) -> BackboneWithFPN:
    body = build_body(model_cfg, widths)
    freeze_for_trainable_layers(body, model_cfg["trainable_layers"])
    backbone = BackboneWithFPN(
        body,
        return_layers={f"layer{i + 1}": str(i) for i in range(4)},
        in_channels_list=body.widths.stage_outs,
        out_channels=model_cfg["fpn_channels"],
        extra_blocks=LastLevelMaxPool(),
        norm_layer=head_norm_for(model_cfg),
    )
    return backbone


def build_transform(model_cfg: dict) -> GeneralizedRCNNTransform:
    return GeneralizedRCNNTransform(
        model_cfg["min_size"], model_cfg["max_size"], model_cfg["image_mean"], model_cfg["image_std"]
    )


def _pooler(align: dict, size: int) -> MultiScaleRoIAlign:
    pooler = AlignedMultiScaleRoIAlign if align["aligned"] else MultiScaleRoIAlign
    return pooler(FPN_LEVELS, size, align["sampling_ratio"])


def _box_head(model_cfg: dict, channels: int) -> nn.Module:
    head = model_cfg["box_head"]
    size = head["representation_size"]
    if head["type"] == "convfc":
        norm_layer = box_head_norm_for(model_cfg)
        return FastRCNNConvFCHead((channels, 7, 7), head["conv_layers"], [size], norm_layer=norm_layer)
    return TwoMLPHead(channels * 7 * 7, size)


def build_detector(model_name: str, model_cfg: dict, num_classes: int, widths: WidthSpec | None = None) -> nn.Module:
    """``num_classes`` includes the background class.

    Heads are built in torchvision's order (box head and predictor, mask head and predictor, then the RPN
    head), so a seed gives the same initial weights as when torchvision built the RPN head itself.
    """
    if model_name not in DETECTORS:
        raise ValueError(f"unknown detector {model_name!r}; expected one of {DETECTORS}")
    backbone = build_backbone(model_cfg, widths)
    channels = backbone.out_channels
    sizes = model_cfg["anchor_sizes"]
    ratios = tuple(model_cfg["aspect_ratios"])
    align = model_cfg["roi_align"]
    heads: dict = {
        "box_roi_pool": _pooler(align, 7),
        "box_head": _box_head(model_cfg, channels),
        "box_predictor": FastRCNNPredictor(model_cfg["box_head"]["representation_size"], num_classes),
    }
    if model_name == "mask_rcnn":
        layers = model_cfg["mask_head_layers"]
        heads["mask_roi_pool"] = _pooler(align, 14)
        heads["mask_head"] = MaskRCNNHeads(channels, layers, 1, norm_layer=head_norm_for(model_cfg))
        heads["mask_predictor"] = MaskRCNNPredictor(layers[-1], layers[-1], num_classes)
    heads["rpn_head"] = RPNHead(channels, len(ratios), conv_depth=model_cfg["rpn_conv_depth"])
    detector = MaskRCNN if model_name == "mask_rcnn" else FasterRCNN
    return detector(
        backbone,
        num_classes=None,
        min_size=model_cfg["min_size"],
        max_size=model_cfg["max_size"],
        image_mean=model_cfg["image_mean"],
        image_std=model_cfg["image_std"],
        rpn_anchor_generator=AnchorGenerator(tuple((s,) for s in sizes), (ratios,) * len(sizes)),
        rpn_pre_nms_top_n_train=model_cfg["rpn_pre_nms_top_n_train"],
        rpn_post_nms_top_n_train=model_cfg["rpn_post_nms_top_n_train"],
        rpn_pre_nms_top_n_test=model_cfg["rpn_pre_nms_top_n_test"],
        rpn_post_nms_top_n_test=model_cfg["rpn_post_nms_top_n_test"],
        box_batch_size_per_image=model_cfg["box_batch_size_per_image"],
        box_detections_per_img=model_cfg["box_detections_per_img"],
        box_score_thresh=model_cfg["box_score_thresh"],
        **heads,
    )
