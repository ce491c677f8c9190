"""Parameters and MACs of backbone body, FPN and whole detector (torch.utils.flop_counter; MACs = FLOPs / 2).

The flop counter counts convolutions and matrix products; RoIAlign and NMS are not counted.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.ops import FrozenBatchNorm2d

from eigpipe.errors import EigpipeError
from eigpipe.models import build_detector, from_model_config


def count_params(module: nn.Module) -> int:
    """Parameters, frozen ones included (FrozenBatchNorm2d keeps its affine terms as buffers)."""
    frozen = sum(m.weight.numel() + m.bias.numel() for m in module.modules() if isinstance(m, FrozenBatchNorm2d))
    return sum(p.numel() for p in module.parameters()) + frozen


def count_macs(module: nn.Module, *inputs: object) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(*inputs)
    return counter.get_total_flops() // 2


def detector_complexity(
    model_cfg: dict, num_classes: int, height: int, width: int, model_name: str = "faster_rcnn"
) -> dict[str, int]:
    """Params and MACs of the detector a model section describes."""
    model = build_detector(model_name, model_cfg, num_classes, from_model_config(model_cfg))
    return model_complexity(model, height, width)


MAX_SIDE = 8192  # the schema's largest image side (a ResNet-50 stem then holds 4 GB of float32 activations)


def model_complexity(model: nn.Module, height: int, width: int) -> dict[str, int]:
    """Params and MACs of a detector at an input of height x width (its own resize is switched off)."""
    model = copy.deepcopy(model).cpu().eval()
    model.transform.min_size = (min(height, width),)
    model.transform.max_size = max(height, width)
    image = torch.zeros(1, 3, height, width)
    body_macs = count_macs(model.backbone.body, image)
    backbone_macs = count_macs(model.backbone, image)
    body_params = count_params(model.backbone.body)
    return {
        "body_params": body_params,
        "fpn_params": count_params(model.backbone) - body_params,
        "detector_params": count_params(model),
        "body_macs": body_macs,
        "fpn_macs": backbone_macs - body_macs,
        "detector_macs": count_macs(model, [image[0]]),
    }


def report(cfg: dict, input_size: tuple[int, int], num_classes: int) -> str:
    """The ``eigpipe complexity`` stage: print params and MACs of the detector of the model section."""
    height, width = input_size
    if not (16 <= height <= MAX_SIDE and 16 <= width <= MAX_SIDE) or num_classes < 2:
        raise EigpipeError(
            f"--input-size {height} {width} / --num-classes {num_classes}: sizes must be 16 to {MAX_SIDE} "
            "and classes >= 2 (background included)"
        )
    numbers = detector_complexity(cfg["model"], num_classes, height, width)
    lines = [f"{'part':<10}{'params':>14}{'MACs':>16}   (input {height}x{width}, {num_classes} classes)"]
    for part, params, macs in (
        ("body", numbers["body_params"], numbers["body_macs"]),
        ("fpn", numbers["fpn_params"], numbers["fpn_macs"]),
        ("detector", numbers["detector_params"], numbers["detector_macs"]),
    ):
        lines.append(f"{part:<10}{params / 1e6:>13.3f}M{macs / 1e9:>15.3f}G")
    print("\n".join(lines))
    return "\n".join(lines)
