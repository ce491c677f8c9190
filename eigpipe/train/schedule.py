"""SGD with linear warm-up, then step or cosine decay (torchvision references' recipe), per iteration."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


def decay_points(schedule: dict) -> list[int]:
    """lr_steps below 1 are fractions of the schedule, others iterations."""
    steps = schedule["steps"]
    return sorted(int(p * steps) if p < 1 else int(p) for p in schedule["lr_steps"])


def lr_factor(schedule: dict) -> Callable[[int], float]:
    steps, warmup = schedule["steps"], schedule["warmup_steps"]
    start = schedule["warmup_factor"]
    gamma, points = schedule["gamma"], decay_points(schedule)
    cosine = schedule["decay"] == "cosine"

    def factor(iteration: int) -> float:
        scale = 1.0
        if iteration < warmup:
            alpha = iteration / warmup
            scale = start * (1 - alpha) + alpha
        if cosine:
            return scale * 0.5 * (1 + math.cos(math.pi * min(iteration, steps) / steps))
        return scale * gamma ** sum(iteration >= p for p in points)

    return factor


def build_optimizer(model: nn.Module, schedule: dict) -> tuple[torch.optim.Optimizer, LambdaLR]:
    params = [p for p in model.parameters() if p.requires_grad]
    momentum, decay = schedule["momentum"], schedule["weight_decay"]
    optimizer = torch.optim.SGD(params, lr=schedule["lr"], momentum=momentum, weight_decay=decay)
    return optimizer, LambdaLR(optimizer, lr_factor(schedule))
