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


def _refused(capsys, code: int, out: Path, *messages: str) -> None:
    """One error line naming the culprit, exit 1, no store; no progress line left before it."""
    raw = capsys.readouterr().err
    err = raw.strip().splitlines()
    assert code == 1 and all(m in err[-1] for m in messages) and not out.exists(), err
    assert err[-1].startswith("eigpipe analyze: error:") and len([e for e in err if "error" in e]) == 1
    assert not [line for line in raw.rstrip("\n").split("\n")[:-1] if "left out" not in line], raw


def _write(folder: Path, name: str, pixels: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(folder / name)
    return folder / name


def test_sixteen_bit_images_are_scaled_as_the_pipeline_scales_them(tmp_path: Path) -> None:
    from torchvision.transforms.functional import to_tensor

    from eigpipe.spectral.analyze import ImageFiles

    values = np.array([[0, 257, 1000, 65535]], np.uint16)
    assert Image.open(_write(tmp_path, "a.png", values)).mode == "I;16"
    want = np.round(values.astype(np.float64) * 255 / 65535) / 255
    got = ImageFiles(tmp_path, to_tensor)[0]
    assert got.shape == (3, 1, 4) and np.allclose(got.numpy(), want[None], atol=1e-6)


@pytest.mark.parametrize(
    ("name", "pixels", "message"),
    [
        ("int32.tif", np.full((8, 8), 7, np.int32), "has image mode 'I', which the loader cannot convert"),
        ("float.tif", np.full((8, 8), 0.5, np.float32), "has image mode 'F', which the loader cannot convert"),
        ("bomb.png", np.zeros((250, 250, 3), np.uint8), "cannot be read as an image (DecompressionBombError"),
        ("gone.png", None, "a broken symbolic link (to missing.png, which does not exist)"),
    ],
)
def test_an_image_the_loader_cannot_read_faithfully_is_named(capsys, monkeypatch, tmp_path, name, pixels, message):
    """32-bit integer and float images (no 8-bit scale), an image over PIL's decompression-bomb limit (lowered
    here) and a broken symbolic link: one line naming the file."""
    folder = tmp_path / "photos"
    _write(folder, "fine.png", np.zeros((8, 8, 3), np.uint8))
    if pixels is None:
        (folder / name).symlink_to("missing.png")
    else:
        _write(folder, name, pixels)
    if name == "bomb.png":  # 62,500 pixels, over twice the limit; the preset's 224 x 224 crop is not
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30_000)
    out = tmp_path / "out.zarr"
    _refused(capsys, analyze(folder, out, "--layers", "avgpool"), out, f"{folder / name}", message)


def test_hidden_files_are_left_out_and_other_files_are_counted(capsys, tmp_path: Path) -> None:
    """macOS's ._a.png companions and .git/ are hidden, not images; other files are left out with one line."""
    from eigpipe.spectral.analyze import ImageFiles

    _write(tmp_path / "sub", "a.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "sub" / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    _write(tmp_path / ".git", "b.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "c.gif").write_bytes(b"GIF89a")
    assert ImageFiles(tmp_path, lambda image: image).files == [tmp_path / "sub" / "a.png"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "left out 2 of its entries, which are not image files (e.g. c.gif;" in err[0]


def _int_weight(state: dict) -> None:
    state["conv1.weight"] = state["conv1.weight"].long()


def _nan(state: dict) -> None:
    state["fc.bias"][0] = float("nan")


def _negative_variance(state: dict) -> None:
    state["bn1.running_var"][0] = -1.0


def _sparse(state: dict) -> None:
    state["fc.weight"] = state["fc.weight"].to_sparse()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_int_weight, "key conv1.weight holds torch.int64 values, not floating point"),
        (_nan, "key fc.bias has non-finite values (NaN or Inf)"),
        (_negative_variance, "key bn1.running_var has negative values (a running variance)"),
        (_sparse, "key fc.weight is a torch.sparse_coo tensor"),
    ],
)
def test_weights_the_model_cannot_take_as_they_are_are_named(capsys, photos, weights, tmp_path, change, message):
    """Integer values are not cast into a float model, nor NaN, Inf or a negative variance read into it."""
    state = torch.load(weights, weights_only=True)
    change(state)
    torch.save(state, tmp_path / "changed.pth")
    out = tmp_path / "out.zarr"
    _refused(
        capsys, analyze(photos, out, "--weights", str(tmp_path / "changed.pth"), "--layers", "avgpool"), out, message
    )


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--batch-size", "99999999999999999999"], "--batch-size: 99999999999999999999 is more than 4096 images"),
        (["--threads", "100000"], "--threads: 100000 is more than this machine's"),
    ],
)
def test_options_beyond_their_bounds_are_one_line(capsys, photos, tmp_path, option, message) -> None:
    out = tmp_path / "out.zarr"
    _refused(capsys, analyze(photos, out, "--layers", "avgpool", *option), out, message)


def test_a_plain_pickle_as_weights_is_one_line_without_torch_warnings(capsys, photos, tmp_path, recwarn) -> None:
    import pickle

    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump({"conv1.weight": np.zeros(3)}, f, protocol=4)
    out = tmp_path / "out.zarr"
    _refused(
        capsys,
        analyze(photos, out, "--weights", str(tmp_path / "plain.pkl"), "--layers", "avgpool"),
        out,
        "plain.pkl: not a readable",
    )
    assert [str(w.message) for w in recwarn] == []  # torch's "Detected pickle protocol 4 ..." is not shown


def test_help_speaks_to_a_researcher_and_version(capsys) -> None:
    for flag in ("--help", "--version"):
        with pytest.raises(SystemExit) as done:
            cli.main([flag])
        assert done.value.code == 0
    text = capsys.readouterr().out
    assert "eigenspectra" in text and "where to start" in text and "eigpipe.track" in text
    assert "Command line: argument parsing only" not in text and text.strip().endswith(f"eigpipe {__version__}")


def _hooked_mean(model: torch.nn.Module, layer: str, photos: Path, preset, per_image) -> np.ndarray:
    """The per-image-weighted mean of ``layer``'s output, by hand: ``per_image`` reduces one image's output."""
    outputs = []
    hook = model.get_submodule(layer).register_forward_hook(lambda module, args, out: outputs.append(out))
    files = sorted(p for p in photos.rglob("*") if p.suffix in (".png", ".jpg"))
    with torch.inference_mode():
        model.eval()(torch.stack([preset(Image.open(p).convert("RGB")) for p in files]))
    hook.remove()
    return torch.stack([per_image(image) for image in outputs[0]]).double().mean(0).numpy()


@pytest.mark.parametrize(
    ("name", "layer", "options", "per_image"),
    [  # a ConvNeXt activation on [N, H, W, C] maps; a ViT block's tokens without the CLS token
        (
            "convnext_tiny",
            "features.1.0.block.4",
            ["--channel-axis", "features.1.0.block.4=-1"],
            lambda x: x.mean((0, 1)),
        ),
        ("vit_b_16", "encoder.layers.encoder_layer_0", ["--prefix-tokens", "1"], lambda x: x[1:].mean(0)),
    ],
)
def test_layout_options_read_channels_last_maps_and_drop_prefix_tokens(
    photos, tmp_path, name, layer, options, per_image
):
    out = tmp_path / f"{name}.zarr"
    torch.manual_seed(0)  # random weights: the reference model below is built alike
    assert analyze(photos, out, "--layers", layer, *options, model=f"torchvision:{name}") == 0
    mean = store.read_store(out, store.COVARIANCE_KIND, ("mean",))[1][layer][0]["mean"]
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)()
    preset = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    expected = _hooked_mean(model, layer, photos, preset, per_image)
    assert mean.shape == expected.shape and np.allclose(mean, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("options", "message"),
    [  # each named by this command's flag, not by eigpipe.track's keyword
        (["--channel-axis", "7"], "layer avgpool: --channel-axis 7 does not fit its 4-D output"),
        (["--channel-axis", "fc*=1"], "--channel-axis: 'fc*' matches none of the selected layers (avgpool)"),
        (["--output-index", "layer9*=0"], "--output-index: 'layer9*' matches none of the selected layers"),
        (["--prefix", "only"], "--prefix: 'only' takes the prefix tokens alone, but --prefix-tokens is 0"),
        (["--layers", "Conv3d:*"], "--layers: selector 'Conv3d:*' matches no module of the model"),
    ],
)
def test_a_layout_option_that_does_not_fit_is_one_line_naming_its_flag(capsys, photos, tmp_path, options, message):
    out = tmp_path / "out.zarr"
    _refused(capsys, analyze(photos, out, "--layers", "avgpool", *options), out, message)


@pytest.mark.parametrize("option", [["--channel-axis", "²"], ["--batch-size", "²"], ["--prefix-tokens", "٣"]])
def test_digits_python_reads_but_int_refuses_are_named_as_the_option(capsys, photos, tmp_path, option) -> None:
    with pytest.raises(SystemExit) as done:
        analyze(photos, tmp_path / "out.zarr", "--layers", "avgpool", *option)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert done.value.code == 2 and f"argument {option[0]}: '{option[1]}' is not" in err and "invalid" not in err
