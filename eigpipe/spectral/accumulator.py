"""Streaming float64 accumulator of the per-image-weighted mean and second moment of feature maps.

The paper's matrix for a layer with C channels is Sigma = (1/n) sum_i (1/(H_i W_i)) sum_xy F_ixy F_ixy^T:
averaged over each image's positions first, then over the n images. It is never built from stored
features: each batch is folded into an O(C^2) state on the model's device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

FeatureBatch = torch.Tensor | Sequence[torch.Tensor]


class NonFiniteFeature(ValueError):
    """Raised by ``CovarianceAccumulator.update``; ``index`` is the offending image within the update."""

    def __init__(self, index: int) -> None:
        super().__init__(f"non-finite feature in image {index} of the batch")
        self.index = index


class Workspace:
    """A reusable float64 scratch buffer: one per extraction, shared by all layers' accumulators.

    Updates run one after another, so one buffer the size of the largest batch suffices; reusing it
    avoids a fresh allocation (and its page faults) per layer and batch.
    """

    def __init__(self) -> None:
        self._buffers: dict[torch.device, torch.Tensor] = {}

    def get(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self._buffers.get(device)
        if buf is None or buf.numel() < numel:
            with torch.inference_mode(False):  # usable in and out of inference mode
                buf = self._buffers[device] = torch.empty(numel, dtype=torch.float64, device=device)
        return buf[:numel].view(shape)


class CovarianceAccumulator:
    """Per-image-weighted mean, uncentred second moment and centred covariance of [C, H, W] features.

    Kept robustly (exact to float64 round-off even for features with a large common offset): each
    image is centred by its own mean, and the per-image means are combined with Welford/Chan. The one
    [C, C] state is ``scatter`` = W + M2, where W = sum_i (1/P_i) sum_xy (F - m_i)(F - m_i)^T and
    M2 = sum_i (m_i - mu)(m_i - mu)^T; covariance = scatter / n and second_moment = covariance + mu mu^T.
    Only the lower triangle of ``scatter`` is authoritative: for wide layers the Gram matrix is built
    block by block below the diagonal (about half the multiply-adds).
    """

    BLOCK = 256  # block of the triangular Gram update; narrower layers (< 2 blocks) take one full GEMM

    @classmethod
    def block_size(cls, channels: int) -> int:
        # measured on CPU: splitting pays only for wide layers, and 256 beats 128 and 512 there
        return cls.BLOCK if channels >= 2 * cls.BLOCK else channels

    def __init__(
        self, channels: int, device: torch.device | str | None = None, workspace: Workspace | None = None
    ) -> None:
        self.channels = int(channels)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.workspace = workspace
        self._n = 0
        self.positions = 0
        # normal tensors even when created under inference_mode (hooks), so a later merge can update them
        with torch.inference_mode(False):
            self._mu = torch.zeros(self.channels, dtype=torch.float64, device=self.device)
            self._scatter = torch.zeros(self.channels, self.channels, dtype=torch.float64, device=self.device)

    # ---- feeding ------------------------------------------------------------------------------
    def update(self, features: FeatureBatch) -> None:
        """Add images: one [C, H, W], a batch [N, C, H, W], or a list of [C, H_i, W_i] (any sizes).

        Raises NonFiniteFeature (with the image's index in this update) before changing any state.
        """
        if isinstance(features, torch.Tensor):
            if features.dim() == 3:
                features = features.unsqueeze(0)
            if features.dim() != 4:
                raise ValueError(f"features must be [C,H,W] or [N,C,H,W], got shape {tuple(features.shape)}")
            self._update_batch(features, list(range(features.shape[0])))
            return
        groups = _group_by_shape(features)
        if len(groups) == 1:
            self._update_batch(groups[0][1], groups[0][0])
            return
        partial = CovarianceAccumulator(self.channels, self.device, self.workspace)
        for indices, batch in groups:  # all sizes into a partial sum first: a bad image changes nothing
            partial._update_batch(batch, indices)
        self.merge(partial)

    def _update_batch(self, batch: torch.Tensor, indices: list[int]) -> None:
        """Fold N equal-sized images into the state with one (block-triangular) float64 GEMM.

        The operand is [C, N*P + N + 1]: the features centred per image, then the per-image mean
        deviations from the batch mean and Chan's cross term, both scaled by sqrt(P) so that the one
        GEMM with alpha 1/P adds W_batch + M2_batch + n_a n_b/(n_a+n_b) delta delta^T to the scatter.
        """
        n, c, h, w = batch.shape
        p = h * w
        if c != self.channels:
            raise ValueError(f"expected {self.channels} channels, got {c}")
        if p == 0:
            raise ValueError("features with no spatial positions")
        shape = (c, n * p + n + 1)
        operand = self.workspace.get(shape, self.device) if self.workspace is not None else None
        operand = torch.empty(shape, dtype=torch.float64, device=self.device) if operand is None else operand
        x = operand[:, : n * p].view(c, n, p)
        x.copy_(batch.detach().reshape(n, c, p).permute(1, 0, 2))
        means = x.mean(dim=2)  # [C, N]
        if not math.isfinite(float(means.sum())):  # NaN or Inf anywhere makes the sum non-finite
            bad = ~torch.isfinite(means).all(dim=0)
            raise NonFiniteFeature(indices[int(bad.nonzero()[0, 0])])
        x.sub_(means.unsqueeze(2))
        batch_mu = means.mean(dim=1)
        total = self._n + n
        delta = batch_mu - self._mu
        root_p = math.sqrt(p)
        torch.sub(means, batch_mu.unsqueeze(1), out=operand[:, n * p : n * p + n]).mul_(root_p)
        torch.mul(delta, root_p * math.sqrt(self._n * n / total), out=operand[:, -1])
        self._gram(operand, alpha=1.0 / p)
        self._mu.add_(delta, alpha=n / total)
        self._n = total
        self.positions += n * p

    def _gram(self, operand: torch.Tensor, alpha: float) -> None:
        """scatter += alpha * operand operand^T, lower block triangle only for wide layers."""
        c = operand.shape[0]
        block = self.block_size(c)
        for i in range(0, c, block):
            for j in range(0, i + 1, block):
                rows, cols = operand[i : i + block], operand[j : j + block]
                self._scatter[i : i + block, j : j + block].addmm_(rows, cols.T, alpha=alpha)

    def _merge_stats(self, n_b: int, mu_b: torch.Tensor, scatter_b: torch.Tensor) -> None:
        """Chan et al.'s pairwise update of (count, mean, scatter) with another set's statistics."""
        if n_b == 0:
            return
        n_a = self._n
        total = n_a + n_b
        delta = mu_b - self._mu
        self._mu.add_(delta, alpha=n_b / total)
        self._scatter += scatter_b
        self._scatter.addr_(delta, delta, alpha=n_a * n_b / total)
        self._n = total

    def merge(self, other: CovarianceAccumulator) -> CovarianceAccumulator:
        """Fold another partial accumulator (other images of the same layer) into this one."""
        if other.channels != self.channels:
            raise ValueError(f"cannot merge {other.channels} channels into {self.channels}")
        self._merge_stats(other._n, other._mu.to(self.device), other._scatter.to(self.device))
        self.positions += other.positions
        return self

    # ---- state (DDP gather, resuming) -----------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "channels": self.channels,
            "count": self._n,
            "positions": self.positions,
            "mean": self._mu.cpu(),
            "scatter": self._symmetric().cpu(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: torch.device | str | None = None) -> CovarianceAccumulator:
        acc = cls(state["channels"], device)
        acc._n = int(state["count"])
        acc.positions = int(state["positions"])
        acc._mu.copy_(state["mean"])
        acc._scatter.copy_(state["scatter"])
        return acc

    # ---- results --------------------------------------------------------------------------------
    def _symmetric(self) -> torch.Tensor:
        """The full symmetric scatter (a new tensor), mirrored from its authoritative lower part."""
        b = self.block_size(self.channels)
        if b == self.channels:  # the whole Gram matrix was computed
            return (self._scatter + self._scatter.T).div_(2)
        full = self._scatter.clone()
        for i in range(b, self.channels, b):
            full[:i, i : i + b].copy_(full[i : i + b, :i].T)
        return full

    @property
    def count(self) -> int:
        """Images seen."""
        return self._n

    @property
    def mean(self) -> torch.Tensor:
        """(1/n) sum_i mean_xy F_i, float64 [C]."""
        return self._mu.clone()

    @property
    def covariance(self) -> torch.Tensor:
        """Centred covariance (second_moment - mean mean^T, computed without cancellation), float64 [C, C]."""
        if self._n == 0:
            raise ValueError("no images accumulated")
        return self._symmetric().div_(self._n)

    @property
    def second_moment(self) -> torch.Tensor:
        """The paper's uncentred matrix (1/n) sum_i mean_xy F F^T, float64 [C, C]."""
        if self._n == 0:
            raise ValueError("no images accumulated")
        return self._symmetric().div_(self._n).addr_(self._mu, self._mu)


def _group_by_shape(features: Sequence[torch.Tensor]) -> list[tuple[list[int], torch.Tensor]]:
    """Stack images of equal size so each size is one batched update (original indices kept)."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, f in enumerate(features):
        if f.dim() != 3:
            raise ValueError(f"image {i}: features must be [C,H,W], got shape {tuple(f.shape)}")
        by_shape.setdefault(tuple(f.shape), []).append(i)
    return [(idx, torch.stack([features[i] for i in idx])) for idx in by_shape.values()]
