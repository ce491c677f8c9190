"""Configurable-width ResNet bodies, torchvision detectors around them, and their checkpoints.

The names below load their module on first use (PEP 562), so the torch-free modules of this package
(``widths``, ``cost``) serve the workflow's checks at DAG start without importing torch.
"""

from importlib import import_module
from typing import Any

_MODULE_OF = {
    "build_model": "checkpoint",
    "load_checkpoint": "checkpoint",
    "load_pretrained_body": "checkpoint",
    "save_checkpoint": "checkpoint",
    "Classifier": "classifier",
    "build_backbone": "detector",
    "build_body": "detector",
    "build_detector": "detector",
    "build_transform": "detector",
    "Bottleneck": "resnet",
    "ResNet": "resnet",
    "WidthSpec": "widths",
    "from_model_config": "widths",
    "standard": "widths",
}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"eigpipe.models.{_MODULE_OF[name]}"), name)
