"""mmdetection checkpoints: ``torch.save({"state_dict": ..., "meta": ...})``.

Module names were read in ``mmdet/models/backbones/resnet.py`` (``conv1``, ``layer1``..``layer4``, each norm
named by mmcv's ``build_norm_layer``: ``gn1``/``bn1`` in the stem, ``gn1``..``gn3`` in a ``Bottleneck``,
``downsample.0``/``.1`` in ``utils/res_layer.py``), ``necks/fpn.py`` (``lateral_convs.<i>``, ``fpn_convs.<i>``,
each a ``ConvModule``: ``conv`` and ``gn``, mmcv/cnn/bricks/conv_module.py), ``dense_heads/rpn_head.py``
(``rpn_conv``, ``rpn_cls`` with sigmoid scores, ``rpn_reg``), ``roi_heads/bbox_heads/convfc_bbox_head.py``
(``shared_convs.<i>``, ``shared_fcs.<i>``, ``fc_cls`` with K + 1 outputs, background last, ``fc_reg`` with 4 K)
and ``roi_heads/mask_heads/fcn_mask_head.py`` (``convs.<i>``, ``upsample``, ``conv_logits`` with K outputs).
Checkpoints of early 2020 keep the box and mask heads at the top level; later ones under ``roi_head.``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from eigpipe.models.published.mapping import Mapped, rename, rule, torch_file

BODY = "backbone.body"
HEAD = r"(?:roi_head\.)?"
NORM = r"(?:gn|bn)"
RULES = (
    rule(r"backbone\.conv1\.weight", f"{BODY}.conv1.weight"),
    rule(rf"backbone\.{NORM}1\.(\w+)", rf"{BODY}.bn1.\1"),
    rule(r"backbone\.layer(\d)\.(\d+)\.conv(\d)\.weight", rf"{BODY}.layer\1.\2.conv\3.weight"),
    rule(rf"backbone\.layer(\d)\.(\d+)\.{NORM}(\d)\.(\w+)", rf"{BODY}.layer\1.\2.bn\3.\4"),
    rule(r"backbone\.layer(\d)\.(\d+)\.downsample\.([01])\.(\w+)", rf"{BODY}.layer\1.\2.downsample.\3.\4"),
    rule(r"neck\.lateral_convs\.(\d)\.conv\.(weight|bias)", r"backbone.fpn.inner_blocks.\1.0.\2"),
    rule(rf"neck\.lateral_convs\.(\d)\.{NORM}\.(\w+)", r"backbone.fpn.inner_blocks.\1.1.\2"),
    rule(r"neck\.fpn_convs\.(\d)\.conv\.(weight|bias)", r"backbone.fpn.layer_blocks.\1.0.\2"),
    rule(rf"neck\.fpn_convs\.(\d)\.{NORM}\.(\w+)", r"backbone.fpn.layer_blocks.\1.1.\2"),
    rule(r"rpn_head\.rpn_conv\.(weight|bias)", r"rpn.head.conv.0.0.\1"),
    rule(r"rpn_head\.rpn_cls\.(weight|bias)", r"rpn.head.cls_logits.\1"),
    rule(r"rpn_head\.rpn_reg\.(weight|bias)", r"rpn.head.bbox_pred.\1"),
    rule(rf"{HEAD}bbox_head\.shared_convs\.(\d+)\.conv\.(weight|bias)", r"roi_heads.box_head.\1.0.\2"),
    rule(rf"{HEAD}bbox_head\.shared_convs\.(\d+)\.{NORM}\.(\w+)", r"roi_heads.box_head.\1.1.\2"),
    rule(
        rf"{HEAD}bbox_head\.shared_fcs\.(\d+)\.(weight|bias)",
        lambda m: f"roi_heads.box_head.upstream_fc{int(m[1]) + 1}.{m[2]}",
    ),
    rule(rf"{HEAD}bbox_head\.fc_cls\.(weight|bias)", r"roi_heads.box_predictor.cls_score.\1"),
    rule(rf"{HEAD}bbox_head\.fc_reg\.(weight|bias)", r"roi_heads.box_predictor.bbox_pred.\1"),
    rule(rf"{HEAD}mask_head\.convs\.(\d+)\.conv\.(weight|bias)", r"roi_heads.mask_head.\1.0.\2"),
    rule(rf"{HEAD}mask_head\.convs\.(\d+)\.{NORM}\.(\w+)", r"roi_heads.mask_head.\1.1.\2"),
    rule(rf"{HEAD}mask_head\.upsample\.(weight|bias)", r"roi_heads.mask_predictor.conv5_mask.\1"),
    rule(rf"{HEAD}mask_head\.conv_logits\.(weight|bias)", r"roi_heads.mask_predictor.mask_fcn_logits.\1"),
)
DROPPED = (r".*\.num_batches_tracked",)
BACKGROUND_LAST = True


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, meta) of an mmdetection checkpoint."""
    state, raw = torch_file(path, "an mmdetection checkpoint", "state_dict")
    return state, raw["meta"] if isinstance(raw.get("meta"), dict) else {}


def to_eigpipe(state: dict[str, torch.Tensor], path: Path) -> Mapped:
    return rename(state, RULES, DROPPED, path, "mmdetection")
