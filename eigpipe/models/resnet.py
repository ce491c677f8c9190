"""A bottleneck ResNet whose every conv width comes from a WidthSpec, with torchvision's module names.

Module and parameter names match torchvision's ResNet-50, so its ImageNet state dict loads directly when
the widths are standard. Each block has its own ReLU modules so that every conv's post-activation output
can be hooked (``eigpipe.models.taps``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from eigpipe.errors import ConfigError
from eigpipe.models.widths import WidthSpec

NormFactory = Callable[[int], nn.Module]


def norm_factory(norm: str, gn_groups: int = 32, eps: float = 1e-5) -> NormFactory:
    """bn | frozen_bn | gn | sync_bn (built as BN; converted to SyncBN when training under DDP).

    GroupNorm uses gcd(channels, gn_groups) groups, so narrow layers still get a valid grouping. ``eps`` is the
    BatchNorm epsilon (torchvision's first COCO detectors were trained with 0).
    """
    if norm in ("bn", "sync_bn"):
        return partial(nn.BatchNorm2d, eps=eps)
    if norm == "frozen_bn":
        return partial(FrozenBatchNorm2d, eps=eps)
    if norm == "gn":
        return lambda channels: nn.GroupNorm(math.gcd(channels, gn_groups), channels)
    raise ConfigError(f"model.norm: unknown norm {norm!r}")


class Bottleneck(nn.Module):
    # the module whose output is each conv's feature (conv3 before the residual sum: after its norm)
    FEATURE_TAPS = {"conv1": "relu1", "conv2": "relu2", "conv3": "bn3"}

    def __init__(self, in_ch: int, widths: tuple[int, int], out_ch: int, stride: int, norm: NormFactory) -> None:
        super().__init__()
        w1, w2 = widths
        self.conv1 = nn.Conv2d(in_ch, w1, 1, bias=False)
        self.bn1 = norm(w1)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(w1, w2, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm(w2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(w2, out_ch, 1, bias=False)
        self.bn3 = norm(out_ch)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), norm(out_ch))
        self.relu3 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + identity)


class ResNet(nn.Module):
    """Stem + four stages of bottlenecks; no pooling/fc (the classifier adds those)."""

    def __init__(self, widths: WidthSpec, norm: NormFactory, zero_init_residual: bool = True) -> None:
        super().__init__()
        self.widths = widths
        self.conv1 = nn.Conv2d(3, widths.stem, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm(widths.stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_ch = widths.stem
        for i, stage in enumerate(widths.stages):
            blocks = []
            for j, block in enumerate(stage.blocks):
                stride = 2 if (j == 0 and i > 0) else 1
                blocks.append(Bottleneck(in_ch, block, stage.out, stride, norm))
                in_ch = stage.out
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:  # Goyal et al. 2017, torchvision's zero_init_residual
            for m in self.modules():
                if isinstance(m, Bottleneck) and isinstance(m.bn3, nn.BatchNorm2d | nn.GroupNorm):
                    nn.init.zeros_(m.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def freeze_for_trainable_layers(body: nn.Module, trainable_layers: int) -> None:
    """torchvision's rule: train the last ``trainable_layers`` of layer4..layer1, conv1 (5 = all)."""
    trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        trainable.append("bn1")
    for name, param in body.named_parameters():
        if all(not name.startswith(layer) for layer in trainable):
            param.requires_grad_(False)


def head_norm_for(model_cfg: dict) -> NormFactory | None:
    """Norm factory of the FPN and mask-head convs: ``head_norm`` when set, else (auto) GroupNorm when the
    config asks for norm gn and fpn_norm, none otherwise."""
    head = model_cfg["head_norm"]
    if head == "auto":
        head = "gn" if model_cfg["norm"] == "gn" and model_cfg["fpn_norm"] else "none"
    return None if head == "none" else norm_factory(head, model_cfg["gn_groups"])


def box_head_norm_for(model_cfg: dict) -> NormFactory | None:
    """Norm factory of a convfc box head's convs: ``head_norm`` when set, else (auto) the body's norm."""
    head = model_cfg["head_norm"]
    if head == "auto":
        return norm_factory(model_cfg["norm"], model_cfg["gn_groups"])
    return None if head == "none" else norm_factory(head, model_cfg["gn_groups"])
