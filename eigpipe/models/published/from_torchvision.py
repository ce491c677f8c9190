"""torchvision detection checkpoints: a state dict of the detector torchvision builds (``torch.save`` of
``model.state_dict()``, or the reference scripts' ``{"model": state_dict, ...}``).

eigpipe's detectors are torchvision's classes under torchvision's module names, so keys land where they are,
after the renames torchvision itself applies to files saved before its modules' version 2 (read in
``_load_from_state_dict`` of ``RPNHead`` in models/detection/rpn.py, ``MaskRCNNHeads`` in mask_rcnn.py and
``FeaturePyramidNetwork`` in ops/feature_pyramid_network.py). Labels are COCO category ids (91 outputs,
``"N/A"`` where COCO has no category: ``torchvision.models._meta._COCO_CATEGORIES``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from eigpipe.models.published.mapping import Mapped, rename, rule, torch_file

RULES = (
    rule(r"rpn\.head\.conv\.(weight|bias)", r"rpn.head.conv.0.0.\1"),
    rule(
        r"roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)", lambda m: f"roi_heads.mask_head.{int(m[1]) - 1}.0.{m[2]}"
    ),
    rule(r"backbone\.fpn\.(inner|layer)_blocks\.(\d+)\.(weight|bias)", r"backbone.fpn.\1_blocks.\2.0.\3"),
    rule(r"(backbone|rpn|roi_heads)\..+", r"\g<0>"),
)
DROPPED = (r".*\.num_batches_tracked",)  # BatchNorm's batch counter: not a weight
BACKGROUND_LAST = False


def read(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a torchvision detector file (or of references/detection/train.py's ``{"model": ...}``)."""
    return torch_file(path, "a torchvision checkpoint", "model", required=False)[0]


def to_eigpipe(state: dict[str, torch.Tensor], path: Path) -> Mapped:
    return rename(state, RULES, DROPPED, path, "torchvision")
