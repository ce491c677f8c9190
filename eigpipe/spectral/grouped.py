"""One batched computation of the batch statistics of many small layers of equal shape (CPU).

A model's narrow layers cost little arithmetic each, so per-layer work is dominated by the fixed cost of a dozen
small tensor operations. Layers whose features in a batch have the same shape [N, C, H, W] and precision are
stacked: their batch means and scatters (per-image centring, as ``CovarianceAccumulator.update``) come from one
batched Gram product, and merged into the layers' own statistics (Chan's formula, float64), whose running states are
held stacked per group so that the merge is batched too. In the float32 mode the products are float32 and each spans
one image's positions (``per_image``) or at most GROUPED_ELEMENTS / C positions before the float64 sum: 2e-8 to
6e-8 relative on offset features (C 8 to 256), within the mode's 1e-6 budget (tests/test_grouped.py).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from eigpipe.spectral.accumulator import CovarianceAccumulator, NonFiniteFeature

GROUPED_ELEMENTS = 1 << 18  # features of at most this many elements per batch are computed in groups


class GroupNonFinite(NonFiniteFeature):
    """A non-finite feature in image ``index`` of the batch added with ``tag``."""

    def __init__(self, tag: Any, index: int) -> None:
        super().__init__(index)
        self.tag = tag


def small_map(feats: object) -> bool:
    """Whether features are one [N, C, H, W] tensor small enough for a group."""
    return isinstance(feats, torch.Tensor) and feats.dim() == 4 and 0 < feats.numel() <= GROUPED_ELEMENTS


def groupable(feats: object, device: torch.device) -> bool:
    """Whether a batch of features may join a group: one small [N, C, H, W] tensor on the CPU."""
    return device.type == "cpu" and small_map(feats)


class BatchGroups:
    """The small layers' features of one batch, copied as they come (later in-place operations of the model cannot
    change them) into one buffer per shape and precision; ``flush`` merges each into its target at the batch's end.
    The buffers are kept for the next batch and the tracker's next ``with`` (allocated anew, they would cost a
    batch's worth of page faults each time)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._members: dict[tuple, list[tuple[CovarianceAccumulator, Any]]] = {}
        self._slots: dict[tuple, list[torch.Tensor]] = {}  # views of the buffers' slots, made when they grow
        self._states: dict[tuple, StackedState] = {}  # the members' running states, stacked, per shape

    def add(self, target: CovarianceAccumulator, feats: torch.Tensor, tag: Any = None) -> None:
        """Copy a detached [N, C, H, W] batch in; ``tag`` is what GroupNonFinite names if it is not finite."""
        key = (*feats.shape, target.precision)
        members = self._members.setdefault(key, [])
        slots = self._slots.get(key)
        if slots is None or len(slots) == len(members):
            slots = self._grow(key, 2 * len(members) + 1)
        slots[len(members)].copy_(feats)
        members.append((target, tag))

    def _grow(self, key: tuple, size: int) -> list[torch.Tensor]:
        """Room for ``size`` members of a group (what it held is kept); each member's slot as a [N, C, H, W] view."""
        n, c, h, w, precision = key
        with torch.inference_mode(False):  # usable in and out of inference mode
            grown = torch.empty((size, *_layout(n, c, h * w)), dtype=_dtype(precision))
        held = self._buffers.get(key)
        if held is not None:
            grown[: len(held)].copy_(held)
        self._buffers[key] = grown
        images_first = per_image(c, h * w)
        slots = [slot.view(n, c, h, w) if images_first else slot.view(c, n, h, w).transpose(0, 1) for slot in grown]
        self._slots[key] = slots
        return slots

    def flush(self) -> None:
        """Merge every group's batch statistics into the targets; raises GroupNonFinite before merging a group."""
        members, self._members = self._members, {}
        with torch.autocast("cpu", enabled=False):
            for key, group in members.items():
                n, c, h, w, _ = key
                p = h * w
                try:
                    means, scatters = batch_statistics(self._buffers[key][: len(group)], n, c, p)
                except GroupNonFinite as bad:  # name the member by its tag
                    raise GroupNonFinite(group[bad.tag][1], bad.index) from None
                targets = [target for target, _ in group]
                state = self._states.get(key)
                if state is None or not state.holds(targets):
                    state = self._states[key] = StackedState(targets)
                state.merge(n, n * p, means, scatters)

    def clear(self) -> None:
        """Forget the current batch's members (the buffers stay)."""
        self._members.clear()


class StackedState:
    """The running means and scatters of a group's accumulators, held as rows of two stacked tensors (each
    accumulator keeps its row), so that one batch is merged into all of them by a few batched operations."""

    def __init__(self, accs: list[CovarianceAccumulator]) -> None:
        self.accs = accs
        c = accs[0].channels
        with torch.inference_mode(False):  # updated in and out of inference mode
            self.means = torch.empty((len(accs), c), dtype=torch.float64)
            self.scatters = torch.empty((len(accs), c, c), dtype=torch.float64)
        for acc, mean, scatter in zip(accs, self.means, self.scatters, strict=True):
            acc.keep_state_in(mean, scatter)
            acc.stacked = self

    def holds(self, accs: list[CovarianceAccumulator]) -> bool:
        """Whether these are this state's accumulators, in its order, each still holding its row."""
        return len(accs) == len(self.accs) and all(
            acc is mine and acc.stacked is self for acc, mine in zip(accs, self.accs, strict=True)
        )

    def merge(self, images: int, positions: int, means: torch.Tensor, scatters: torch.Tensor) -> None:
        """Chan's merge of each accumulator's batch (images, mean, scatter about it) into its row: the rows of
        accumulators that have seen equally many images at once (all of them, as a rule)."""
        by_count: dict[int, list[int]] = {}
        for i, acc in enumerate(self.accs):
            by_count.setdefault(acc.count, []).append(i)
        for count, members in by_count.items():
            total, whole = count + images, len(members) == len(self.accs)
            rows = None if whole else torch.tensor(members)
            part_means, part, mine = (
                (means, scatters, self.means) if whole else (means[rows], scatters[rows], self.means[rows])
            )
            delta = part_means - mine
            part.baddbmm_(delta.unsqueeze(2), delta.unsqueeze(1), alpha=count * images / total)
            if whole:  # in place (index_add_ measured 0.3-0.7 ms slower per demo batch)
                self.scatters.add_(part)
                self.means.add_(delta, alpha=images / total)
            else:
                self.scatters.index_add_(0, rows, part)
                self.means.index_add_(0, rows, delta, alpha=images / total)
            for i in members:
                self.accs[i].count_batch(images, positions)


def per_image(c: int, p: int) -> bool:
    """Whether a layer's Gram product is taken per image: narrow layers (a narrow GEMM over all positions runs far
    below peak, and a float32 sum spans one image), and layers with at least as many positions as channels (their
    features are copied as they are; a channel-major copy measured 0.4 ms slower per demo batch)."""
    return c < CovarianceAccumulator.NARROW or p >= c


def _layout(n: int, c: int, p: int) -> tuple[int, int, int]:
    """Images first where the products are per image; else one product per layer over all its positions, channels
    first."""
    return (n, c, p) if per_image(c, p) else (c, n, p)


def _dtype(precision: str) -> torch.dtype:
    return torch.float32 if precision == "float32" else torch.float64


def batch_statistics(x: torch.Tensor, n: int, c: int, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(means [L, C], scatters [L, C, C]) in float64 of L batches laid out by ``_layout`` (centred in place): the
    per-image-weighted mean and the scatter about it (W / P + sum_i (m_i - m)(m_i - m)^T, P positions per image).
    Raises GroupNonFinite (tag: the batch's index among the L) for the first non-finite image."""
    images_first, size = per_image(c, p), len(x)
    centre = x.mean(dim=3, keepdim=True)
    x.sub_(centre)
    means = centre[..., 0].double().add_(x.sum(dim=3), alpha=1.0 / p)  # the centre plus the residual mean
    means = means if images_first else means.transpose(1, 2)  # [L, N, C]
    if not math.isfinite(float(means.sum())):
        bad = (~torch.isfinite(means).all(dim=2)).nonzero()[0]
        raise GroupNonFinite(int(bad[0]), int(bad[1]))
    if images_first:
        images = x.view(size * n, c, p)
        within = torch.bmm(images, images.transpose(1, 2)).view(size, n, c, c).sum(dim=1, dtype=torch.float64)
    else:
        flat = x.view(size, c, n * p)
        within = torch.bmm(flat, flat.transpose(1, 2)).to(torch.float64)
    batch_mean = means.mean(dim=1)
    deviations = means - batch_mean.unsqueeze(1)
    scatter = torch.baddbmm(within, deviations.transpose(1, 2), deviations, beta=1.0 / p)
    return batch_mean, scatter
