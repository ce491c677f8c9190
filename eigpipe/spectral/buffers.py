"""Numerics helpers of the accumulator: reusable scratch buffers and IEEE float32 matrix products."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch


def float32_backends() -> tuple:
    """The settings that choose the precision of float32 matmuls and convolutions (CUDA, cuDNN, oneDNN)."""
    return (
        torch.backends.cuda.matmul,
        torch.backends.cudnn.conv,
        torch.backends.mkldnn.matmul,
        torch.backends.mkldnn.conv,
    )


@contextlib.contextmanager
def ieee_float32() -> Iterator[None]:
    """float32 matmuls and convolutions in full precision (no TF32 on CUDA, no bf16/TF32 in oneDNN) inside the
    block only: the features extraction measures and the Gram products of its float32 mode."""
    backends = float32_backends()
    saved = [backend.fp32_precision for backend in backends]  # the new API only: mixing in allow_tf32 raises
    try:
        for backend in backends:
            backend.fp32_precision = "ieee"
        yield
    finally:
        for backend, value in zip(backends, saved, strict=True):
            backend.fp32_precision = value


class Workspace:
    """Reusable scratch buffers (per device, dtype and slot) shared by all layers: no allocation per update."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.device, torch.dtype, int], torch.Tensor] = {}

    def get(
        self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.float64, slot: int = 0
    ) -> torch.Tensor:
        numel = math.prod(shape)
        key = (device, dtype, slot)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            with torch.inference_mode(False):  # usable in and out of inference mode
                buf = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel].view(shape)
