"""Files of the wrong kind end in one line naming the file and the reason (issue 18, item 6): checkpoints whose
meta lacks or mangles a field, state dicts missing a tensor, of another shape or another depth, the classifier
checkpoint given to ``widths``, tables without their key columns, with missing or fractional iterations, or a
CSV named .parquet."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch
import torchvision

from eigpipe import cli
from eigpipe.errors import EigpipeError
from eigpipe.models import (
    Classifier,
    build_body,
    build_detector,
    load_checkpoint,
    load_pretrained_body,
    save_checkpoint,
    standard,
)

WIDTHS = standard(multiplier=0.0625).to_dict()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, tiny_model: dict) -> dict:
    """The raw dicts of a tiny detector checkpoint and of torchvision's ResNet-50 and ResNet-18 state dicts."""
    root = tmp_path_factory.mktemp("ckpt")
    model = build_detector("faster_rcnn", tiny_model, num_classes=3)
    meta = {"task": "detection", "model_name": "faster_rcnn", "model_config": tiny_model, "widths": WIDTHS}
    meta |= {"num_classes": 3, "category_ids": [1, 2], "iteration": 4, "run": "faster_rcnn-scratch"}
    save_checkpoint(root / "d.pt", model, meta)
    classifier = Classifier(build_body(tiny_model), 8)
    classifier_meta = {**meta, "task": "classification", "model_name": "classifier", "num_classes": 8}
    classifier_meta["category_ids"] = []
    save_checkpoint(root / "c.pt", classifier, classifier_meta)
    return {
        "detector": torch.load(root / "d.pt", weights_only=True),
        "classifier": root / "c.pt",
        "resnet50": torchvision.models.resnet50().state_dict(),
        "resnet18": torchvision.models.resnet18().state_dict(),
    }


def one_line(exc: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(exc.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def _set(key: str, value: object) -> Callable[[dict], None]:
    return lambda raw: raw.__setitem__(key, value)


def _drop(key: str) -> Callable[[dict], None]:
    return lambda raw: raw.pop(key)


def _model_key(key: str, value: object = None) -> Callable[[dict], None]:
    def change(raw: dict) -> None:
        if value is None:
            del raw["model_config"][key]
        else:
            raw["model_config"][key] = value

    return change


def _tensor(key: str, value: Callable[[torch.Tensor], torch.Tensor] | None) -> Callable[[dict], None]:
    def change(raw: dict) -> None:
        if value is None:
            del raw["state_dict"][key]
        else:
            raw["state_dict"][key] = value(raw["state_dict"].get(key, torch.zeros(1)))

    return change


CONV2 = "backbone.body.layer1.0.conv2.weight"
BROKEN_CHECKPOINTS = {
    "no model_name": (_drop("model_name"), "'model_name' is missing"),
    "no state_dict": (_drop("state_dict"), "'state_dict' is missing"),
    "no task": (_drop("task"), "'task' is missing"),
    "no widths": (_drop("widths"), "'widths' is missing"),
    "no category_ids": (_drop("category_ids"), "'category_ids' is missing"),
    "model_config without min_size": (_model_key("min_size"), "lacks the key 'min_size'"),
    "min_size not a number": (_model_key("min_size", "big"), "model_config.min_size"),
    "model_config a list": (_set("model_config", [1, 2]), "is a list, not a model section"),
    "widths a string": (_set("widths", "wide"), "'widths'"),
    "widths without stages": (_set("widths", {"stem": 8, "stages": None}), "'widths'"),
    "an unknown detector": (_set("model_name", "retinanet"), "'retinanet', not a detection model"),
    "an unknown task": (_set("task", "segmentation"), "'segmentation', not one of"),
    "classifier named a detector": (_set("model_name", "classifier"), "not a detection model"),
    "num_classes a string": (_set("num_classes", "three"), "'num_classes' is 'three'"),
    "iteration None": (_set("iteration", None), "'iteration' is None"),
    "category_ids of another length": (_set("category_ids", [1, 2, 3]), "'category_ids'"),
    "state_dict a list": (_set("state_dict", [1]), "not a mapping of tensor names"),
    "another format": (_set("format", "eigpipe-checkpoint/9"), "'eigpipe-checkpoint/9'"),
    "a tensor of another shape": (_tensor(CONV2, lambda t: t[:2]), f"{CONV2} has shape [2, "),
    "a tensor missing": (_tensor(CONV2, None), f"lack {CONV2}"),
    "a tensor too many": (_tensor("backbone.body.extra.weight", lambda t: t), "backbone.body.extra.weight"),
    "a NaN weight": (_tensor(CONV2, lambda t: t.clone().fill_(float("nan"))), f"{CONV2} has non-finite values"),
}


@pytest.mark.parametrize("broken", BROKEN_CHECKPOINTS)
def test_a_checkpoint_with_a_missing_or_mangled_field_is_one_line(saved, tmp_path, broken) -> None:
    raw = copy.deepcopy(saved["detector"])
    change, words = BROKEN_CHECKPOINTS[broken]
    change(raw)
    path = tmp_path / "broken.pt"
    torch.save(raw, path)
    with pytest.raises(EigpipeError) as info:
        load_checkpoint(path, required=("category_ids", "iteration"))  # what evaluate asks of a checkpoint
    one_line(info, str(path), words)


def test_a_classifier_names_no_categories(saved, tmp_path) -> None:
    """Imported and trained classifiers carry ``category_ids: []``; a classifier with COCO ids is refused."""
    assert load_checkpoint(saved["classifier"])[1]["category_ids"] == []
    raw = torch.load(saved["classifier"], weights_only=True)
    raw["category_ids"] = [1, 2]
    torch.save(raw, tmp_path / "c.pt")
    with pytest.raises(EigpipeError) as info:
        load_checkpoint(tmp_path / "c.pt")
    one_line(info, str(tmp_path / "c.pt"), "'category_ids' is not empty")


def test_shape_mismatch_names_the_tensor_and_both_shapes(saved, tmp_path) -> None:
    raw = copy.deepcopy(saved["detector"])
    expected = list(raw["state_dict"][CONV2].shape)
    raw["state_dict"][CONV2] = torch.zeros(7, 2, 3, 3)
    torch.save(raw, tmp_path / "c.pt")
    with pytest.raises(EigpipeError) as info:
        load_checkpoint(tmp_path / "c.pt")
    one_line(info, CONV2, "[7, 2, 3, 3]", str(expected))


def _without(key: str) -> Callable[[dict], dict]:
    return lambda state: {k: v for k, v in state.items() if k != key}


def _resized(key: str) -> Callable[[dict], dict]:
    return lambda state: {**state, key: state[key][:, :5]}


TORCHVISION = {  # (source, change, words, whether the ResNet body itself is affected)
    "ResNet-18": ("resnet18", lambda state: state, "basic blocks (ResNet-18/34", True),
    "no conv1.weight": ("resnet50", _without("conv1.weight"), "no conv1.weight", True),
    "no layer3.2.conv3.weight": ("resnet50", _without("layer3.2.conv3.weight"), "no layer3.2.conv3.weight", True),
    "no layer4.0.bn1.weight": ("resnet50", _without("layer4.0.bn1.weight"), "layer4.0.bn1.weight", True),
    "a conv of other input channels": ("resnet50", _resized("layer2.0.conv2.weight"), "[128, 5, 3, 3]", True),
    "fc a vector": ("resnet50", lambda s: {**s, "fc.weight": torch.zeros(3)}, "fc.weight", False),
    "a value that is no tensor": ("resnet50", lambda s: {**s, "note": "mine"}, "not a mapping of tensor names", True),
}


@pytest.fixture(scope="module")
def resnet50_body(complete: Callable[..., dict]) -> torch.nn.Module:
    """A full-width ResNet-50 body with frozen BN: what torchvision's ImageNet weights initialise."""
    return build_body(complete("model", {"norm": "frozen_bn"}))


@pytest.mark.parametrize("case", TORCHVISION)
def test_a_torchvision_state_dict_of_another_depth_or_missing_a_key_is_one_line(saved, tmp_path, resnet50_body, case):
    source, change, words, body = TORCHVISION[case]
    path = tmp_path / "weights.pth"
    torch.save(change(dict(saved[source])), path)
    with pytest.raises(EigpipeError) as info:  # as a checkpoint (covariance of the ImageNet model)
        load_checkpoint(path)
    one_line(info, str(path), words)
    if body:  # as the pre-trained weights of a detector's body
        with pytest.raises(EigpipeError) as info:
            load_pretrained_body(resnet50_body, path)  # refused before any weight is copied
        one_line(info, str(path), words)


# ---- tables of the wrong kind ------------------------------------------------------------------------------


def dimensions_table(path: Path) -> Path:
    rows = [
        {"run": "faster_rcnn-scratch", "iteration": it, "layer": f"backbone.body.{name}", "canonical": name}
        | {"forward_index": i, "channels": 8, "intrinsic_dim": 4, "threshold": 1e-3, "init": "scratch"}
        for it in (0, 6)
        for i, name in enumerate(("conv1", "layer1.0.conv1"))
    ]
    pd.DataFrame(rows).to_parquet(path)
    return path


def _frame(change: Callable[[pd.DataFrame], pd.DataFrame]) -> Callable[[Path], None]:
    return lambda path: change(pd.read_parquet(path)).to_parquet(path)


def _nan_iteration(frame: pd.DataFrame) -> pd.DataFrame:
    frame["iteration"] = frame["iteration"].astype(float)
    frame.loc[1, "iteration"] = float("nan")
    return frame


def _fractional_iteration(frame: pd.DataFrame) -> pd.DataFrame:
    frame["iteration"] = frame["iteration"].astype(float)
    frame.loc[2, "iteration"] = 2.5
    return frame


def _no_layer_name(frame: pd.DataFrame) -> pd.DataFrame:
    frame["layer"] = frame["layer"].astype(object)
    frame.loc[0, "layer"] = None
    return frame


BAD_TABLES = {
    "a CSV named .parquet": (lambda p: pd.read_parquet(p).to_csv(p, index=False), "not a readable parquet table"),
    "no run column": (_frame(lambda f: f.drop(columns="run")), "no column run"),
    "no layer column": (_frame(lambda f: f.drop(columns="layer")), "no column layer"),
    "no iteration column": (_frame(lambda f: f.drop(columns="iteration")), "no column iteration"),
    "no intrinsic_dim column": (_frame(lambda f: f.drop(columns="intrinsic_dim")), "no column intrinsic_dim"),
    "a NaN iteration": (_frame(_nan_iteration), "column iteration has a missing value (row 1)"),
    "a fractional iteration": (_frame(_fractional_iteration), "iteration 2.5 is not a whole number (row 2)"),
    "a layer without its name": (_frame(_no_layer_name), "column layer has a missing value (row 0)"),
    "no rows": (_frame(lambda f: f.iloc[:0]), "the table has no rows"),
    "a JSON file": (lambda p: p.write_text(json.dumps({"run": 1})), "not a readable parquet table"),
}


def _stage_args(stage: str, table: Path, tmp_path: Path) -> list[str]:
    if stage == "dimensions":
        return ["dimensions", "--spectra", str(table), "--out", str(tmp_path / "out.parquet")]
    if stage == "widths":
        checkpoint = ["--checkpoint", str(tmp_path / "never-read.pt")]
        return ["widths", "--config-json", "{}", "--dimensions", str(table), *checkpoint, "--out", str(tmp_path / "w")]
    return ["report", "--config-json", "{}", "--dimensions", str(table), "--out-dir", str(tmp_path / "report")]


@pytest.mark.parametrize("stage", ["dimensions", "widths", "report"])
@pytest.mark.parametrize("bad", BAD_TABLES)
def test_a_table_of_the_wrong_kind_is_one_line_naming_it(tmp_path, capsys, stage, bad) -> None:
    table = dimensions_table(tmp_path / "t.parquet")
    damage, words = BAD_TABLES[bad]
    damage(table)
    assert cli.main(_stage_args(stage, table, tmp_path)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and str(table) in err and words in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.parquet"]


@pytest.mark.parametrize("stage", ["widths", "evaluate"])
def test_the_classifier_checkpoint_is_no_detector(saved, tmp_path, capsys, stage) -> None:
    table = dimensions_table(tmp_path / "d.parquet")
    never_read = str(tmp_path / "never-read")
    inputs = ["--dimensions", str(table)] if stage == "widths" else ["--data", never_read, "--image-dir", never_read]
    args = [stage, "--config-json", "{}", *inputs, "--checkpoint", str(saved["classifier"])]
    assert cli.main([*args, "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a classification checkpoint" in err and str(saved["classifier"]) in err, err
    assert not (tmp_path / "out").exists()
