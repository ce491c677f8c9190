"""Statistics kept per fold of the images as well as merged (``covariance.folds``), so that a jackknife over the
folds gives every layer's measures a standard error.

The images are split into K folds of consecutive positions in the extraction order (sizes differ by at most one).
The merged state is a plain accumulator's, changed by the same calls in the same order, so the merged statistics
are bitwise those of an extraction without folds; each image is also folded into its own fold's accumulator, a
second Gram product per image (about twice the Gram work) and K more [C, C] states per layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from eigpipe.config import fold_problem
from eigpipe.errors import EigpipeError
from eigpipe.spectral.accumulator import CovarianceAccumulator, FeatureBatch
from eigpipe.spectral.buffers import Workspace

ASSIGNMENT = "consecutive blocks of the image order: position p of n goes to fold floor(p * K / n)"


@dataclass(frozen=True)
class FoldPlan:
    """Which fold each image id belongs to."""

    count: int
    of: Mapping[Any, int]

    @classmethod
    def consecutive(cls, image_ids: Sequence[Any], count: int) -> FoldPlan:
        n = len(image_ids)
        if problem := fold_problem(count, n):
            raise EigpipeError(f"covariance.folds: {problem}")
        return cls(count, {image_id: p * count // n for p, image_id in enumerate(image_ids)})

    def sizes(self) -> list[int]:
        found = [0] * self.count
        for fold in self.of.values():
            found[fold] += 1
        return found


class FoldedAccumulator(CovarianceAccumulator):
    """A CovarianceAccumulator (the merged statistics) that also keeps one accumulator per fold of the images;
    ``update`` takes each image's fold."""

    def __init__(
        self,
        channels: int,
        device: torch.device | str | None = None,
        workspace: Workspace | None = None,
        precision: str = "float64",
        folds: int = 2,
    ) -> None:
        super().__init__(channels, device, workspace, precision)
        self.folds = [CovarianceAccumulator(channels, device, workspace, precision) for _ in range(folds)]

    def update(self, features: FeatureBatch, folds: Sequence[int] | None = None) -> None:  # type: ignore[override]
        """Add images (as CovarianceAccumulator.update) of the given folds, one fold index per image."""
        if folds is None:
            raise ValueError("a folded accumulator needs the fold of each image")
        super().update(features)  # first: a non-finite feature raises before any state changes
        self.update_folds(features, folds)

    def update_folds(self, features: FeatureBatch, folds: Sequence[int]) -> None:
        """Add images to their folds' statistics only (the merged ones: ``update``, or eigpipe.spectral.grouped)."""
        batch = features.unsqueeze(0) if isinstance(features, torch.Tensor) and features.dim() == 3 else features
        if len(folds) != len(batch):
            raise ValueError(f"{len(folds)} fold indices for {len(batch)} images")
        for fold in sorted(set(folds)):
            members = [i for i, f in enumerate(folds) if f == fold]
            if len(members) == len(batch):
                part = batch
            elif isinstance(batch, torch.Tensor):
                part = batch[members]
            else:
                part = [batch[i] for i in members]
            self.folds[fold].update(part)

    def merge(self, other: CovarianceAccumulator) -> FoldedAccumulator:
        """Fold another accumulator of the same layer in: its folds into ours when it has them (DDP ranks)."""
        super().merge(other)
        if isinstance(other, FoldedAccumulator):
            if len(other.folds) != len(self.folds):
                raise ValueError(f"cannot merge {len(other.folds)} folds into {len(self.folds)}")
            for mine, theirs in zip(self.folds, other.folds, strict=True):
                mine.merge(theirs)
        return self

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "folds": [fold.state_dict() for fold in self.folds]}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: torch.device | str | None = None) -> FoldedAccumulator:
        acc = cls(state["channels"], device, precision=state["precision"], folds=len(state["folds"]))
        merged = CovarianceAccumulator.from_state_dict({k: v for k, v in state.items() if k != "folds"}, device)
        acc._n, acc._positions = merged._n, merged.positions
        acc._mu.copy_(merged._mu)
        acc._scatter.copy_(merged._scatter)
        acc.folds = [CovarianceAccumulator.from_state_dict(fold, device) for fold in state["folds"]]
        return acc

    def fold_arrays(self) -> dict[str, torch.Tensor]:
        """``fold_second_moment`` [K, C, C] and ``fold_mean`` [K, C] (float64; an empty fold is all NaN)."""
        nan_matrix = torch.full((self.channels, self.channels), float("nan"), dtype=torch.float64)
        moments = [fold.second_moment.cpu() if fold.count else nan_matrix for fold in self.folds]
        means = [fold.mean.cpu() if fold.count else nan_matrix[0] for fold in self.folds]
        return {"fold_second_moment": torch.stack(moments), "fold_mean": torch.stack(means)}

    @property
    def fold_counts(self) -> list[int]:
        return [fold.count for fold in self.folds]


def from_state(state: dict[str, Any], device: torch.device | str | None = None) -> CovarianceAccumulator:
    """The accumulator a state_dict came from: folded when it has folds."""
    if "folds" in state:
        return FoldedAccumulator.from_state_dict(state, device)
    return CovarianceAccumulator.from_state_dict(state, device)
