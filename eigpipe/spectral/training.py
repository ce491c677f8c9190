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

import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from eigpipe.errors import EigpipeError, require_whole
from eigpipe.provenance import check_writable
from eigpipe.spectral.store import COVARIANCE_STORE
from eigpipe.spectral.track import Tracker

STEP_STORE = re.compile(r"\d+\.zarr")


class TrainingTracker:
    """A Tracker that publishes ``<folder>/<step>.zarr`` every ``save_every`` calls of ``step()``."""

    def __init__(
        self, model: nn.Module, layers: str | Sequence[str], folder: str | Path, save_every: int, **options: Any
    ):
        require_whole("save_every", save_every, 1)
        self.folder, self.save_every = Path(folder).expanduser(), save_every
        self.tracker = Tracker(model, layers, **options)
        self.earlier = _earlier_stores(self.folder)
        self.steps = 0
        self.saved: list[Path] = []

    def __enter__(self) -> TrainingTracker:
        self.tracker.__enter__()
        if self.earlier:
            warnings.warn(
                f"eigpipe.track_training: {self.folder} holds {self.earlier} covariance store(s) of an earlier run; "
                "those of steps this run does not reach will stay (and go into eigpipe dimensions with the new ones)",
                stacklevel=2,
            )
            self.earlier = 0  # said once
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
        if not self.tracker.batches_taken:
            first = self.steps - self.save_every + 1
            warnings.warn(
                f"eigpipe.track_training: no batch was taken in steps {first}-{self.steps} "
                f"(every={self.tracker.every}): no store for step {self.steps}",
                stacklevel=2,
            )
            return None
        path = self.tracker.save(self.folder / f"{self.steps}.zarr", iteration=self.steps)
        self.tracker.reset()
        self.saved.append(path)
        return path


def _earlier_stores(folder: Path) -> int:
    """Check a folder for the stores now (not at the first save): how many covariance stores it holds already."""
    if folder.exists() and not folder.is_dir():
        raise EigpipeError(f"{folder}: is a file, not a folder for the training stores")
    if (folder / "zarr.json").exists():
        raise EigpipeError(f"{folder}: is a zarr store, not a folder for the training stores")
    check_writable(folder / "0.zarr")
    stores = [path for path in folder.iterdir() if STEP_STORE.fullmatch(path.name)] if folder.is_dir() else []
    foreign = next((path for path in sorted(stores) if not COVARIANCE_STORE.is_own(path)), None)
    if foreign is not None:
        raise EigpipeError(
            f"{foreign}: exists and is not {COVARIANCE_STORE.description}; track_training writes <step>.zarr "
            "stores there (move it away or choose another folder)"
        )
    return sum(1 for path in stores if (path / "zarr.json").is_file())  # an empty folder is no store


def track_training(
    model: nn.Module, layers: str | Sequence[str], folder: str | Path, save_every: int, **options: Any
) -> TrainingTracker:
    """Write one covariance store of ``model``'s selected layers every ``save_every`` training steps into
    ``folder`` (named by step); ``options`` are those of ``eigpipe.track`` (``every`` thins the batches taken)."""
    return TrainingTracker(model, layers, folder, save_every, **options)
