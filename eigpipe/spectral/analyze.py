"""The ``eigpipe analyze`` command: a covariance store of a torchvision (or timm) classifier on a folder of images,
without writing code. The model's own preprocessing is used: torchvision's weights preset
(``get_model_weights(name).DEFAULT.transforms()``, built locally, nothing downloaded) or timm's
(``resolve_model_data_config`` + ``create_transform``). Weights come from a local file or stay random.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from eigpipe import provenance, runtime
from eigpipe.errors import EigpipeError
from eigpipe.models.checkpoint import load_torch_file, weights_file
from eigpipe.models.published.mapping import check_tensor
from eigpipe.outputs import claim_outputs
from eigpipe.spectral import store
from eigpipe.spectral.buffers import ieee_float32
from eigpipe.spectral.track import Tracker

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp"}
MAX_BATCH = 4096  # images per forward pass: a larger number is a typo, not a batch (its inputs are allocated at once)
# eigpipe.track's names of the options this command passes on, and the flags that set them
FLAGS = {
    "layers": "--layers",
    "channel_axis": "--channel-axis",
    "output_index": "--output-index",
    "prefix_tokens": "--prefix-tokens",
    "prefix": "--prefix",
}
_OPTION_NAME = re.compile(rf"(^|: |, but )({'|'.join(FLAGS)})(?=[: ])")


def _torchvision(name: str) -> tuple[nn.Module, Callable]:
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)  # the classifiers
    if name not in known:
        examples = ", ".join(known[:4])
        raise EigpipeError(f"--model torchvision:{name}: not a torchvision classifier (e.g. {examples}, ...)")
    preset = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    return torchvision.models.get_model(name, weights=None), preset


def _timm(name: str) -> tuple[nn.Module, Callable]:
    try:
        import timm
    except ImportError:
        raise EigpipeError(f"--model timm:{name}: timm is not installed (pip install timm)") from None
    if not timm.is_model(name):
        raise EigpipeError(f"--model timm:{name}: not a timm model")
    model = timm.create_model(name, pretrained=False)
    return model, timm.data.create_transform(**timm.data.resolve_model_data_config(model), is_training=False)


SOURCES = {"torchvision": _torchvision, "timm": _timm}


def load_model(spec: str, weights: Path | None) -> tuple[nn.Module, Callable]:
    """(model in eval mode, its preprocessing) for ``torchvision:NAME`` or ``timm:NAME``, weights from a file."""
    source, _, name = spec.partition(":")
    if source not in SOURCES or not name:
        raise EigpipeError(f"--model {spec}: give torchvision:NAME or timm:NAME")
    model, preprocess = SOURCES[source](name)
    if weights is not None:
        _load_weights(model, Path(weights), spec)
    return model.eval(), preprocess


def _load_weights(model: nn.Module, path: Path, spec: str) -> None:
    state = load_torch_file(weights_file(path), "a readable state dict")
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise EigpipeError(f"{path}: not a state dict (a {type(state).__name__})")
    expected = model.state_dict()
    for key, value in state.items():
        check_tensor(path, key, value, expected.get(key))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[1:2] or [str(exc)]
        raise EigpipeError(f"{path}: does not fit {spec}: {first[0].strip()}") from None


def image_files(folder: Path) -> list[Path]:
    """The image files under ``folder`` (recursively, sorted): files whose suffix is an image's. Hidden files and
    folders (names starting with '.': ``.git/``, macOS's ``._a.png``) are left out; so are other files and links
    to folders, counted in one line on stderr; a broken symbolic link is an error naming it."""
    files, others = [], []
    for root, folders, names in os.walk(folder):
        folders[:] = [name for name in folders if not name.startswith(".")]
        others += [Path(root, name) for name in folders if Path(root, name).is_symlink()]  # not followed
        for path in (Path(root, name) for name in names if not name.startswith(".")):
            if path.is_symlink() and not path.exists():
                raise EigpipeError(f"{path}: a broken symbolic link (to {os.readlink(path)}, which does not exist)")
            (files if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file() else others).append(path)
    if others:
        print(
            f"analyze: {folder}: left out {len(others)} of its entries, which are not image files (e.g. "
            f"{min(others).relative_to(folder)}; image files end {', '.join(sorted(IMAGE_SUFFIXES))})",
            file=sys.stderr,
        )
    return sorted(files)


class ImageFiles(Dataset):
    """Every image file under a folder (``image_files``), decoded as the pipeline's loader decodes images
    (``eigpipe.data.coco.read_rgb``) and preprocessed; a bad file names itself."""

    def __init__(self, folder: Path, preprocess: Callable) -> None:
        if not folder.is_dir():
            raise EigpipeError(f"{folder}: image folder not found")
        self.files = image_files(folder)
        if not self.files:
            raise EigpipeError(f"{folder}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        from eigpipe.data.coco import read_rgb

        return self.preprocess(read_rgb(self.files[index]))


def _first_match(pairs: Sequence[tuple[str, int]] | None) -> dict[str, int] | None:
    """{glob: value} in the order given, a glob given twice keeping its first value (the tracker takes the first
    glob that matches a layer)."""
    found: dict[str, int] = {}
    for glob, value in pairs or ():
        found.setdefault(glob, value)
    return found or None


def _check_bounds(batch_size: int, threads: int | None) -> None:
    """Bounds of the options the command line takes as any whole number >= 1."""
    if batch_size > MAX_BATCH:
        raise EigpipeError(f"--batch-size: {batch_size} is more than {MAX_BATCH} images per forward pass")
    cores = os.cpu_count() or 1
    if threads is not None and threads > cores:
        raise EigpipeError(f"--threads: {threads} is more than this machine's {cores} CPUs")


def analyze(
    cfg: dict,
    model_spec: str,
    images: Path,
    layers: Sequence[str],
    out: Path,
    weights: Path | None = None,
    batch_size: int = 16,
    max_images: int | None = None,
    precision: str = "float64",
    device: str = "auto",
    threads: int | None = None,
    channel_axis: Sequence[tuple[str, int]] | None = None,
    output_index: Sequence[tuple[str, int]] | None = None,
    prefix_tokens: int = 0,
    prefix: str = "drop",
) -> Path:
    """Run the classifier on the folder's images (inference mode, IEEE float32) and publish the store;
    ``channel_axis`` and ``output_index`` are (layer glob, value) pairs, the first match applying."""
    _check_bounds(batch_size, threads)
    claim_outputs((out, store.COVARIANCE_STORE), inputs=[images, weights], read_whole=[images])
    if threads is not None:
        torch.set_num_threads(threads)
    if device == "cuda" and not torch.cuda.is_available():
        raise EigpipeError("--device cuda: no CUDA device is available")
    target = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    model, preprocess = load_model(model_spec, weights)
    dataset: Any = ImageFiles(Path(images), preprocess)
    count = len(dataset) if max_images is None else min(max_images, len(dataset))
    dataset = torch.utils.data.Subset(dataset, range(count))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    model.to(target)
    layouts = {"channel_axis": _first_match(channel_axis), "output_index": _first_match(output_index)}
    try:
        tracker = Tracker(
            model, layers, precision=precision, run=model_spec, prefix_tokens=prefix_tokens, prefix=prefix, **layouts
        )
        progress = runtime.progress(total=count, desc=f"analyze {model_spec}", unit="img")
        with torch.inference_mode(), ieee_float32(), tracker, progress as bar:
            for batch in loader:
                model(batch.to(target))
                bar.update(len(batch))
    except EigpipeError as error:  # the tracker's words for its options, as this command's flags (its type kept)
        error.args = (_OPTION_NAME.sub(lambda m: m.group(1) + FLAGS[m.group(2)], str(error)),)
        raise error from None
    record = {"images": str(images), "n_images": count, "order": "file paths, sorted"}
    if weights is not None:
        record.update(weights=str(weights), weights_sha256=provenance.sha256_file(weights))
    return tracker.save(out, attrs={"dataset": record})
