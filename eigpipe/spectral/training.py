"""Eigenspectrum dynamics of a model while it trains: one covariance store every K optimiser steps.

```python
with eigpipe.track_training(model, ["Conv2d:*"], "dynamics/", save_every=100) as recorder:
    for images, labels in loader:
        loss = criterion(model(images), labels)
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        recorder.step()            # every 100 steps: dynamics/<step>.zarr, then afresh
```

Each store holds the statistics of the training batches of the steps since the previous one (features as the
model computes them while it trains, from detached outputs), with ``iteration`` = the step; the steps after the last
multiple of K are published when the ``with`` block ends without error. ``eigpipe spectrum``
on each store, then ``eigpipe dimensions`` and ``eigpipe report``, show the dynamics as for the pipeline's runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from eigpipe.errors import require_whole
from eigpipe.spectral.track import Tracker


class TrainingTracker:
    """A Tracker that publishes ``<folder>/<step>.zarr`` every ``save_every`` calls of ``step()``."""

    def __init__(
        self, model: nn.Module, layers: str | Sequence[str], folder: str | Path, save_every: int, **options: Any
    ):
        require_whole("save_every", save_every, 1)
        self.folder, self.save_every = Path(folder), save_every
        self.tracker = Tracker(model, layers, **options)
        self.steps = 0
        self.saved: list[Path] = []

    def __enter__(self) -> TrainingTracker:
        self.tracker.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        """Remove the hooks; after a run that ended without error, publish the steps since the last store (if any
        forward pass was taken in them) as ``<step>.zarr``, so that the dynamics reach the last step."""
        self.tracker.__exit__(exc_type, *exc)
        if exc_type is None and self.steps % self.save_every and self.tracker.hooks.streams:
            self.saved.append(self.tracker.save(self.folder / f"{self.steps}.zarr", iteration=self.steps))

    def step(self) -> Path | None:
        """Count one optimiser step; every ``save_every`` steps, publish the store and start afresh."""
        self.steps += 1
        if self.steps % self.save_every:
            return None
        path = self.tracker.save(self.folder / f"{self.steps}.zarr", iteration=self.steps)
        self.tracker.reset()
        self.saved.append(path)
        return path


def track_training(
    model: nn.Module, layers: str | Sequence[str], folder: str | Path, save_every: int, **options: Any
) -> TrainingTracker:
    """Write one covariance store of ``model``'s selected layers every ``save_every`` training steps into
    ``folder`` (named by step); ``options`` are those of ``eigpipe.track`` (``every`` thins the batches taken)."""
    return TrainingTracker(model, layers, folder, save_every, **options)
