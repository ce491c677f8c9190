"""The feature-tap interface: which module's output is a layer's feature, and how often that module runs.

A conv's feature is its post-activation output: the ReLU after its norm where one follows (the stem and
each bottleneck's conv1/conv2, torchvision's Conv2dNormActivation heads), its norm where the residual sum
comes first (conv3, the downsample conv), or the conv itself. The answers come from the model classes
eigpipe builds, not from module names or class-name patterns.
"""

from __future__ import annotations

from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork

from eigpipe.errors import EigpipeError
from eigpipe.layer_paths import CLASSIFIER_BODY, DETECTOR_BODY
from eigpipe.models.classifier import Classifier
from eigpipe.models.resnet import Bottleneck, ResNet

NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, FrozenBatchNorm2d)
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Hardswish, nn.Sigmoid, nn.Tanh)
# torchvision's detector parts whose forward returns no feature tensor (a tuple, a list or a dict of maps, by their
# annotations in detection/transform.py, backbone_utils.py, ops/feature_pyramid_network.py, detection/rpn.py,
# detection/roi_heads.py, detection/anchor_utils.py and models/_utils.py)
NO_FEATURE_TENSOR = (
    GeneralizedRCNNTransform,
    BackboneWithFPN,
    IntermediateLayerGetter,
    FeaturePyramidNetwork,
    ExtraFPNBlock,
    RPNHead,
    RegionProposalNetwork,
    RoIHeads,
    AnchorGenerator,
)
STEM_TAP = {"conv1": "relu"}  # the ResNet stem: conv1 -> bn1 -> relu (also inside BackboneWithFPN's body)


def is_detector(model: nn.Module) -> bool:
    """Whether the model is a torchvision detector (its forward takes a list of images and transforms them)."""
    return isinstance(model, GeneralizedRCNN)


def built_by_eigpipe(model: nn.Module) -> bool:
    """Whether the model is one eigpipe builds (a detector, classifier or bare ResNet around eigpipe's ResNet body):
    its layers are measured at their feature taps; any other model's at the selected modules' own outputs."""
    body = body_path(model)
    if body is None:
        return False
    try:
        found = model.get_submodule(body) if body else model  # a detector's is an IntermediateLayerGetter of it
    except AttributeError:  # a torchvision detector around another backbone
        return False
    return any(isinstance(module, Bottleneck) for module in found.modules())


def body_path(model: nn.Module) -> str | None:
    """Module path of the ResNet body of a detector, classifier or bare ResNet ("" for the ResNet itself)."""
    if is_detector(model):
        return DETECTOR_BODY
    if isinstance(model, Classifier):
        return CLASSIFIER_BODY
    if isinstance(model, ResNet):
        return ""
    return None


def _join(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child


def feature_tap(model: nn.Module, path: str) -> str:
    """The path of the module whose output is the feature of layer ``path`` (``path`` itself if not a conv)."""
    module = _submodule(model, path)
    if not isinstance(module, nn.Conv2d):
        return path
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if isinstance(parent, Bottleneck):
        return _join(parent_path, Bottleneck.FEATURE_TAPS[attr]) if attr in Bottleneck.FEATURE_TAPS else path
    if parent_path == body_path(model) and attr in STEM_TAP:
        return _join(parent_path, STEM_TAP[attr])
    if isinstance(parent, nn.Sequential):
        names = list(parent._modules)
        tap = attr
        for following in names[names.index(attr) + 1 :]:
            if not isinstance(parent._modules[following], NORMS + ACTIVATIONS):
                break
            tap = following
        return _join(parent_path, tap)
    return path


def runs_per_region(model: nn.Module, path: str) -> bool:
    """True where the module runs once per region of interest (a detector's RoI heads), not once per image."""
    if not is_detector(model):
        return False
    module = _submodule(model, path)
    return any(module is m for m in model.roi_heads.modules())


def runner_path(model: nn.Module, paths: list[str]) -> str | None:
    """The smallest part of the model whose forward on a batched image tensor runs every module in ``paths``:
    the ResNet body, a detector's backbone (body + FPN), or None for the whole model."""
    body = body_path(model)
    candidates = [body, "backbone"] if is_detector(model) else [body]
    for candidate in candidates:
        if candidate and all(p.startswith(f"{candidate}.") for p in paths):
            return candidate
    return None


def _submodule(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise EigpipeError(f"layer {path}: not a module of the model") from None
