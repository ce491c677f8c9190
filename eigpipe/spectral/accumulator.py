"""Streaming float64 accumulator of the per-image-weighted mean and second moment of feature maps.

The paper's matrix for a layer with C channels is Sigma = (1/n) sum_i (1/(H_i W_i)) sum_xy F_ixy F_ixy^T:
averaged over each image's positions first, then over the n images. It is never built from stored
features: each batch is folded into an O(C^2) state on the model's device. The Gram products run in
float64 (exact, the default) or float32 (after centring per image; the state stays float64).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from eigpipe.spectral.buffers import Workspace, ieee_float32

FeatureBatch = torch.Tensor | Sequence[torch.Tensor]
PRECISIONS = ("float64", "float32")  # covariance.precision: the dtype of the Gram products


class NonFiniteFeature(ValueError):
    """Raised by ``CovarianceAccumulator.update``; ``index`` is the offending image within the update."""

    def __init__(self, index: int) -> None:
        super().__init__(f"non-finite feature in image {index} of the batch")
        self.index = index


class CovarianceAccumulator:
    """Per-image-weighted mean, uncentred second moment and centred covariance of [C, H, W] features.

    Kept robustly (exact to float64 round-off even for features with a large common offset): each
    image is centred by its own mean, and the per-image means are combined with Welford/Chan. The one
    [C, C] state is ``scatter`` = W + M2, where W = sum_i (1/P_i) sum_xy (F - m_i)(F - m_i)^T and
    M2 = sum_i (m_i - mu)(m_i - mu)^T; covariance = scatter / n and second_moment = covariance + mu mu^T.
    Only the lower triangle of ``scatter`` is authoritative: for wide layers the Gram matrix is built
    panel by panel below the diagonal (about half the multiply-adds). ``precision`` float32 forms the
    products of the centred features in float32 (TF32 off) and adds them to the float64 state.
    """

    PANEL = 128  # rows per GEMM of the triangular Gram update; layers narrower than two panels take one GEMM
    # float32 products: layers narrower than NARROW take float64 ones (cheap; MKL's narrow sgemm sums each
    # entry sequentially, 3e-6 off at 8 channels). float32 sums span at most FLOAT32_FLUSH positions (MKL's
    # blocked sgemm measured flat to 65536); where the BLAS sums along K sequentially (cuBLAS), each product
    # spans at most FLOAT32_CHUNK[device type] positions, and the chunks are summed in float64
    NARROW = 16
    FLOAT32_FLUSH = 16384
    FLOAT32_CHUNK: dict[str, int] = {"cuda": 256}
    GROUP_ELEMENTS = 1 << 24  # float32 elements of the chunks' products held at once (64 MiB)

    @classmethod
    def panel_rows(cls, channels: int) -> int:
        # measured on CPU (MKL, 2 threads, both precisions): one GEMM per panel of rows against every column up
        # to the diagonal beats square blocks of 256 by 15-30% at 256 to 2048 channels (fewer, wider GEMMs);
        # panels of 64 rows are best up to 256 channels, 128 above
        rows = cls.PANEL // 2 if channels <= 256 else cls.PANEL
        return rows if channels >= 2 * rows else channels

    def __init__(
        self,
        channels: int,
        device: torch.device | str | None = None,
        workspace: Workspace | None = None,
        precision: str = "float64",
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.channels = int(channels)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.workspace = workspace
        self.precision = precision
        self._rows = self.panel_rows(self.channels)  # the Gram's lower panel triangle is authoritative
        self._n = 0
        self._positions = 0
        self._pending: torch.Tensor | None = None  # float32 products not yet in the scatter (float32 path)
        self._pending_positions = 0
        self.stacked: Any = None  # the group's StackedState whose row holds this state (eigpipe.spectral.grouped)
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
        partial = CovarianceAccumulator(self.channels, self.device, self.workspace, self.precision)
        for indices, batch in groups:  # all sizes into a partial sum first: a bad image changes nothing
            partial._update_batch(batch, indices)
        self.merge(partial)

    def _buffer(self, shape: tuple[int, ...], dtype: torch.dtype, slot: int = 0) -> torch.Tensor:
        if self.workspace is not None:
            return self.workspace.get(shape, self.device, dtype, slot)
        return torch.empty(shape, dtype=dtype, device=self.device)

    def _update_batch(self, batch: torch.Tensor, indices: list[int]) -> None:
        """Fold N equal-sized images [N, C, H, W] into the state (NonFiniteFeature before any change)."""
        n, c, h, w = batch.shape
        self._settle()
        if c != self.channels:
            raise ValueError(f"expected {self.channels} channels, got {c}")
        if n == 0:  # no images: nothing to add (the means of an empty batch would be NaN)
            return
        if h * w == 0:
            raise ValueError("features with no spatial positions")
        if self.precision == "float32" and c >= self.NARROW:
            self._update_float32(batch.detach().reshape(n, c, h * w), indices)
        else:
            self._update_float64(batch, indices)

    def _update_float64(self, batch: torch.Tensor, indices: list[int]) -> None:
        """One (panel-triangular) float64 GEMM per batch.

        The operand is [C, N*P + N + 1]: the features centred per image, then the per-image mean
        deviations from the batch mean and Chan's cross term, both scaled by sqrt(P) so that the one
        GEMM with alpha 1/P adds W_batch + M2_batch + n_a n_b/(n_a+n_b) delta delta^T to the scatter.
        """
        n, c, h, w = batch.shape
        p = h * w
        shape = (c, n * p + n + 1)
        operand = self._buffer(shape, torch.float64)
        x = operand[:, : n * p].view(c, n, p)
        x.copy_(batch.detach().reshape(n, c, p).permute(1, 0, 2))
        means = x.mean(dim=2)  # [C, N]
        _check_finite(means, indices)
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
        self._positions += n * p

    def _update_float32(self, batch: torch.Tensor, indices: list[int]) -> None:
        """The float64 path's operand and GEMM in float32, into a float32 ``pending`` sum moved to the scatter
        every FLOAT32_FLUSH positions (or chunked, see FLOAT32_CHUNK); means and merges stay float64.

        Each image is centred by its float32 mean c (fused with the copy); its mean m = c + d adds the residual
        mean d of the centred values, exact to float64 round-off. W is taken about c, which adds d d^T: with
        |d| ~ 6e-8 |m|, a relative (6e-8 |m| / std)^2 of it, far below the float32 products' own error.
        """
        n, c, p = batch.shape
        batch = batch.float()
        centre = batch.mean(dim=2)  # [N, C]
        _check_finite(centre.T, indices)
        columns = n * p + n + 1
        chunk = self.FLOAT32_CHUNK.get(self.device.type) or columns
        width = math.ceil(columns / chunk) * chunk  # zero columns pad the last chunk
        operand = self._buffer((c, width), torch.float32)
        x = operand[:, : n * p].view(c, n, p)
        torch.sub(batch.permute(1, 0, 2), centre.T.unsqueeze(2), out=x)
        means = x.mean(dim=2).double().add_(centre.T)  # float64 [C, N]
        batch_mu = means.mean(dim=1)
        total = self._n + n
        delta = batch_mu - self._mu
        root_p = math.sqrt(p)
        operand[:, n * p : n * p + n].copy_(means.sub_(batch_mu.unsqueeze(1)).mul_(root_p))
        operand[:, n * p + n].copy_(delta * (root_p * math.sqrt(self._n * n / total)))
        if width > columns:
            operand[:, columns:].zero_()
        with ieee_float32():
            if width > chunk:
                self._gram_chunked(operand.view(c, width // chunk, chunk).transpose(0, 1), alpha=1.0 / p)
            else:
                self._gram_pending(operand, alpha=1.0 / p, positions=n * p)
        self._mu.add_(delta, alpha=n / total)
        self._n = total
        self._positions += n * p

    def _gram_pending(self, operand: torch.Tensor, alpha: float, positions: int) -> None:
        """pending += alpha * operand operand^T in float32, moved to the scatter every FLOAT32_FLUSH positions."""
        if self._pending is None:
            with torch.inference_mode(False):
                self._pending = torch.zeros_like(self._scatter, dtype=torch.float32)
        self._gram(operand, alpha, target=self._pending)
        self._pending_positions += positions
        if self._pending_positions >= self.FLOAT32_FLUSH:
            self._flush()

    def _flush(self) -> None:
        """Bring the state up to date (``_settle``) and move the pending float32 products into the float64 scatter."""
        self._settle()
        if self._pending_positions:
            self._scatter.add_(self._pending)
            self._pending.zero_()
            self._pending_positions = 0

    def _gram(self, operand: torch.Tensor, alpha: float, target: torch.Tensor | None = None) -> None:
        """target (the scatter) += alpha * operand operand^T: for wide layers, each panel of rows times the
        columns up to its diagonal block (the lower panel triangle)."""
        target = self._scatter if target is None else target
        rows = self._rows
        for i in range(0, operand.shape[0], rows):
            end = i + rows
            target[i:end, :end].addmm_(operand[i:end], operand[:end].T, alpha=alpha)

    def _gram_chunked(self, chunks: torch.Tensor, alpha: float) -> None:
        """scatter += alpha * sum_k chunks[k] chunks[k]^T: float32 products of [C, chunk] slices, summed in float64."""
        count, c, _ = chunks.shape
        group = max(1, min(count, self.GROUP_ELEMENTS // (c * c)))
        for start in range(0, count, group):
            part = chunks[start : start + group]
            products = torch.bmm(part, part.transpose(1, 2), out=self._buffer((len(part), c, c), torch.float32, 2))
            self._scatter.add_(products.sum(dim=0, dtype=torch.float64), alpha=alpha)

    def keep_state_in(self, mean: torch.Tensor, scatter: torch.Tensor) -> None:
        """Hold the running mean and scatter in the given float64 tensors from now on (rows of a group's stacked
        state, eigpipe.spectral.grouped), the current values copied in."""
        self._settle()
        mean.copy_(self._mu)
        scatter.copy_(self._scatter)
        self._mu, self._scatter = mean, scatter

    def count_batch(self, images: int, positions: int) -> None:
        """Count a batch whose statistics were merged into this accumulator's (stacked) state in place."""
        self._n += images
        self._positions += positions

    def _settle(self) -> None:
        """Bring the state up to date: a group's stacked state may hold this accumulator's latest images' means."""
        if self.stacked is not None:
            self.stacked.settle()

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
        self._settle()
        other._flush()
        self._merge_stats(other._n, other._mu.to(self.device), other._scatter.to(self.device))
        self._positions += other.positions
        return self

    # ---- state (DDP gather, resuming) -----------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        self._settle()
        return {
            "channels": self.channels,
            "precision": self.precision,
            "count": self._n,
            "positions": self.positions,
            "mean": self._mu.cpu(),
            "scatter": self._symmetric().cpu(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: torch.device | str | None = None) -> CovarianceAccumulator:
        acc = cls(state["channels"], device, precision=state["precision"])
        acc._n = int(state["count"])
        acc._positions = int(state["positions"])
        acc._mu.copy_(state["mean"])
        acc._scatter.copy_(state["scatter"])
        return acc

    # ---- results --------------------------------------------------------------------------------
    def _symmetric(self) -> torch.Tensor:
        """The full symmetric scatter (a new tensor), mirrored from its authoritative lower part."""
        self._flush()
        b = self._rows
        if b == self.channels:  # the whole Gram matrix was computed
            return (self._scatter + self._scatter.T).div_(2)
        full = self._scatter.clone()
        for i in range(0, self.channels, b):
            full[:i, i : i + b].copy_(full[i : i + b, :i].T)
            if self.precision == "float32":  # sgemm's diagonal blocks need not be exactly symmetric
                diagonal = full[i : i + b, i : i + b]
                diagonal.copy_((diagonal + diagonal.T).div_(2))
        return full

    @property
    def count(self) -> int:
        """Images seen."""
        self._settle()
        return self._n

    @property
    def positions(self) -> int:
        """Feature positions seen (over all images)."""
        self._settle()
        return self._positions

    @property
    def mean(self) -> torch.Tensor:
        """(1/n) sum_i mean_xy F_i, float64 [C]."""
        self._settle()
        return self._mu.clone()

    @property
    def covariance(self) -> torch.Tensor:
        """Centred covariance (second_moment - mean mean^T, computed without cancellation), float64 [C, C]."""
        if self.count == 0:
            raise ValueError("no images accumulated")
        return self._symmetric().div_(self._n)

    @property
    def second_moment(self) -> torch.Tensor:
        """The paper's uncentred matrix (1/n) sum_i mean_xy F F^T, float64 [C, C]."""
        if self.count == 0:
            raise ValueError("no images accumulated")
        return self._symmetric().div_(self._n).addr_(self._mu, self._mu)


def _check_finite(means: torch.Tensor, indices: list[int]) -> None:
    """NonFiniteFeature for the first image whose [C, N] column of per-image means is not finite."""
    if not math.isfinite(float(means.sum())):  # NaN or Inf anywhere makes the sum non-finite
        bad = ~torch.isfinite(means).all(dim=0)
        raise NonFiniteFeature(indices[int(bad.nonzero()[0, 0])])


def _group_by_shape(features: Sequence[torch.Tensor]) -> list[tuple[list[int], torch.Tensor]]:
    """Stack images of equal size so each size is one batched update (original indices kept)."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, f in enumerate(features):
        if f.dim() != 3:
            raise ValueError(f"image {i}: features must be [C,H,W], got shape {tuple(f.shape)}")
        by_shape.setdefault(tuple(f.shape), []).append(i)
    return [(idx, torch.stack([features[i] for i in idx])) for idx in by_shape.values()]
