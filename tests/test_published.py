"""Importing published checkpoints, without the published files.

torchvision: its own detectors (built as its builders build them for the published weights, with random
weights) are imported from their state dicts and must compute the same features and detections. detectron2,
Detectron (Caffe2) and mmdetection: files in their formats with every tensor the upstream sources name
(tests/upstream_keys.py), random values; each tensor must land where the upstream module sits in torchvision's
detector, and the imported stem and first block, on RGB images in [0, 1], must give the features the upstream
tensors give on the upstream preprocessing (computed here with torch.nn.functional).
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection._utils import overwrite_eps
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops import FrozenBatchNorm2d

from eigpipe import cli
from eigpipe.errors import EigpipeError
from eigpipe.models import build_transform, load_checkpoint
from eigpipe.models.published.presets import PRESETS
from eigpipe.models.published.stage import convert, import_checkpoint, make_request
from tests import upstream_keys
from tests.upstream_files import random_arrays, write_caffe2, write_detectron2, write_mmdet

pytestmark = pytest.mark.slow  # full-width ResNet-50 FPN detectors (a few seconds each)
SMALL = {"min_size": 96, "max_size": 128}  # the transform's sizes, kept small: full-width models on the CPU


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, tuple[Path, dict[str, np.ndarray], list]]:
    """One file per upstream format: {name: (path, upstream arrays, key listing)}."""
    root = tmp_path_factory.mktemp("upstream")
    made = {}
    for name, entries, write in (
        ("detectron2", upstream_keys.detectron2_mask_rcnn_gn(), write_detectron2),
        ("mmdet", upstream_keys.mmdet_gn_all(masks=True), write_mmdet),
        ("mmdet_2020", upstream_keys.mmdet_gn_all(masks=False, head_prefix=""), write_mmdet),
        ("caffe2", upstream_keys.caffe2_r50_gn(), write_caffe2),
    ):
        arrays = random_arrays(entries, seed=len(made))
        made[name] = (write(root / f"{name}.file", arrays), arrays, entries)
    return made


def _convert(path: Path, preset: str) -> tuple[nn.Module, dict]:
    small = {} if PRESETS[preset].model_name == "classifier" else SMALL
    return convert(path, make_request(preset, model=small))


def expected(array: np.ndarray, how: str, target: torch.Tensor, bgr: bool) -> torch.Tensor:
    """The upstream tensor as it must appear in the imported model (tests/upstream_keys.py, "how it lands")."""
    value = torch.from_numpy(array)
    if how == "stem":
        return value.flip(1) if bgr else value
    if how == "background":
        return torch.cat([value[-1:], value[:-1]])
    if how == "after_background":
        return torch.cat([torch.zeros((target.shape[0] - value.shape[0], *value.shape[1:])), value])
    return value


@pytest.mark.parametrize(
    "file, preset",
    [
        ("detectron2", "detectron2/mask_rcnn_R_50_FPN_3x_gn"),
        ("mmdet", "mmdet/mask_rcnn_r50_fpn_gn-all_2x_coco"),
        ("mmdet_2020", "mmdet/faster_rcnn_r50_fpn_gn-all_scratch_6x_coco"),
        ("caffe2", "detectron2/R-50-GN"),
    ],
)
def test_each_upstream_tensor_lands_where_its_module_sits(files, file, preset):
    path, arrays, entries = files[file]
    model, meta = _convert(path, preset)
    state = model.state_dict()
    bgr = PRESETS[preset].preprocessing.channel_order == "BGR"
    for key, shape, target, how in entries:
        assert arrays[key].shape == shape
        torch.testing.assert_close(state[target], expected(arrays[key], how, state[target], bgr), rtol=0, atol=0)
    filled = {target for _, _, target, _ in entries}
    assert filled == {k for k in state if not k.endswith("num_batches_tracked")}  # and nothing else is filled
    if meta["task"] == "detection":
        assert meta["num_classes"] == 81 and len(meta["category_ids"]) == 80 and meta["category_ids"][:3] == [1, 2, 3]
        assert meta["categories"][0] == "person" and meta["category_ids"][-1] == 90


def _stem_and_first_block(tensors: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """ResNet-50 GN(32) stem and first bottleneck, as the upstream modules compute them (stride in the 3x3)."""

    def conv_gn(y, conv, norm, **kw):
        return F.group_norm(
            F.conv2d(y, tensors[f"{conv}.weight"], **kw), 32, tensors[f"{norm}.weight"], tensors[f"{norm}.bias"]
        )

    y = F.max_pool2d(F.relu(conv_gn(x, "conv1", "bn1", stride=2, padding=3)), 3, 2, 1)
    shortcut = conv_gn(y, "layer1.0.downsample.0", "layer1.0.downsample.1")
    out = F.relu(conv_gn(y, "layer1.0.conv1", "layer1.0.bn1"))
    out = F.relu(conv_gn(out, "layer1.0.conv2", "layer1.0.bn2", padding=1))
    return F.relu(conv_gn(out, "layer1.0.conv3", "layer1.0.bn3") + shortcut)


@pytest.mark.parametrize(
    "file, preset",
    [
        ("detectron2", "detectron2/mask_rcnn_R_50_FPN_3x_gn"),  # BGR 0-255, std 1
        ("detectron2", "detectron2/scratch_mask_rcnn_R_50_FPN_9x_gn"),  # BGR 0-255, std 57
        ("mmdet", "mmdet/mask_rcnn_r50_fpn_gn-all_scratch_6x_coco"),  # RGB 0-255, std 58
        ("mmdet", "mmdet/mask_rcnn_r50_fpn_gn-all_2x_coco"),  # BGR 0-255, std 1
        ("caffe2", "detectron2/R-50-GN"),
    ],
)
def test_imported_stem_and_first_block_see_rgb_as_upstream_sees_its_input(files, file, preset):
    path, arrays, entries = files[file]
    model, meta = _convert(path, preset)
    prep = PRESETS[preset].preprocessing
    body_prefix = "body." if meta["task"] == "classification" else "backbone.body."
    upstream = {  # the upstream tensors, by the torchvision name of the module they belong to
        target.removeprefix(body_prefix): torch.from_numpy(arrays[key])
        for key, _, target, _ in entries
        if target.startswith(body_prefix)
    }
    image = torch.rand(3, 48, 40, generator=torch.Generator().manual_seed(0))  # RGB in [0, 1]
    raw = (image.flip(0) if prep.channel_order == "BGR" else image) * prep.value_range
    raw = (raw - torch.tensor(prep.mean)[:, None, None]) / torch.tensor(prep.std)[:, None, None]
    want = _stem_and_first_block(upstream, raw[None])

    transform = model.transform if meta["task"] == "detection" else build_transform(meta["model_config"])
    body = model.backbone.body if meta["task"] == "detection" else model.body
    with torch.no_grad():
        got = body.layer1[0](body.maxpool(body.relu(body.bn1(body.conv1(transform.normalize(image)[None])))))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ---- torchvision: its own detectors, as its builders build them for the published weights ----


def _torchvision_reference(name: str) -> nn.Module:
    """torchvision's detector as `torchvision.models.detection.<name>(weights=COCO_V1)` builds it, random weights:
    v1 with FrozenBatchNorm and eps 0 (overwrite_eps), v2 as its builder makes it. v1 files are written with the
    key names of 2019 (before version 2 of the RPN head, FPN and mask head), as its published files have them."""
    builders = torchvision.models.detection
    if name.endswith("_v2"):
        return getattr(builders, name)(weights=None, weights_backbone=None)
    backbone = _resnet_fpn_extractor(torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d), 3)
    model = (MaskRCNN if name.startswith("mask") else FasterRCNN)(backbone, num_classes=91)
    overwrite_eps(model, 0.0)
    return model


def _before_version_2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The key names of torchvision's first COCO files (2019), which predate version 2 of its RPN head, FPN and
    mask head: the renames their ``_load_from_state_dict`` undo, in reverse."""
    renames = (
        (re.compile(r"rpn\.head\.conv\.0\.0\.(weight|bias)"), r"rpn.head.conv.\1"),
        (re.compile(r"backbone\.fpn\.(inner|layer)_blocks\.(\d)\.0\.(weight|bias)"), r"backbone.fpn.\1_blocks.\2.\3"),
        (
            re.compile(r"roi_heads\.mask_head\.(\d)\.0\.(weight|bias)"),
            lambda m: f"roi_heads.mask_head.mask_fcn{int(m[1]) + 1}.{m[2]}",
        ),
    )
    old = {}
    for key, value in state.items():
        for pattern, replacement in renames:
            key = pattern.sub(replacement, key)
        old[key] = value
    assert "rpn.head.conv.weight" in old and "backbone.fpn.inner_blocks.0.weight" in old
    return old


def _randomise(model: nn.Module, seed: int) -> None:
    """Random norms (scales, shifts, running statistics) so that a swapped norm shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.dim() != 1 or not tensor.is_floating_point():
                continue
            if name.endswith(("running_var", "weight")):
                tensor.copy_(torch.rand(tensor.shape, generator=g) + 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.1)


def _outputs(model: nn.Module, images: list[torch.Tensor]) -> tuple[dict[str, list[torch.Tensor]], list[dict]]:
    """Every tensor output of every module but the ReLUs (convs, norms, FPN blocks, heads; a module run once per
    FPN level gives one per level), and the detections."""
    found: dict[str, list[torch.Tensor]] = {}

    def record(name: str):
        def hook(_module, _inputs, output) -> None:
            if isinstance(output, torch.Tensor):
                found.setdefault(name, []).append(output.clone())

        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if n and not isinstance(m, nn.ReLU)]
    with torch.no_grad():
        detections = model(images)
    for handle in handles:
        handle.remove()
    return found, detections


@pytest.mark.parametrize(
    "name",
    ["fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2"],
)
def test_torchvision_detectors_compute_what_torchvision_computes(tmp_path, name):
    torch.manual_seed(0)
    reference = _torchvision_reference(name)
    _randomise(reference, seed=1)
    path = tmp_path / f"{name}.pth"
    state = reference.state_dict()
    torch.save(state if name.endswith("_v2") else _before_version_2(state), path)
    out = tmp_path / "imported.pt"
    import_checkpoint({}, path, out, preset=f"torchvision/{name}", model_json=json.dumps(SMALL))
    model, meta = load_checkpoint(out)
    assert meta["provenance"]["source"]["file"] == path.name and meta["provenance"]["source"]["preset"].endswith(name)
    assert meta["category_ids"][11] is None and meta["category_ids"][12] == 13  # torchvision's "N/A" at label 12

    reference.eval()
    reference.transform.min_size, reference.transform.max_size = (SMALL["min_size"],), SMALL["max_size"]
    for detector in (model, reference):  # the same test-time settings on both, small enough for the CPU
        detector.roi_heads.score_thresh = 0.0  # random weights: keep low-scoring detections to compare
        detector.roi_heads.detections_per_img = 10
        detector.rpn._pre_nms_top_n["testing"], detector.rpn._post_nms_top_n["testing"] = 200, 40
    images = [torch.rand(3, 80, 100, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    ours, our_detections = _outputs(model, images)
    theirs, their_detections = _outputs(reference, images)
    shared = sorted(set(ours) & set(theirs))
    assert len(shared) > 150 and "backbone.body.layer4.2.bn3" in shared and "backbone.fpn.layer_blocks.3" in shared
    for key in shared:
        torch.testing.assert_close(ours[key], theirs[key], msg=lambda m, key=key: f"{key}: {m}")
    assert sum(len(d["boxes"]) for d in their_detections) > 0
    for mine, reference_output in zip(our_detections, their_detections, strict=True):
        assert mine.keys() == reference_output.keys()
        for key in mine:
            torch.testing.assert_close(mine[key], reference_output[key])


# ---- errors: one line naming the file and key, nothing written ----


def _import_cli(capsys, *args: str) -> tuple[int, str]:
    code = cli.main(["import", *args])
    return code, capsys.readouterr().err


def _pickle(path: Path, arrays: dict) -> Path:
    return write_detectron2(path, arrays)


def _assert_refused(capsys, tmp_path, weights: Path, preset: str, pattern: str, *extra: str) -> None:
    out = tmp_path / "out" / "imported.pt"
    chosen = ["--preset", preset] if preset else []
    code, err = _import_cli(capsys, "--weights", str(weights), "--out", str(out), *chosen, *extra)
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith("eigpipe import: error: ") and re.search(pattern, err), err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))  # nothing written, no temp litter


def test_a_file_of_an_unknown_format_is_refused(capsys, tmp_path, files):
    text = tmp_path / "notes.pkl"
    text.write_text("not a pickle")
    _assert_refused(
        capsys, tmp_path, text, "detectron2/mask_rcnn_R_50_FPN_3x_gn", r"notes\.pkl: not a detectron2 \.pkl"
    )
    mmdet_file = files["mmdet"][0]
    _assert_refused(
        capsys, tmp_path, mmdet_file, "detectron2/mask_rcnn_R_50_FPN_3x_gn", r"mmdet\.file: not a detectron2 \.pkl"
    )
    _assert_refused(
        capsys,
        tmp_path,
        files["detectron2"][0],
        "mmdet/mask_rcnn_r50_fpn_gn-all_2x_coco",
        r"not an mmdetection checkpoint",
    )
    _assert_refused(
        capsys,
        tmp_path,
        files["caffe2"][0],
        "detectron2/mask_rcnn_R_50_FPN_3x_gn",
        r"imports a detector; this file holds a caffe2",
    )


def test_a_key_that_lands_nowhere_is_named(capsys, tmp_path, files):
    arrays = {**files["detectron2"][1], "roi_heads.keypoint_head.conv_fcn1.weight": np.zeros((2, 2), np.float32)}
    weights = _pickle(tmp_path / "extra.pkl", arrays)
    _assert_refused(
        capsys,
        tmp_path,
        weights,
        "detectron2/mask_rcnn_R_50_FPN_3x_gn",
        r"extra\.pkl: key roi_heads\.keypoint_head\.conv_fcn1\.weight lands nowhere",
    )


def test_a_parameter_no_key_fills_is_named(capsys, tmp_path, files):
    arrays = dict(files["detectron2"][1])
    del arrays["roi_heads.mask_head.mask_fcn2.norm.weight"]
    weights = _pickle(tmp_path / "short.pkl", arrays)
    _assert_refused(
        capsys,
        tmp_path,
        weights,
        "detectron2/mask_rcnn_R_50_FPN_3x_gn",
        r"short\.pkl: the model's roi_heads\.mask_head\.1\.1\.weight is filled by no key of the file",
    )


def test_a_shape_that_differs_names_the_key_and_both_shapes(capsys, tmp_path, files):
    arrays = {**files["detectron2"][1], "backbone.bottom_up.res3.0.conv2.weight": np.zeros((96, 128, 3, 3), np.float32)}
    weights = _pickle(tmp_path / "wide.pkl", arrays)
    _assert_refused(
        capsys,
        tmp_path,
        weights,
        "detectron2/mask_rcnn_R_50_FPN_3x_gn",
        r"wide\.pkl: key backbone\.bottom_up\.res3\.0\.conv2\.weight has shape \[96, 128, 3, 3\], "
        r"the model's backbone\.body\.layer2\.0\.conv2\.weight takes \[128, 128, 3, 3\]",
    )


FROM_DETECTRON2 = ("--from", "detectron2", "--pixel-mean", "1", "2", "3", "--pixel-std", "1", "1", "1")
FROM_DETECTRON2 += ("--channel-order", "BGR")


def test_a_class_count_the_model_cannot_take_is_refused(capsys, tmp_path, files):
    arrays = dict(files["detectron2"][1])
    rng = np.random.default_rng(0)
    for key, rows in (("roi_heads.box_predictor.cls_score", 4), ("roi_heads.box_predictor.bbox_pred", 12)):
        arrays[f"{key}.weight"] = rng.normal(size=(rows, 1024)).astype(np.float32)
        arrays[f"{key}.bias"] = np.zeros(rows, np.float32)
    arrays["roi_heads.mask_head.predictor.weight"] = rng.normal(size=(3, 256, 1, 1)).astype(np.float32)
    arrays["roi_heads.mask_head.predictor.bias"] = np.zeros(3, np.float32)
    weights = _pickle(tmp_path / "three.pkl", arrays)
    preset = "detectron2/mask_rcnn_R_50_FPN_3x_gn"
    _assert_refused(
        capsys,
        tmp_path,
        weights,
        preset,
        rf"roi_heads\.box_predictor\.cls_score\.weight has 4 outputs; preset {preset} takes 81",
    )
    _assert_refused(
        capsys, tmp_path, weights, None, r"has 4 outputs \(3 classes and background\), not COCO's 80", *FROM_DETECTRON2
    )


@pytest.mark.parametrize(
    ("dropped", "pattern"),
    [
        (("backbone.fpn_lateral2.",), r"the model's backbone\.fpn\.inner_blocks\.0\.0\.weight is filled by no key"),
        (("roi_heads.box_head.fc1.weight",), r"the model's roi_heads\.box_head\.5\.weight is filled by no key"),
        (
            ("roi_heads.box_head.conv", "roi_heads.box_head.fc1.weight"),
            r"the model's roi_heads\.box_head\.fc6\.weight is filled by no key",
        ),
        (("backbone.bottom_up.res5.",), r"the state dict has no backbone\.body\.layer4\.0\.conv1\.weight"),
    ],
)
def test_from_a_file_lacking_what_the_architecture_is_read_off_names_file_and_tensor(
    capsys, tmp_path, files, dropped, pattern
):
    """--from reads the FPN width, the box head and the ResNet stages off the file: a file without them is named."""
    arrays = {k: v for k, v in files["detectron2"][1].items() if not k.startswith(dropped)}
    weights = _pickle(tmp_path / "short.pkl", arrays)
    _assert_refused(capsys, tmp_path, weights, None, rf"short\.pkl: {pattern}", *FROM_DETECTRON2)


@pytest.mark.parametrize(
    ("file", "preset", "key"),
    [
        ("detectron2", "detectron2/mask_rcnn_R_50_FPN_3x_gn", "roi_heads.box_predictor.cls_score.weight"),
        ("detectron2", "detectron2/mask_rcnn_R_50_FPN_3x_gn", "roi_heads.box_predictor.cls_score.bias"),
        ("mmdet", "mmdet/mask_rcnn_r50_fpn_gn-all_2x_coco", "roi_head.bbox_head.fc_cls.weight"),
    ],
)
def test_a_classifier_tensor_of_no_rows_is_named(capsys, tmp_path, files, file, preset, key):
    arrays = {**files[file][1], key: np.zeros((), np.float32)}
    weights = (write_detectron2 if file == "detectron2" else write_mmdet)(tmp_path / "scalar.file", arrays)
    _assert_refused(capsys, tmp_path, weights, preset, rf"scalar\.file: key {re.escape(key)} has shape \[\]")


@pytest.mark.parametrize(
    ("file", "key", "value", "pattern"),
    [
        ("detectron2", "backbone.bottom_up.res2.0.conv1.weight", np.nan, "has non-finite values"),
        ("detectron2", "roi_heads.box_predictor.bbox_pred.bias", np.inf, "has non-finite values"),
        ("torchvision", "backbone.body.bn1.running_var", -1.0, "has negative values"),
    ],
)
def test_weights_no_model_can_compute_with_are_refused_before_writing(
    capsys, tmp_path, files, file, key, value, pattern
):
    """NaN, Inf or a negative running variance would be written, and refused by every stage that loads it."""
    if file == "detectron2":
        arrays = {k: v.copy() for k, v in files["detectron2"][1].items()}
        arrays[key].reshape(-1)[0] = value
        weights, preset = _pickle(tmp_path / "broken.file", arrays), "detectron2/mask_rcnn_R_50_FPN_3x_gn"
    else:
        state = _torchvision_reference("fasterrcnn_resnet50_fpn").state_dict()
        state[key][0] = value
        weights, preset = tmp_path / "broken.file", "torchvision/fasterrcnn_resnet50_fpn"
        torch.save(state, weights)
    _assert_refused(capsys, tmp_path, weights, preset, rf"broken\.file: key {re.escape(key)} {pattern}")


def test_a_user_file_imports_with_its_preprocessing_stated(tmp_path, files):
    """--from: the architecture is read off the file (here detectron2's GN model with 3 classes of one's own)."""
    arrays = dict(files["detectron2"][1])
    for key, rows in (("roi_heads.box_predictor.cls_score", 4), ("roi_heads.box_predictor.bbox_pred", 12)):
        arrays[f"{key}.weight"] = np.zeros((rows, 1024), np.float32)
        arrays[f"{key}.bias"] = np.arange(rows, dtype=np.float32)
    arrays["roi_heads.mask_head.predictor.weight"] = np.zeros((3, 256, 1, 1), np.float32)
    arrays["roi_heads.mask_head.predictor.bias"] = np.zeros(3, np.float32)
    weights = _pickle(tmp_path / "mine.pkl", arrays)
    request = make_request(
        family="detectron2",
        pixel_mean=[103.53, 116.28, 123.675],
        pixel_std=[57.375, 57.12, 58.395],
        channel_order="BGR",
        category_ids=[1, 2, 3],
        model=SMALL,
    )
    model, meta = convert(weights, request, run="mine", init="scratch")
    cfg = meta["model_config"]
    assert meta["model_name"] == "mask_rcnn" and meta["category_ids"] == [1, 2, 3] and meta["num_classes"] == 4
    assert cfg["norm"] == "gn" and cfg["head_norm"] == "gn" and cfg["box_head"]["conv_layers"] == [256] * 4
    assert cfg["roi_align"] == {"aligned": True, "sampling_ratio": 0}
    torch.testing.assert_close(cfg["image_std"], [58.395 / 255, 57.12 / 255, 57.375 / 255])
    assert model.roi_heads.box_predictor.cls_score.bias.tolist() == [3.0, 0.0, 1.0, 2.0]  # background first


def test_pixel_statistics_a_file_stores_must_agree(capsys, tmp_path, files):
    arrays = {**files["detectron2"][1], "pixel_mean": np.array([[[1.0]], [[2.0]], [[3.0]]], np.float32)}
    weights = _pickle(tmp_path / "mean.pkl", arrays)
    _assert_refused(
        capsys, tmp_path, weights, "detectron2/mask_rcnn_R_50_FPN_3x_gn", r"pixel_mean is \[1\.0, 2\.0, 3\.0\]"
    )


class _Payload:
    """An object whose unpickling calls ``call(*args)``."""

    def __init__(self, call, *args) -> None:
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_the_restricted_unpickler_runs_no_code(capsys, tmp_path, protocol):
    import codecs
    import os

    marker = tmp_path / "ran"
    for payload, pattern in (
        (Path("/"), r"is not a numpy array"),
        (_Payload(os.mkdir, str(marker)), r"posix\.mkdir is not a numpy array"),
        (_Payload(codecs.encode, "text", "rot13"), r"_codecs\.encode with 'rot13' does not rebuild bytes"),
    ):
        path = tmp_path / "evil.pkl"
        path.write_bytes(pickle.dumps({"model": {"x": payload}, "__author__": "x"}, protocol=protocol))
        _assert_refused(capsys, tmp_path, path, "detectron2/mask_rcnn_R_50_FPN_3x_gn", pattern)
        assert not marker.exists()


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_detectron2_pickles_of_every_protocol_are_read(tmp_path, protocol):
    """Protocol 5 (Python 3.14's default) rebuilds arrays with numpy's _frombuffer, protocols 0-2 bytes with
    _codecs.encode(text, "latin1"): both build data only and are allowed."""
    from eigpipe.models.published import from_detectron2

    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.arange(3, dtype=">f8")}
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps({"model": arrays, "__author__": "x"}, protocol=protocol))
    state, kind = from_detectron2.read(path)
    assert kind == "detector" and state.keys() == arrays.keys()
    for key, value in arrays.items():
        assert np.array_equal(state[key].numpy(), value)


@pytest.mark.parametrize("value", [np.array(["a", "b"]), np.array([1, None], dtype=object)])
def test_a_detectron2_array_of_no_numbers_is_named(capsys, tmp_path, value):
    weights = _pickle(tmp_path / "text.pkl", {"backbone.bottom_up.stem.conv1.weight": value})
    pattern = rf"text\.pkl: entry backbone\.bottom_up\.stem\.conv1\.weight is an array of {re.escape(str(value.dtype))}"
    _assert_refused(capsys, tmp_path, weights, "detectron2/mask_rcnn_R_50_FPN_3x_gn", pattern)


def _sparse_mmdet(path: Path) -> None:
    torch.save({"state_dict": {"rpn_head.rpn_cls.weight": torch.eye(3).to_sparse()}, "meta": {}}, path)


def _plain_pickle(path: Path) -> None:
    path.write_bytes(pickle.dumps({"state_dict": {"rpn_head.rpn_cls.weight": np.eye(3)}}, protocol=4))


@pytest.mark.parametrize(
    ("write", "pattern"),
    [
        (_sparse_mmdet, r"key rpn_head\.rpn_cls\.weight is a torch\.sparse_coo tensor"),
        (_plain_pickle, r"not an mmdetection checkpoint \(a damaged file or not a torch file"),
    ],
)
def test_a_torch_file_the_import_cannot_use_is_one_line(capsys, tmp_path, recwarn, write, pattern):
    """A sparse tensor, or a plain pickle where torch reads the file (without torch's warning about it)."""
    weights = tmp_path / "odd.pth"
    write(weights)
    _assert_refused(capsys, tmp_path, weights, "mmdet/mask_rcnn_r50_fpn_gn-all_2x_coco", rf"odd\.pth: {pattern}")
    assert [str(w.message) for w in recwarn] == []


@pytest.mark.parametrize(
    ("ids", "pattern"),
    [(["1", "1", "2"], r"--category-ids: 1 is given twice"), (["-1", "2", "3"], r"--category-ids: -1 is negative")],
)
def test_category_ids_are_each_given_once_and_not_negative(capsys, tmp_path, files, ids, pattern):
    weights = files["detectron2"][0]
    _assert_refused(capsys, tmp_path, weights, None, pattern, *FROM_DETECTRON2, "--category-ids", *ids)


@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        (("--from", "torchvision"), r"gone\.pth: weights file not found"),  # not the missing pixel options
        (("--preset", "detectron2/mask_rcnn_R_50_FPN_3x_gn", "--run", "../x"), r"--run: '\.\./x' is not a run name"),
        (("--preset", "detectron2/mask_rcnn_R_50_FPN_3x_gn", "--run", ".."), r"--run: '\.\.' is not a run name"),
    ],
)
def test_a_missing_file_or_a_bad_run_name_is_named_first(capsys, tmp_path, extra, pattern):
    weights = tmp_path / "gone.pth"
    if "--run" in extra:  # a file there, never read: the run name is checked first
        weights.write_bytes(b"")
    _assert_refused(capsys, tmp_path, weights, None, pattern, *extra)


@pytest.mark.parametrize(
    ("model_json", "pattern"),
    [
        ('{"norm": "bn"}', r"--model-json: norm is set by the weights"),
        ('{"min_size": 600, "min_size": 700}', r"--model-json: key 'min_size' given twice"),
    ],
)
def test_an_import_sets_only_test_time_model_keys(capsys, tmp_path, files, model_json, pattern):
    weights, preset = files["detectron2"][0], "detectron2/mask_rcnn_R_50_FPN_3x_gn"
    _assert_refused(capsys, tmp_path, weights, preset, pattern, "--model-json", model_json)


def test_a_detector_normalises_its_images_as_its_init_expects(tmp_path, tiny_model, complete):
    """A GN classifier imported with BGR 0-255 preprocessing folded in (image_std 1/255) is the init of a detector
    only with the same image_mean and image_std."""
    from eigpipe.models import Classifier, build_body, save_checkpoint
    from eigpipe.train.loop import _check_pretrained_input

    folded = {**tiny_model, "image_std": [1 / 255] * 3}
    path = tmp_path / "classifier.pt"
    save_checkpoint(path, Classifier(build_body(folded), 10), {"task": "classification", "model_config": folded})
    _check_pretrained_input(folded, path)
    with pytest.raises(EigpipeError, match=r"its weights expect image_mean .* image_std \[0\.0039"):
        _check_pretrained_input(tiny_model, path)


def test_aligned_roi_align_pools_each_box_from_its_level_with_half_pixel_alignment():
    from collections import OrderedDict

    from torchvision.ops import MultiScaleRoIAlign, roi_align

    from eigpipe.models.poolers import AlignedMultiScaleRoIAlign

    g = torch.Generator().manual_seed(0)
    features = OrderedDict((str(i), torch.randn(2, 3, 64 >> i, 64 >> i, generator=g)) for i in range(4))
    boxes = [torch.tensor([[2.0, 3.0, 20.0, 30.0], [0.0, 0.0, 250.0, 250.0]]), torch.tensor([[10.0, 5.0, 130.0, 90.0]])]
    aligned = AlignedMultiScaleRoIAlign(list(features), 7, 0)
    pooled = aligned(features, boxes, [(256, 256)] * 2)
    levels = aligned.map_levels(boxes)
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(boxes)])
    assert sorted(set(levels.tolist())) == [0, 2]  # the boxes fall on two levels
    for k, level in enumerate(levels.tolist()):
        scale = 1 / 4 / 2**level
        want = roi_align(features[str(level)], rois[k : k + 1], 7, scale, sampling_ratio=0, aligned=True)
        torch.testing.assert_close(pooled[k : k + 1], want)
    unaligned = MultiScaleRoIAlign(list(features), 7, 0)(features, boxes, [(256, 256)] * 2)
    assert not torch.allclose(pooled, unaligned)
