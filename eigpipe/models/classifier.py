"""The classification model (ResNet body + global pool + fc) that stands in for the ImageNet model."""

from __future__ import annotations

import torch
from torch import nn

from eigpipe.models.resnet import ResNet


class Classifier(nn.Module):
    def __init__(self, body: ResNet, num_classes: int) -> None:
        super().__init__()
        self.body = body
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(body.widths.stage_outs[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.body(x)), 1))
