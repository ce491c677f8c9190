"""`eigpipe analyze` (a torchvision classifier on a folder of images), its one-line errors, and the top-level help."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from PIL import Image

from eigpipe import __version__, cli
from eigpipe.spectral import store


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small images in a nested folder, and a file that is not an image."""
    root = tmp_path_factory.mktemp("photos")
    (root / "b").mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("a.png", (40, 50)), ("b/c.jpg", (60, 30)), ("b/d.png", (32, 32))):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / name)
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def analyze(photos: Path, out: Path, *extra: str, model: str = "torchvision:resnet18") -> int:
    args = ["analyze", "--model", model, "--images", str(photos), "--out", str(out), "--threads", "1"]
    return cli.main([*args, "--batch-size", "2", *extra])


def test_analyze_a_torchvision_classifier_with_its_own_preprocessing(photos: Path, weights: Path, tmp_path: Path):
    out = tmp_path / "r18.zarr"
    assert analyze(photos, out, "--weights", str(weights), "--layers", "Conv2d:layer4.1.*", "avgpool") == 0
    attrs, layers = store.read_store(out, store.COVARIANCE_KIND, ("second_moment", "mean"))
    assert attrs["layers"] == ["layer4.1.conv1", "layer4.1.conv2", "avgpool"] and attrs["n_images"] == 3
    assert attrs["run"] == "torchvision:resnet18" and attrs["dataset"]["weights_sha256"]
    # the avgpool mean, by hand: the weights' own preset (resize 256, crop 224, ImageNet normalisation)
    model = torchvision.models.resnet18()
    model.load_state_dict(torch.load(weights, weights_only=True))
    preset = torchvision.models.ResNet18_Weights.DEFAULT.transforms()
    files = sorted(p for p in photos.rglob("*") if p.suffix in (".png", ".jpg"))
    batch = torch.stack([preset(Image.open(p).convert("RGB")) for p in files])
    with torch.inference_mode():
        pooled = torch.flatten(model.eval().avgpool(model.layer4(model.layer3(model.layer2(model.layer1(
            model.maxpool(model.relu(model.bn1(model.conv1(batch))))))))), 1)  # fmt: skip
    assert np.allclose(layers["avgpool"][0]["mean"], pooled.double().mean(0).numpy(), rtol=1e-5, atol=1e-6)
    table = tmp_path / "r18.csv"
    assert cli.main(["spectrum", str(out), "--out", str(table)]) == 0  # no config: the schema's defaults
    assert list(pd.read_csv(table)["layer"]) == attrs["layers"]


BAD = [
    (["--model", "torchvision:resnet5"], "--model torchvision:resnet5: not a torchvision classifier"),
    (["--model", "keras:resnet50"], "--model keras:resnet50: give torchvision:NAME or timm:NAME"),
    (["--images", "MISSING"], "image folder not found"),
    (["--images", "EMPTY"], "no image files"),
    (["--layers", "Conv2d:nothing.*"], "layers: selector 'Conv2d:nothing.*' matches no module of the model"),
    (["--weights", "TEXT"], "not a readable state dict (a damaged file or not a torch file"),
    (["--weights", "WHOLE"], "holds a pickled torchvision.models.resnet.ResNet, which eigpipe does not unpickle"),
    (["--weights", "OTHER"], "does not fit torchvision:resnet18"),
    (["--batch-size", "0"], "'0' is not a whole number >= 1"),
]
if importlib.util.find_spec("timm") is None:
    BAD.append((["--model", "timm:vit_tiny_patch16_224"], "timm is not installed (pip install timm)"))


@pytest.mark.parametrize(("change", "message"), BAD)
def test_bad_input_is_one_line_and_leaves_nothing(photos: Path, tmp_path: Path, capsys, change, message) -> None:
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "TEXT").write_text("not weights")
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / "OTHER")
    torch.save(torchvision.models.resnet18(), tmp_path / "WHOLE")  # the model object, not its state dict
    args = {"--model": "torchvision:resnet18", "--images": str(photos), "--layers": "avgpool"}
    for key, value in zip(change[::2], change[1::2], strict=True):
        args[key] = str(tmp_path / value) if value.isupper() else value
    out = tmp_path / "out.zarr"
    argv = ["analyze", *[x for pair in args.items() for x in pair], "--out", str(out)]
    if "--batch-size" in change:
        with pytest.raises(SystemExit):
            cli.main(argv)
    else:
        assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and not out.exists()
    if "--batch-size" not in change:
        assert err[-1].startswith("eigpipe analyze: error:") and len([e for e in err if "error" in e]) == 1


def test_help_speaks_to_a_researcher_and_version(capsys) -> None:
    for flag in ("--help", "--version"):
        with pytest.raises(SystemExit) as done:
            cli.main([flag])
        assert done.value.code == 0
    text = capsys.readouterr().out
    assert "eigenspectra" in text and "where to start" in text and "eigpipe.track" in text
    assert "Command line: argument parsing only" not in text and text.strip().endswith(f"eigpipe {__version__}")
