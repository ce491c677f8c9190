"""Configurable-width ResNet bodies, torchvision detectors around them, and their checkpoints."""

from eigpipe.models.checkpoint import build_model, load_checkpoint, load_pretrained_body, save_checkpoint
from eigpipe.models.classifier import Classifier
from eigpipe.models.detector import build_backbone, build_body, build_detector, build_transform
from eigpipe.models.resnet import Bottleneck, ResNet
from eigpipe.models.widths import WidthSpec, from_model_config, standard

__all__ = [
    "Bottleneck",
    "Classifier",
    "ResNet",
    "WidthSpec",
    "build_backbone",
    "build_body",
    "build_detector",
    "build_model",
    "build_transform",
    "from_model_config",
    "load_checkpoint",
    "load_pretrained_body",
    "save_checkpoint",
    "standard",
]
