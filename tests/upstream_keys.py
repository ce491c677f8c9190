"""Every tensor of the published files, as the upstream sources name and shape it, and where it lands in
torchvision's detector (what the import must do). Written from the upstream sources, not from eigpipe's importers:

- detectron2 (facebookresearch/detectron2): modeling/backbone/resnet.py (``BasicStem.conv1``; stages ``res2``..
  ``res5`` of ``BottleneckBlock`` with ``conv1``..``conv3`` and ``shortcut`` in the first block, each a ``Conv2d``
  with its norm as ``.norm`` and no bias under a norm; ResNet-50 depths 3, 4, 6, 3, bottleneck 64..512, out
  256..2048), modeling/backbone/fpn.py (``fpn_lateral<s>`` 1x1, ``fpn_output<s>`` 3x3, bias only without a norm),
  modeling/proposal_generator/rpn.py (``StandardRPNHead``: ``conv`` 3x3 with bias, ``objectness_logits`` A,
  ``anchor_deltas`` 4 A, A = 3 aspect ratios), modeling/roi_heads/box_head.py (``FastRCNNConvFCHead``: ``conv1``..
  ``conv4``, ``fc1`` from 256 * 7 * 7), fast_rcnn.py (``cls_score`` K + 1, background last; ``bbox_pred`` 4 K),
  mask_head.py (``mask_fcn1``..``4``, ``deconv`` 2x2 ConvTranspose, ``predictor`` K); the pickle layout in
  checkpoint/detection_checkpoint.py.
- Detectron's R-50-GN.pkl: detectron2 checkpoint/c2_model_loading.py (``conv1_w``, ``conv1_gn_s``/``_b``,
  ``res<s>_<j>_branch2{a,b,c}_w``, ``_gn_s``/``_gn_b``, ``branch1`` the shortcut, ``pred_w``/``pred_b``).
- mmdetection (open-mmlab/mmdetection): models/backbones/resnet.py (``conv1``, ``gn1`` by mmcv's
  build_norm_layer, ``layer<i>.<j>.conv<k>``/``gn<k>``), models/utils/res_layer.py (``downsample.0``/``.1``),
  necks/fpn.py (``lateral_convs.<i>``/``fpn_convs.<i>`` ConvModules: ``conv`` without bias under a norm, ``gn``),
  dense_heads/rpn_head.py (``rpn_conv``, ``rpn_cls`` A sigmoid scores, ``rpn_reg`` 4 A),
  roi_heads/bbox_heads/convfc_bbox_head.py (``Shared4Conv1FCBBoxHead``: ``shared_convs.0..3``, ``shared_fcs.0``,
  ``fc_cls`` K + 1, ``fc_reg`` 4 K), roi_heads/mask_heads/fcn_mask_head.py (``convs.0..3``, ``upsample``,
  ``conv_logits`` K).

Each entry: (upstream key, shape, torchvision key, how it lands): "same"; "stem" (the first conv: input channels
reversed when the file reads BGR); "background" (the classifier: its last row, background, becomes row 0);
"after_background" (class-specific rows of box deltas or mask logits: after an added background entry).
"""

from __future__ import annotations

Entry = tuple[str, tuple[int, ...], str, str]
RESNET50 = ((3, 64, 256), (4, 128, 512), (6, 256, 1024), (3, 512, 2048))  # blocks, bottleneck width, out width
CLASSES = 80
ANCHORS = 3
FPN = 256


def _resnet50(conv, norm, shortcut) -> list[Entry]:
    """The body: ``conv(stage, block, k)``, ``norm(stage, block, k)`` and ``shortcut(stage)`` give upstream
    prefixes; stage counts from 1 (torchvision's layer<stage>)."""
    entries: list[Entry] = []
    in_channels = 64
    for stage, (blocks, width, out) in enumerate(RESNET50, start=1):
        for block in range(blocks):
            tv = f"backbone.body.layer{stage}.{block}"
            if block == 0:
                sc, sc_norm = shortcut(stage)
                entries.append((f"{sc}weight", (out, in_channels, 1, 1), f"{tv}.downsample.0.weight", "same"))
                entries += [(f"{sc_norm}{p}", (out,), f"{tv}.downsample.1.{p}", "same") for p in ("weight", "bias")]
            shapes = ((width, in_channels, 1, 1), (width, width, 3, 3), (out, width, 1, 1))
            for k, shape in enumerate(shapes, start=1):
                entries.append((f"{conv(stage, block, k)}weight", shape, f"{tv}.conv{k}.weight", "same"))
                entries += [
                    (f"{norm(stage, block, k)}{p}", (shape[0],), f"{tv}.bn{k}.{p}", "same") for p in ("weight", "bias")
                ]
            in_channels = out
    return entries


def _norm_pair(upstream: str, target: str, channels: int) -> list[Entry]:
    return [(f"{upstream}{p}", (channels,), f"{target}{p}", "same") for p in ("weight", "bias")]


def detectron2_mask_rcnn_gn() -> list[Entry]:
    """detectron2 configs/Misc/{,scratch_}mask_rcnn_R_50_FPN_*_gn.yaml (GN everywhere, 4conv1fc box head)."""
    body = "backbone.bottom_up"
    entries: list[Entry] = [
        (f"{body}.stem.conv1.weight", (64, 3, 7, 7), "backbone.body.conv1.weight", "stem"),
        *_norm_pair(f"{body}.stem.conv1.norm.", "backbone.body.bn1.", 64),
    ]
    entries += _resnet50(
        lambda s, b, k: f"{body}.res{s + 1}.{b}.conv{k}.",
        lambda s, b, k: f"{body}.res{s + 1}.{b}.conv{k}.norm.",
        lambda s: (f"{body}.res{s + 1}.0.shortcut.", f"{body}.res{s + 1}.0.shortcut.norm."),
    )
    for level, (_, _, out) in enumerate(RESNET50):
        stage = level + 2
        entries.append(
            (
                f"backbone.fpn_lateral{stage}.weight",
                (FPN, out, 1, 1),
                f"backbone.fpn.inner_blocks.{level}.0.weight",
                "same",
            )
        )
        entries += _norm_pair(f"backbone.fpn_lateral{stage}.norm.", f"backbone.fpn.inner_blocks.{level}.1.", FPN)
        entries.append(
            (
                f"backbone.fpn_output{stage}.weight",
                (FPN, FPN, 3, 3),
                f"backbone.fpn.layer_blocks.{level}.0.weight",
                "same",
            )
        )
        entries += _norm_pair(f"backbone.fpn_output{stage}.norm.", f"backbone.fpn.layer_blocks.{level}.1.", FPN)
    rpn = "proposal_generator.rpn_head"
    entries += [
        (f"{rpn}.conv.weight", (FPN, FPN, 3, 3), "rpn.head.conv.0.0.weight", "same"),
        (f"{rpn}.conv.bias", (FPN,), "rpn.head.conv.0.0.bias", "same"),
        (f"{rpn}.objectness_logits.weight", (ANCHORS, FPN, 1, 1), "rpn.head.cls_logits.weight", "same"),
        (f"{rpn}.objectness_logits.bias", (ANCHORS,), "rpn.head.cls_logits.bias", "same"),
        (f"{rpn}.anchor_deltas.weight", (4 * ANCHORS, FPN, 1, 1), "rpn.head.bbox_pred.weight", "same"),
        (f"{rpn}.anchor_deltas.bias", (4 * ANCHORS,), "rpn.head.bbox_pred.bias", "same"),
    ]
    for k in range(4):
        entries.append(
            (f"roi_heads.box_head.conv{k + 1}.weight", (FPN, FPN, 3, 3), f"roi_heads.box_head.{k}.0.weight", "same")
        )
        entries += _norm_pair(f"roi_heads.box_head.conv{k + 1}.norm.", f"roi_heads.box_head.{k}.1.", FPN)
    entries += [
        ("roi_heads.box_head.fc1.weight", (1024, FPN * 7 * 7), "roi_heads.box_head.5.weight", "same"),
        ("roi_heads.box_head.fc1.bias", (1024,), "roi_heads.box_head.5.bias", "same"),
        *_predictor("roi_heads.box_predictor.cls_score.", "roi_heads.box_predictor.bbox_pred."),
    ]
    for k in range(4):
        entries.append(
            (
                f"roi_heads.mask_head.mask_fcn{k + 1}.weight",
                (FPN, FPN, 3, 3),
                f"roi_heads.mask_head.{k}.0.weight",
                "same",
            )
        )
        entries += _norm_pair(f"roi_heads.mask_head.mask_fcn{k + 1}.norm.", f"roi_heads.mask_head.{k}.1.", FPN)
    entries += _mask_predictor("roi_heads.mask_head.deconv.", "roi_heads.mask_head.predictor.")
    return entries


def _predictor(cls: str, reg: str) -> list[Entry]:
    return [
        (f"{cls}weight", (CLASSES + 1, 1024), "roi_heads.box_predictor.cls_score.weight", "background"),
        (f"{cls}bias", (CLASSES + 1,), "roi_heads.box_predictor.cls_score.bias", "background"),
        (f"{reg}weight", (4 * CLASSES, 1024), "roi_heads.box_predictor.bbox_pred.weight", "after_background"),
        (f"{reg}bias", (4 * CLASSES,), "roi_heads.box_predictor.bbox_pred.bias", "after_background"),
    ]


def _mask_predictor(deconv: str, logits: str) -> list[Entry]:
    return [
        (f"{deconv}weight", (FPN, FPN, 2, 2), "roi_heads.mask_predictor.conv5_mask.weight", "same"),
        (f"{deconv}bias", (FPN,), "roi_heads.mask_predictor.conv5_mask.bias", "same"),
        (
            f"{logits}weight",
            (CLASSES, FPN, 1, 1),
            "roi_heads.mask_predictor.mask_fcn_logits.weight",
            "after_background",
        ),
        (f"{logits}bias", (CLASSES,), "roi_heads.mask_predictor.mask_fcn_logits.bias", "after_background"),
    ]


def caffe2_r50_gn() -> list[Entry]:
    """Detectron's ImageNet R-50-GN.pkl (a ResNet-50 classifier with GN(32), 1000 classes)."""
    entries: list[Entry] = [
        ("conv1_w", (64, 3, 7, 7), "body.conv1.weight", "stem"),
        ("conv1_gn_s", (64,), "body.bn1.weight", "same"),
        ("conv1_gn_b", (64,), "body.bn1.bias", "same"),
    ]
    branch = {1: "a", 2: "b", 3: "c"}
    for upstream, shape, target, how in _resnet50(
        lambda s, b, k: f"res{s + 1}_{b}_branch2{branch[k]}_",
        lambda s, b, k: f"res{s + 1}_{b}_branch2{branch[k]}_gn_",
        lambda s: (f"res{s + 1}_0_branch1_", f"res{s + 1}_0_branch1_gn_"),
    ):
        name = upstream.replace("gn_weight", "gn_s").replace("gn_bias", "gn_b").replace("_weight", "_w")
        entries.append((name, shape, target.replace("backbone.body.", "body."), how))
    entries += [("pred_w", (1000, 2048), "fc.weight", "same"), ("pred_b", (1000,), "fc.bias", "same")]
    return entries


def mmdet_gn_all(masks: bool, head_prefix: str = "roi_head.") -> list[Entry]:
    """mmdetection configs/scratch/*_gn-all_scratch_6x_coco.py and configs/gn/mask_rcnn_r50_fpn_gn-all_*x_coco.py."""
    entries: list[Entry] = [
        ("backbone.conv1.weight", (64, 3, 7, 7), "backbone.body.conv1.weight", "stem"),
        *_norm_pair("backbone.gn1.", "backbone.body.bn1.", 64),
    ]
    entries += _resnet50(
        lambda s, b, k: f"backbone.layer{s}.{b}.conv{k}.",
        lambda s, b, k: f"backbone.layer{s}.{b}.gn{k}.",
        lambda s: (f"backbone.layer{s}.0.downsample.0.", f"backbone.layer{s}.0.downsample.1."),
    )
    for level, (_, _, out) in enumerate(RESNET50):
        entries.append(
            (
                f"neck.lateral_convs.{level}.conv.weight",
                (FPN, out, 1, 1),
                f"backbone.fpn.inner_blocks.{level}.0.weight",
                "same",
            )
        )
        entries += _norm_pair(f"neck.lateral_convs.{level}.gn.", f"backbone.fpn.inner_blocks.{level}.1.", FPN)
        entries.append(
            (
                f"neck.fpn_convs.{level}.conv.weight",
                (FPN, FPN, 3, 3),
                f"backbone.fpn.layer_blocks.{level}.0.weight",
                "same",
            )
        )
        entries += _norm_pair(f"neck.fpn_convs.{level}.gn.", f"backbone.fpn.layer_blocks.{level}.1.", FPN)
    entries += [
        ("rpn_head.rpn_conv.weight", (FPN, FPN, 3, 3), "rpn.head.conv.0.0.weight", "same"),
        ("rpn_head.rpn_conv.bias", (FPN,), "rpn.head.conv.0.0.bias", "same"),
        ("rpn_head.rpn_cls.weight", (ANCHORS, FPN, 1, 1), "rpn.head.cls_logits.weight", "same"),
        ("rpn_head.rpn_cls.bias", (ANCHORS,), "rpn.head.cls_logits.bias", "same"),
        ("rpn_head.rpn_reg.weight", (4 * ANCHORS, FPN, 1, 1), "rpn.head.bbox_pred.weight", "same"),
        ("rpn_head.rpn_reg.bias", (4 * ANCHORS,), "rpn.head.bbox_pred.bias", "same"),
    ]
    box = f"{head_prefix}bbox_head"
    for k in range(4):
        entries.append(
            (f"{box}.shared_convs.{k}.conv.weight", (FPN, FPN, 3, 3), f"roi_heads.box_head.{k}.0.weight", "same")
        )
        entries += _norm_pair(f"{box}.shared_convs.{k}.gn.", f"roi_heads.box_head.{k}.1.", FPN)
    entries += [
        (f"{box}.shared_fcs.0.weight", (1024, FPN * 7 * 7), "roi_heads.box_head.5.weight", "same"),
        (f"{box}.shared_fcs.0.bias", (1024,), "roi_heads.box_head.5.bias", "same"),
        *_predictor(f"{box}.fc_cls.", f"{box}.fc_reg."),
    ]
    if masks:
        mask = f"{head_prefix}mask_head"
        for k in range(4):
            entries.append(
                (f"{mask}.convs.{k}.conv.weight", (FPN, FPN, 3, 3), f"roi_heads.mask_head.{k}.0.weight", "same")
            )
            entries += _norm_pair(f"{mask}.convs.{k}.gn.", f"roi_heads.mask_head.{k}.1.", FPN)
        entries += _mask_predictor(f"{mask}.upsample.", f"{mask}.conv_logits.")
    return entries
