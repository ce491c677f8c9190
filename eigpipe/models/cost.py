"""Analytic params and MACs of a ResNet body from its widths spec (what torch's flop counter measures, in pure
Python: fast enough to run inside the width derivation's bisection)."""

from __future__ import annotations

from collections.abc import Iterator

from eigpipe.models.widths import WidthSpec


def _out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def convs(spec: WidthSpec, height: int, width: int) -> Iterator[tuple[str, int, int, int, int]]:
    """(canonical name, in channels, out channels, kernel, output positions) of every conv of the body."""
    h, w = _out(height, 7, 2, 3), _out(width, 7, 2, 3)
    yield "conv1", 3, spec.stem, 7, h * w
    h, w = _out(h, 3, 2, 1), _out(w, 3, 2, 1)  # maxpool
    cin = spec.stem
    for i, stage in enumerate(spec.stages, start=1):
        for j, (w1, w2) in enumerate(stage.blocks):
            stride = 2 if (j == 0 and i > 1) else 1
            ho, wo = _out(h, 3, stride, 1), _out(w, 3, stride, 1)
            name = f"layer{i}.{j}"
            yield f"{name}.conv1", cin, w1, 1, h * w
            yield f"{name}.conv2", w1, w2, 3, ho * wo
            yield f"{name}.conv3", w2, stage.out, 1, ho * wo
            if stride != 1 or cin != stage.out:
                yield f"{name}.downsample.0", cin, stage.out, 1, ho * wo
            h, w, cin = ho, wo, stage.out


def body_cost(spec: WidthSpec, height: int, width: int) -> tuple[int, int]:
    """(params, MACs) of the ResNet body: conv weights + 2 affine terms per norm channel; conv MACs only."""
    params = macs = 0
    for _, cin, cout, k, positions in convs(spec, height, width):
        weights = cin * cout * k * k
        params += weights + 2 * cout
        macs += weights * positions
    return params, macs


# -- derivation ---------------------------------------------------------------------------------------------
