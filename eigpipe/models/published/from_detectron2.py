"""detectron2 model-zoo files and Detectron's (Caffe2) ImageNet classifiers.

A model-zoo ``.pkl`` is a pickle of ``{"model": {name: numpy array}, "__author__": ...}``; a Caffe2 file is a
pickle of ``{name: numpy array}`` (detection files nest it under ``"blobs"``), whose ``*_momentum`` entries
detectron2 drops (``checkpoint/detection_checkpoint.py``, ``_load_file``). Module names were read in
``modeling/backbone/resnet.py`` (``stem.conv1``, ``res2``..``res5``, ``conv1``..``conv3``, ``shortcut``, each
``Conv2d`` keeping its norm as ``.norm``), ``modeling/backbone/fpn.py`` (``fpn_lateral<stage>``,
``fpn_output<stage>``), ``modeling/proposal_generator/rpn.py`` (``StandardRPNHead``: ``conv``,
``objectness_logits``, ``anchor_deltas``), ``modeling/roi_heads/box_head.py`` (``FastRCNNConvFCHead``:
``conv<k>``, ``fc<k>``), ``fast_rcnn.py`` (``cls_score`` with K + 1 outputs, background last; ``bbox_pred`` with
4 K) and ``mask_head.py`` (``mask_fcn<k>``, ``deconv``, ``predictor`` with K outputs). The Caffe2 classifier's
names (``conv1_w``, ``conv1_gn_s``, ``res2_0_branch2a_w``, ``res2_0_branch1_gn_b``, ``pred_w``, ...) follow
``checkpoint/c2_model_loading.py`` (``convert_basic_c2_names``).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eigpipe.errors import EigpipeError
from eigpipe.models.published.mapping import Mapped, rename, rule
from eigpipe.models.published.presets import Preprocessing

BODY = "backbone.body"
BRANCH2 = {"a": 1, "b": 2, "c": 3}
RULES = (
    rule(r"backbone\.bottom_up\.stem\.conv1\.weight", f"{BODY}.conv1.weight"),
    rule(r"backbone\.bottom_up\.stem\.conv1\.norm\.(\w+)", rf"{BODY}.bn1.\1"),
    rule(r"backbone\.bottom_up\.res(\d)\.(\d+)\.conv(\d)\.weight", lambda m: f"{_block(m)}.conv{m[3]}.weight"),
    rule(r"backbone\.bottom_up\.res(\d)\.(\d+)\.conv(\d)\.norm\.(\w+)", lambda m: f"{_block(m)}.bn{m[3]}.{m[4]}"),
    rule(r"backbone\.bottom_up\.res(\d)\.(\d+)\.shortcut\.weight", lambda m: f"{_block(m)}.downsample.0.weight"),
    rule(r"backbone\.bottom_up\.res(\d)\.(\d+)\.shortcut\.norm\.(\w+)", lambda m: f"{_block(m)}.downsample.1.{m[3]}"),
    rule(r"backbone\.fpn_(lateral|output)(\d)\.(weight|bias)", lambda m: f"{_fpn(m)}.0.{m[3]}"),
    rule(r"backbone\.fpn_(lateral|output)(\d)\.norm\.(\w+)", lambda m: f"{_fpn(m)}.1.{m[3]}"),
    rule(r"proposal_generator\.rpn_head\.conv\.(weight|bias)", r"rpn.head.conv.0.0.\1"),
    rule(r"proposal_generator\.rpn_head\.conv\.conv(\d+)\.(weight|bias)", r"rpn.head.conv.\1.0.\2"),
    rule(r"proposal_generator\.rpn_head\.objectness_logits\.(weight|bias)", r"rpn.head.cls_logits.\1"),
    rule(r"proposal_generator\.rpn_head\.anchor_deltas\.(weight|bias)", r"rpn.head.bbox_pred.\1"),
    rule(r"roi_heads\.box_head\.conv(\d+)\.(weight|bias)", lambda m: f"roi_heads.box_head.{int(m[1]) - 1}.0.{m[2]}"),
    rule(r"roi_heads\.box_head\.conv(\d+)\.norm\.(\w+)", lambda m: f"roi_heads.box_head.{int(m[1]) - 1}.1.{m[2]}"),
    rule(
        r"roi_heads\.box_head\.fc(\d+)\.(weight|bias)", r"roi_heads.box_head.upstream_fc\1.\2"
    ),  # placed by place_box_fcs
    rule(r"roi_heads\.box_predictor\.(cls_score|bbox_pred)\.(weight|bias)", r"roi_heads.box_predictor.\1.\2"),
    rule(
        r"roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)", lambda m: f"roi_heads.mask_head.{int(m[1]) - 1}.0.{m[2]}"
    ),
    rule(
        r"roi_heads\.mask_head\.mask_fcn(\d+)\.norm\.(\w+)", lambda m: f"roi_heads.mask_head.{int(m[1]) - 1}.1.{m[2]}"
    ),
    rule(r"roi_heads\.mask_head\.deconv\.(weight|bias)", r"roi_heads.mask_predictor.conv5_mask.\1"),
    rule(r"roi_heads\.mask_head\.predictor\.(weight|bias)", r"roi_heads.mask_predictor.mask_fcn_logits.\1"),
)
# buffers, not weights: the normalisation (checked against the preset) and the anchors (rebuilt from the config)
DROPPED = (r"pixel_mean", r"pixel_std", r"proposal_generator\.anchor_generator\.cell_anchors\.\d+")
BACKGROUND_LAST = True

CAFFE2_RULES = (
    rule(r"conv1_w", "body.conv1.weight"),
    rule(r"conv1_gn_s", "body.bn1.weight"),
    rule(r"conv1_gn_b", "body.bn1.bias"),
    rule(r"res(\d)_(\d+)_branch2([abc])_w", lambda m: f"{_block(m, 'body')}.conv{BRANCH2[m[3]]}.weight"),
    rule(r"res(\d)_(\d+)_branch2([abc])_gn_s", lambda m: f"{_block(m, 'body')}.bn{BRANCH2[m[3]]}.weight"),
    rule(r"res(\d)_(\d+)_branch2([abc])_gn_b", lambda m: f"{_block(m, 'body')}.bn{BRANCH2[m[3]]}.bias"),
    rule(r"res(\d)_(\d+)_branch1_w", lambda m: f"{_block(m, 'body')}.downsample.0.weight"),
    rule(r"res(\d)_(\d+)_branch1_gn_s", lambda m: f"{_block(m, 'body')}.downsample.1.weight"),
    rule(r"res(\d)_(\d+)_branch1_gn_b", lambda m: f"{_block(m, 'body')}.downsample.1.bias"),
    rule(r"pred_w", "fc.weight"),
    rule(r"pred_b", "fc.bias"),
)
CAFFE2_DROPPED = (r".*_momentum",)


def _block(m: Any, body: str = BODY) -> str:
    """detectron2's res<s>.<j> (C2 res<s>_<j>) is torchvision's layer<s-1>.<j>."""
    return f"{body}.layer{int(m[1]) - 1}.{m[2]}"


def _fpn(m: Any) -> str:
    """fpn_lateral<s> / fpn_output<s> (s = 2..5) are the FPN's inner / layer block s - 2."""
    return f"backbone.fpn.{'inner' if m[1] == 'lateral' else 'layer'}_blocks.{int(m[2]) - 2}"


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """What pickle protocols 0-2 call (``_codecs.encode(text, "latin1")``) to rebuild a bytes object in Python 3
    (CPython's Lib/pickle.py, ``save_bytes``); any other encoding is refused."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r} does not rebuild bytes")
    return text.encode("latin1")


class _ArraysOnly(pickle.Unpickler):
    """Unpickles dicts, lists and numpy arrays, nothing that runs code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        # protocol 5 (Python 3.14's default): numpy's ndarray.__reduce_ex__ rebuilds an array from its buffer
        # with _frombuffer (numpy/_core/numeric.py; numpy/core/numeric.py before numpy 2)
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):  # protocols 0-2: bytes, latin-1 only
            return _latin1_bytes
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not a numpy array")
        return super().find_class(module, name)


def read(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """(state, kind) of a detectron2 ``.pkl``: kind "detector" (model zoo) or "caffe2" (Detectron's files)."""
    try:
        with open(path, "rb") as f:
            data = _ArraysOnly(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as exc:
        reason = " ".join(str(exc).split())  # one line
        raise EigpipeError(f"{path}: not a detectron2 .pkl (a pickle of numpy arrays: {reason})") from None
    if not isinstance(data, dict):
        raise EigpipeError(f"{path}: not a detectron2 .pkl (a pickle of a dict, got {type(data).__name__})")
    if "model" in data and "__author__" in data:
        arrays, kind = data["model"], "detector"
    else:
        arrays, kind = data.get("blobs", data), "caffe2"
    if not isinstance(arrays, dict) or not arrays:
        raise EigpipeError(f"{path}: not a detectron2 .pkl (no arrays under 'model' or 'blobs')")
    state = {}
    for key, value in arrays.items():
        if not isinstance(value, np.ndarray):
            raise EigpipeError(f"{path}: entry {key} is a {type(value).__name__}, not a numpy array")
        try:
            state[str(key)] = torch.from_numpy(np.array(value, dtype=value.dtype.newbyteorder("=")))  # native order
        except TypeError:  # torch has no dtype for numpy's objects, strings, ...
            raise EigpipeError(f"{path}: entry {key} is an array of {value.dtype}, not of numbers") from None
    return state, kind


def to_eigpipe(state: dict[str, torch.Tensor], kind: str, path: Path) -> Mapped:
    if kind == "caffe2":
        return rename(state, CAFFE2_RULES, CAFFE2_DROPPED, path, "Caffe2 (Detectron) classifier")
    return rename(state, RULES, DROPPED, path, "detectron2")


def check_pixel_statistics(state: dict[str, torch.Tensor], preprocessing: Preprocessing, path: Path) -> None:
    """A file that stores its normalisation must agree with the one the import folds in."""
    for key, expected in (("pixel_mean", preprocessing.mean), ("pixel_std", preprocessing.std)):
        if key in state:
            found = state[key].flatten().double()
            if found.numel() != 3 or not torch.allclose(found, torch.tensor(expected, dtype=torch.float64)):
                raise EigpipeError(f"{path}: {key} is {found.tolist()}, the import assumes {list(expected)}")
