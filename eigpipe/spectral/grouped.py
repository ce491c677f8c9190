"""One batched computation of the batch statistics of many small layers of equal shape (CPU).

A model's narrow layers cost little arithmetic each, so per-layer work is dominated by the fixed cost of a dozen
small tensor operations. Layers whose features in a batch have the same shape [N, C, H, W] and precision are
stacked: each image is centred on its own mean (as ``CovarianceAccumulator.update``), one batched Gram product per
group is summed into the group's held products, and the images' means are held; every few hundred images, and
before a layer's statistics are read, both are merged into the layers' own (Chan's formula, float64), whose running
states are held stacked per group so that the merge is batched too. In the float32 mode the products are float32
and each sum spans at most FLOAT32_FLUSH positions (one image's per product where ``per_image``, or at most
GROUPED_ELEMENTS / C positions) before the float64 sum: 1.7e-8 to 4.8e-8 relative on offset features over 40
batches (C 8 to 128), within the mode's 1e-6 budget (tests/test_grouped.py).
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
                    means, operand = centre(self._buffers[key][: len(group)], n, c, p)
                except GroupNonFinite as bad:  # name the member by its tag
                    raise GroupNonFinite(group[bad.tag][1], bad.index) from None
                targets = [target for target, _ in group]
                state = self._states.get(key)
                if state is None or not state.holds(targets):
                    state = self._states[key] = StackedState(targets)
                state.add(n * p, means, operand, 1.0 / p)

    def clear(self) -> None:
        """Forget the current batch's members (the buffers stay)."""
        self._members.clear()


class StackedState:
    """The running means and scatters of a group's accumulators, held as rows of two stacked tensors (each
    accumulator keeps its row), so that batches are merged into all of them by a few batched operations.

    A batch costs one Gram product and one copy per group: its products are summed into ``products`` (in the
    features' dtype; float32 sums span at most FLOAT32_FLUSH positions, as CovarianceAccumulator's) and its images'
    means are held; both are merged into the rows (Chan's formula, float64) every HELD_IMAGES images and before an
    accumulator is read (``settle``, which the accumulators call). Side by side, 4.07 against 4.90 ms added per
    float32 demo batch when every batch was merged."""

    HELD_IMAGES = 256

    def __init__(self, accs: list[CovarianceAccumulator]) -> None:
        self.accs = accs
        c = accs[0].channels
        with torch.inference_mode(False):  # updated in and out of inference mode
            self.means = torch.empty((len(accs), c), dtype=torch.float64)
            self.scatters = torch.empty((len(accs), c, c), dtype=torch.float64)
        self._held_means: torch.Tensor | None = None  # [L, room, C] the held images' means, float64
        self._held = 0  # images held
        self._held_positions = 0
        self._products: torch.Tensor | None = None  # sums of the held batches' Gram products, scaled by 1 / P
        self._span = 0  # positions each of those sums spans
        for acc, mean, scatter in zip(accs, self.means, self.scatters, strict=True):
            acc.keep_state_in(mean, scatter)
            acc.stacked = self

    def add(self, positions: int, means: torch.Tensor, operand: torch.Tensor, scale: float) -> None:
        """One batch of every accumulator (``centre``'s): its images' means [L, N, C] and its centred features,
        whose Gram products times ``scale`` (1 / P) are the within-image scatter."""
        images, held, products = means.shape[1], self._held_means, self._products
        if held is None or products is None:  # a state serves one shape: its buffers are made once
            c = means.shape[2]
            with torch.inference_mode(False):
                held = self._held_means = means.new_empty((len(self.accs), max(self.HELD_IMAGES, images), c))
                products = self._products = operand.new_zeros((len(operand), c, c))
        elif self._held + images > held.shape[1]:
            self.settle()
        products.baddbmm_(operand, operand.transpose(1, 2), alpha=scale)
        self._span += operand.shape[2]
        if self._span >= CovarianceAccumulator.FLOAT32_FLUSH:
            self._add_products()
        held[:, self._held : self._held + images].copy_(means)
        self._held += images
        self._held_positions += positions

    def _add_products(self) -> None:
        """Move the summed Gram products into the scatters (float64)."""
        if self._span:
            c = self.scatters.shape[1]
            self.scatters.add_(self._products.view(len(self.accs), -1, c, c).sum(dim=1))
            self._products.zero_()
            self._span = 0

    def settle(self) -> None:
        """Merge what is held (products, images' means) into the accumulators' states."""
        self._add_products()
        if not self._held:
            return
        images, positions, means = self._held, self._held_positions, self._held_means[:, : self._held]
        self._held = self._held_positions = 0
        batch_mean = means.mean(dim=1)
        deviations = means - batch_mean.unsqueeze(1)
        self._merge(images, positions, batch_mean, torch.bmm(deviations.transpose(1, 2), deviations))

    def holds(self, accs: list[CovarianceAccumulator]) -> bool:
        """Whether these are this state's accumulators, in its order, each still holding its row."""
        return len(accs) == len(self.accs) and all(
            acc is mine and acc.stacked is self for acc, mine in zip(accs, self.accs, strict=True)
        )

    def _merge(self, images: int, positions: int, means: torch.Tensor, scatters: torch.Tensor) -> None:
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


def centre(x: torch.Tensor, n: int, c: int, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre L batches laid out by ``_layout`` on each image's mean, in place: (the means [L, N, C] in float64,
    the centred features as the operand of their Gram products: [L * N, C, P] per image, else [L, C, N * P]).
    Raises GroupNonFinite (tag: the batch's index among the L) for the first non-finite image."""
    images_first, size = per_image(c, p), len(x)
    first = x.mean(dim=3, keepdim=True)
    x.sub_(first)
    means = first[..., 0]
    if x.dtype != torch.float64:  # a float32 mean: the residual mean of the centred values makes it exact
        means = means.double().add_(x.sum(dim=3), alpha=1.0 / p)
    means = means if images_first else means.transpose(1, 2)  # [L, N, C]
    if not math.isfinite(float(means.sum())):
        bad = (~torch.isfinite(means).all(dim=2)).nonzero()[0]
        raise GroupNonFinite(int(bad[0]), int(bad[1]))
    return means, x.view(size * n, c, p) if images_first else x.view(size, c, n * p)
