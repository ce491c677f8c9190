"""RoIAlign with half-pixel alignment over the FPN levels.

torchvision's ``MultiScaleRoIAlign`` always calls ``roi_align(..., aligned=False)`` (torchvision/ops/poolers.py,
``_multiscale_roi_align``). detectron2's ``ROIAlignV2`` (modeling/poolers.py, the pooler of its model-zoo configs)
and mmcv's ``RoIAlign`` (mmcv/ops/roi_align.py, ``aligned=True`` by default, mmdetection's RoI extractor) shift
the box corners by half a pixel first. This subclass keeps torchvision's level assignment and only sets the flag.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales


class AlignedMultiScaleRoIAlign(MultiScaleRoIAlign):
    """``MultiScaleRoIAlign`` whose RoIAlign uses ``aligned=True``."""

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        features = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(
                features, image_shapes, self.canonical_scale, self.canonical_level
            )
        rois = _convert_to_roi_format(boxes)
        levels = self.map_levels(boxes) if len(features) > 1 else torch.zeros(len(rois), dtype=torch.int64)
        first = features[0]
        result = first.new_zeros((len(rois), first.shape[1], *self.output_size))
        for level, (feature, scale) in enumerate(zip(features, self.scales, strict=True)):
            index = torch.where(levels == level)[0]
            pooled = roi_align(
                feature,
                rois[index],
                self.output_size,
                spatial_scale=scale,
                sampling_ratio=self.sampling_ratio,
                aligned=True,
            )
            result[index] = pooled.to(result.dtype)
        return result
