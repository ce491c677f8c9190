"""The feature-tap interface of models/: which module's output is a layer's feature, and how often it runs."""

import pytest

from eigpipe.layer_paths import canonical
from eigpipe.models import Classifier, build_body, build_detector
from eigpipe.models.taps import feature_tap, runner_path, runs_per_region


@pytest.fixture(scope="module")
def convfc_detector(complete):
    cfg = complete(
        "model",
        {
            "width_multiplier": 0.0625,
            "norm": "gn",
            "gn_groups": 4,
            "fpn_channels": 16,
            "box_head": {"type": "convfc", "conv_layers": [16, 16], "representation_size": 32},
            "mask_head_layers": [16],
            "min_size": 64,
            "max_size": 64,
        },
    )
    return build_detector("mask_rcnn", cfg, num_classes=3)


@pytest.mark.parametrize(
    ("layer", "tap"),
    [
        ("backbone.body.conv1", "backbone.body.relu"),
        ("backbone.body.layer1.0.conv1", "backbone.body.layer1.0.relu1"),
        ("backbone.body.layer3.2.conv2", "backbone.body.layer3.2.relu2"),
        ("backbone.body.layer4.0.conv3", "backbone.body.layer4.0.bn3"),  # before the residual sum
        ("backbone.body.layer2.0.downsample.0", "backbone.body.layer2.0.downsample.1"),
        ("backbone.body.layer2.0", "backbone.body.layer2.0"),  # a block: its own output
        ("backbone.fpn.layer_blocks.0", "backbone.fpn.layer_blocks.0"),
        ("backbone.fpn.layer_blocks.0.0", "backbone.fpn.layer_blocks.0.0"),  # no norm or activation follows
        ("roi_heads.box_head.0.0", "roi_heads.box_head.0.2"),  # Conv2dNormActivation: conv, GN, ReLU
        ("roi_heads.mask_head.0.0", "roi_heads.mask_head.0.1"),  # conv, ReLU (no norm without fpn_norm)
        ("roi_heads.box_head.3", "roi_heads.box_head.3"),
    ],  # the fc layer
)
def test_feature_tap_of_detector_layers(convfc_detector, layer, tap):
    assert feature_tap(convfc_detector, layer) == tap


def test_regions_and_runners(convfc_detector, tiny_model):
    assert runs_per_region(convfc_detector, "roi_heads.box_head.0.0")
    assert runs_per_region(convfc_detector, "roi_heads.mask_head.0.0")
    assert not runs_per_region(convfc_detector, "backbone.body.layer1.0.conv1")
    assert not runs_per_region(convfc_detector, "rpn.head.conv.0.0")
    assert runner_path(convfc_detector, ["backbone.body.conv1", "backbone.body.layer4.0"]) == "backbone.body"
    assert runner_path(convfc_detector, ["backbone.body.conv1", "backbone.fpn.layer_blocks.0"]) == "backbone"
    assert runner_path(convfc_detector, ["backbone.body.conv1", "roi_heads.box_head.0.0"]) is None
    classifier = Classifier(build_body(tiny_model), 5)
    assert feature_tap(classifier, "body.conv1") == "body.relu"
    assert not runs_per_region(classifier, "body.conv1")
    assert runner_path(classifier, ["body.layer1.0.conv1"]) == "body"
    assert runner_path(classifier, ["fc"]) is None
    body = build_body(tiny_model)
    assert feature_tap(body, "conv1") == "relu" and feature_tap(body, "layer1.0.conv2") == "layer1.0.relu2"


def test_canonical_names_line_up_across_models():
    assert canonical("backbone.body.layer1.0.conv2") == canonical("body.layer1.0.conv2") == "layer1.0.conv2"
    assert canonical("backbone.fpn.layer_blocks.0") == "backbone.fpn.layer_blocks.0"
