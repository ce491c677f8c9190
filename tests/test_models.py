"""Widths specs, the configurable ResNet, torchvision-compatible weights, detectors and complexity."""

import pytest
import torch
import torchvision
import yaml
from torch import nn

from eigpipe import cli, complexity, config
from eigpipe.errors import ConfigError, EigpipeError
from eigpipe.models import (
    WidthSpec,
    build_body,
    build_detector,
    load_checkpoint,
    load_pretrained_body,
    save_checkpoint,
    standard,
)
from eigpipe.models.checkpoint import widths_from_state_dict


def model_section(**partial: object) -> dict:
    return config.validate(dict(partial), "test", config.schema()["properties"]["model"])


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_widths_spec_round_trip(tmp_path, suffix):
    spec = standard(multiplier=0.5)
    edited = WidthSpec.from_dict({**spec.to_dict(), "stem": 24})
    path = tmp_path / f"widths{suffix}"
    edited.save(path)
    assert WidthSpec.load(path) == edited
    assert WidthSpec.load(path).stem == 24


def test_widths_spec_errors_name_the_key(tmp_path):
    data = standard().to_dict()
    data["stages"][2]["blocks"][1] = [64, -3]
    with pytest.raises(ConfigError, match=r"stages\.2\.blocks\.1\.1"):
        WidthSpec.from_dict(data)
    with pytest.raises(ConfigError, match="not found"):
        WidthSpec.load(tmp_path / "missing.yaml")


def test_body_uses_every_width_of_the_spec():
    data = standard(multiplier=0.25).to_dict()
    data["stages"][1]["blocks"][2] = [5, 7]
    data["stages"][3]["out"] = 96
    body = build_body(model_section(**{"norm": "gn", "gn_groups": 4}), WidthSpec.from_dict(data))
    assert body.layer2[2].conv1.out_channels == 5 and body.layer2[2].conv2.out_channels == 7
    assert body.layer4[0].downsample[0].out_channels == 96 and body.layer4[2].conv3.out_channels == 96
    assert widths_from_state_dict(body.state_dict()).to_dict() == data
    assert body(torch.rand(1, 3, 64, 64)).shape == (1, 96, 2, 2)


def test_groupnorm_groups_divide_narrow_layers():
    body = build_body(model_section(**{"norm": "gn", "gn_groups": 32, "width_multiplier": 0.125}))
    norms = [m for m in body.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.num_channels % m.num_groups == 0 for m in norms)
    assert body.bn1.num_groups == 8  # 8 channels, gcd(8, 32)


def test_standard_body_loads_torchvision_resnet50_weights(tmp_path):
    reference = torchvision.models.resnet50()
    path = tmp_path / "resnet50.pth"
    torch.save(reference.state_dict(), path)
    body = build_body(model_section(**{"norm": "frozen_bn"}))
    unused = load_pretrained_body(body, path)
    assert unused == []
    with pytest.raises(
        EigpipeError, match=r"BatchNorm-trained weights \(bn1\.running_var\) cannot initialise a GroupNorm"
    ):
        load_pretrained_body(build_body(model_section(**{"norm": "gn"})), path)
    gn_unused = load_pretrained_body(build_body(model_section(**{"norm": "gn"})), path, bn_into_gn=True)
    assert "layer2.1.bn2.running_mean" in gn_unused and not any(k.endswith("weight") for k in gn_unused)
    assert torch.equal(body.layer3[4].conv2.weight, reference.layer3[4].conv2.weight)
    assert torch.equal(body.layer1[0].bn1.running_var, reference.layer1[0].bn1.running_var)
    assert complexity.count_params(body) == 23_508_032
    classifier, meta = load_checkpoint(path)
    assert meta["model_name"] == "classifier" and meta["num_classes"] == 1000
    x = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(classifier(x), reference.eval()(x))


def test_pretrained_weights_of_other_widths_are_refused(tmp_path, tiny_model):
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    with pytest.raises(EigpipeError, match=r"conv1\.weight has shape \[64, 3, 7, 7\].*\[4, 3, 7, 7\]"):
        load_pretrained_body(build_body(tiny_model), path)


@pytest.mark.parametrize("name", ["faster_rcnn", "mask_rcnn"])
def test_detector_trains_and_predicts(name, tiny_model):
    torch.manual_seed(0)
    model = build_detector(name, tiny_model, num_classes=4)
    image = torch.rand(3, 64, 64)
    target = {
        "boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]),
        "labels": torch.tensor([2]),
        "masks": torch.zeros(1, 64, 64, dtype=torch.uint8),
    }
    target["masks"][0, 6:40, 4:30] = 1
    losses = model([image], [target])
    expected = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert expected <= set(losses) and (name == "faster_rcnn") == ("loss_mask" not in losses)
    sum(losses.values()).backward()
    model.eval()
    out = model([image])[0]
    assert out["boxes"].shape[1] == 4 and ("masks" in out) == (name == "mask_rcnn")


def test_checkpoint_round_trip(tmp_path, tiny_model):
    model = build_detector("faster_rcnn", tiny_model, num_classes=3)
    widths = standard(multiplier=0.0625).to_dict()
    meta = {
        "task": "detection",
        "model_name": "faster_rcnn",
        "model_config": tiny_model,
        "widths": widths,
        "num_classes": 3,
        "iteration": 7,
        "run": "r",
    }
    save_checkpoint(tmp_path / "c.pt", model, meta)
    loaded, got = load_checkpoint(tmp_path / "c.pt")
    assert got["iteration"] == 7 and len(got["sha256"]) == 64
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


@pytest.mark.parametrize(
    ("write", "why"),
    [
        (lambda p: p.write_text("not a checkpoint"), r"a damaged file or not a torch file: UnpicklingError"),
        (lambda p: p.write_bytes(b"PK\x03\x04" + bytes(64)), r"a damaged file or not a torch file: RuntimeError"),
        (lambda p: torch.save(nn.Conv2d(3, 4, 1), p), r"it holds a pickled torch\.nn\.modules\.conv\.Conv2d, which"),
    ],
    ids=["text", "damaged zip", "a pickled module"],
)
def test_unreadable_checkpoint_is_a_one_line_error(tmp_path, write, why):
    bad = tmp_path / "bad.pt"
    write(bad)
    with pytest.raises(EigpipeError, match=r"^\S*bad\.pt: not a readable torch checkpoint \(" + why) as caught:
        load_checkpoint(bad)
    assert "\n" not in str(caught.value)


def study_file(tmp_path, model: dict | None) -> str:
    study = {
        "study": "c",
        "data": {"source": "synthetic"},
        "pretrain": {"source": "torchvision", "weights": "w.pth"},
        "train": {
            "models": ["faster_rcnn"],
            "inits": ["scratch"],
            "schedule": {"steps": 1, "batch_size": 1, "lr": 0.1},
        },
    }
    if model is not None:
        study["model"] = model
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return str(path)


def test_complexity_of_standard_resnet50(tmp_path, capsys):
    numbers = complexity.detector_complexity(model_section(width_multiplier=1.0, norm="bn"), 91, 224, 224)
    assert numbers["body_params"] == 23_508_032
    assert abs(numbers["body_macs"] / 1e9 - 4.1) < 0.05
    assert numbers["fpn_params"] > 0 and numbers["detector_macs"] > numbers["body_macs"] + numbers["fpn_macs"]
    assert cli.main(["complexity", "--config", study_file(tmp_path, {"width_multiplier": 1.0, "norm": "bn"})]) == 0
    out = capsys.readouterr().out
    assert "23.508M" in out and "4.087G" in out


@pytest.mark.parametrize(
    ("model", "args", "fragment"),
    [
        ({"width_multiplier": -1}, [], "width_multiplier"),
        (None, [], "model: missing (required)"),
        ({"norm": "gn"}, ["--input-size", "0", "224"], "--input-size"),
        ({"norm": "gn"}, ["--input-size", "100000", "100000"], "sizes must be 16 to 8192"),
        ({"norm": "gn"}, ["--num-classes", "1"], "--num-classes"),
    ],
)
def test_complexity_rejects_bad_input_in_one_line(tmp_path, capsys, model, args, fragment):
    assert cli.main(["complexity", "--config", study_file(tmp_path, model), *args]) == 1
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1 and "Traceback" not in err


def test_convfc_box_head_groupnorm_uses_the_gcd_rule():
    cfg = model_section(
        width_multiplier=0.125,
        norm="gn",
        gn_groups=32,
        fpn_channels=24,
        box_head={"type": "convfc", "conv_layers": [24, 40], "representation_size": 16},
    )
    head = build_detector("faster_rcnn", cfg, num_classes=3).roi_heads.box_head
    norms = [m for m in head.modules() if isinstance(m, nn.GroupNorm)]
    assert [(m.num_groups, m.num_channels) for m in norms] == [(8, 24), (8, 40)]


@pytest.mark.parametrize("zero", [True, False])
def test_zero_init_residual_starts_blocks_as_identity(zero):
    body = build_body(
        model_section(**{"width_multiplier": 0.125, "norm": "gn", "gn_groups": 8, "zero_init_residual": zero})
    )
    last_norms = torch.stack([block.bn3.weight.abs().sum() for stage in (body.layer1, body.layer4) for block in stage])
    assert bool((last_norms == 0).all()) == zero and body.layer1[0].bn2.weight.sum() == 8
    block = body.layer2[1].eval()
    x = torch.rand(1, block.conv1.in_channels, 8, 8)
    assert torch.equal(block(x), torch.relu(x)) == zero
