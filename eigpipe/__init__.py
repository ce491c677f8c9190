"""eigpipe: the eigenspectrum study of pre-trained vs scratch object detectors as a Snakemake workflow, and the
eigenspectrum analysis of any PyTorch model as a library (``eigpipe.track``, ``eigpipe.track_training``)."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# The library's public names, imported on first use: the table stages (spectrum, dimensions, report) import this
# package and must start without torch.
_LAZY = {
    "track": "eigpipe.spectral.track",
    "Tracker": "eigpipe.spectral.track",
    "track_training": "eigpipe.spectral.training",
    "TrainingTracker": "eigpipe.spectral.training",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'eigpipe' has no attribute {name!r}")
