"""Layers that widen their input by one affine map take their statistics from their input (float32 mode).

A 1x1 convolution (no padding, ungrouped, any stride) or a Linear layer computes y = W x + b at every position, so the
mean and scatter of y are W m_x + b and W S_x Wᵀ. Where the input is narrower than the output (a bottleneck's conv3, a
projection shortcut, a transformer's first MLP layer), the input's Gram products cost about (C_in / C_out)^2 of the
output's. The input's statistics are kept while the layer's weights stay unchanged, and mapped into the layer's own
(float64, eigpipe.spectral.affine) when they change and when results are read. A layer whose weights changed since its
previous batch (training) takes its output, so each mapping serves many batches. As with the float32 mode's other
mapped layers, the result differs from the Gram of the module's float32-rounded output by that rounding, ~1e-7
relative; the float64 mode always takes the output itself.

The input is taken only where the input, weights and output share one dtype (no autocast), and where the module has
no hook but eigpipe's that could change what it receives or returns. A float64 copy of the weights is kept while the
input is taken.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from eigpipe.spectral.accumulator import CovarianceAccumulator
from eigpipe.spectral.affine import AffineMap, layer_matrix, mapped_accumulator
from eigpipe.spectral.buffers import Workspace
from eigpipe.spectral.layers import Layer
from eigpipe.spectral.layouts import Layout


def widens(module: nn.Module) -> bool:
    """Whether the module is one affine map of its input at every position, onto more channels than it has."""
    kind = type(module)  # exactly these classes: a subclass or a parametrized module may compute something else
    if kind is nn.Linear:
        return module.in_features < module.out_features
    pointwise = kind is nn.Conv2d and module.kernel_size == (1, 1) and module.groups == 1
    return pointwise and module.padding in ((0, 0), "valid") and module.in_channels < module.out_channels


def widening_input(module: nn.Module, inputs: Any, output: torch.Tensor, layout: Layout) -> torch.Tensor | None:
    """The input of a module that ``widens`` whose mapped statistics are ``output``'s (at the output's positions), or
    None: take the output."""
    if len(module._forward_hooks) != 1 or module._forward_pre_hooks:
        return None
    x = inputs[0] if isinstance(inputs, tuple) and inputs else None
    if not isinstance(x, torch.Tensor) or not x.dtype == module.weight.dtype == output.dtype:
        return None
    dims = output.dim()
    if x.dim() != dims:
        return None
    if type(module) is nn.Conv2d:
        if dims != 4 or layout.resolved_axis(4) != 1:
            return None
        if module.stride != (1, 1):
            x = x[:, :, :: module.stride[0], :: module.stride[1]]
        same = x.shape[2:] == output.shape[2:]
    else:
        if layout.resolved_axis(dims) != dims - 1:
            return None
        same = x.shape[:-1] == output.shape[:-1]
    return x.detach() if same and x.shape[0] == output.shape[0] else None


def _version(module: nn.Module) -> tuple:
    """What changes when the weights do: their storage and in-place version counters."""
    found: list = []
    for param in (module.weight, module.bias):
        if param is not None:
            found += [param.data_ptr(), object() if param.is_inference() else param._version]
    return tuple(found)


class Widening:
    """One widening layer's input statistics, kept while its weights stay unchanged; ``settle`` maps them into the
    layer's accumulator ``acc``."""

    def __init__(self, layer: Layer, module: nn.Module, acc: CovarianceAccumulator) -> None:
        self.layer, self.module, self.acc = layer, module, acc
        self.inputs: CovarianceAccumulator | None = None  # the input's statistics under ``weights``
        self.weights: AffineMap | None = None
        self._version: tuple | None = None  # the weights' identity when ``weights`` was taken
        self._previous: tuple | None = None  # ... at the layer's previous batch

    def accumulator(self, workspace: Workspace) -> CovarianceAccumulator | None:
        """Where this batch's input features go, or None: take the output (weights new or changing)."""
        version = _version(self.module)
        if self.weights is not None and version != self._version:
            self.settle()
            self.weights = None
        if self.weights is None and self._previous in (None, version):  # the first batch, or weights held still
            self.weights, self._version = _affine(self.layer.name, self.module), version
        self._previous = version
        if self.weights is None:
            return None
        if self.inputs is None:
            channels = self.module.weight.shape[1]
            self.inputs = CovarianceAccumulator(channels, self.acc.device, workspace, self.acc.precision)
        return self.inputs

    def settle(self) -> None:
        """Map the input statistics kept so far into the layer's own."""
        if self.inputs is not None and self.inputs.count:
            self.acc.merge(mapped_accumulator(self.layer.name, self.inputs, self.weights))
        self.inputs = None


def _affine(name: str, module: nn.Module) -> AffineMap:
    return AffineMap(f"the input of {name}", *layer_matrix(module))
