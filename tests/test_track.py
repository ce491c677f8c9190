"""The library's tracker (eigpipe.track) on models eigpipe did not build: statistics against a NumPy float64
reference of the per-sample-weighted second moment and mean, layouts, reused modules, hooks, training, DDP; and on
an eigpipe detector, the same store as `eigpipe covariance`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from torch import nn

import eigpipe
from eigpipe import cli
from eigpipe.errors import EigpipeError
from eigpipe.spectral import store
from tests.helpers import covariance_args

torch.set_num_threads(1)


def reference(samples: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Float64 (second moment, mean) of samples [C, P_i]: averaged over each sample's positions, then samples."""
    flat = [np.asarray(f, dtype=np.float64).reshape(f.shape[0], -1) for f in samples]
    return sum(f @ f.T / f.shape[1] for f in flat) / len(flat), sum(f.mean(axis=1) for f in flat) / len(flat)


def capture(model: nn.Module, names: list[str]) -> tuple[dict[str, list[torch.Tensor]], list]:
    """Every call's output of the named modules, in call order (plain hooks, removed by the caller)."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = [
        model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: seen[name].append(o.detach()))
        for name in names
    ]
    return seen, handles


def assert_close(acc, samples: list[np.ndarray], tol: float = 1e-10) -> None:
    second, mean = reference(samples)
    assert acc.count == len(samples)
    assert np.linalg.norm(acc.second_moment.numpy() - second) <= tol * np.linalg.norm(second)
    assert np.linalg.norm(acc.mean.numpy() - mean) <= tol * max(np.linalg.norm(mean), 1e-30)


def per_sample(outputs: list[torch.Tensor]) -> list[np.ndarray]:
    """[N, C, ...] outputs -> one [C, positions] array per sample."""
    return [o[i].double().reshape(o.shape[1], -1).numpy() for o in outputs for i in range(o.shape[0])]


def hook_state(model: nn.Module) -> dict[str, tuple]:
    return {
        name: (len(m._forward_hooks), len(m._forward_pre_hooks), sorted(vars(m))) for name, m in model.named_modules()
    }


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=5).eval()


def test_torchvision_classifier_against_a_float64_reference(resnet: nn.Module) -> None:
    """Conv maps, vectors and a ReLU that each BasicBlock runs twice (kept apart as relu#0 / relu#1)."""
    batches = [torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    names = ["layer1.0.conv1", "layer2.0.relu", "avgpool", "fc"]
    seen, handles = capture(resnet, names)
    with torch.inference_mode(), eigpipe.track(resnet, names) as tracker:
        for batch in batches:
            resnet(batch)
    for handle in handles:
        handle.remove()
    accs = tracker.accumulators
    assert [layer.name for layer in tracker.layers] == [
        "layer1.0.conv1",
        "layer2.0.relu#0",
        "layer2.0.relu#1",
        "avgpool",
        "fc",
    ]
    assert_close(accs["layer1.0.conv1"], per_sample(seen["layer1.0.conv1"]))
    relu = seen["layer2.0.relu"]  # two calls per forward: after bn1, and after the residual sum
    assert_close(accs["layer2.0.relu#0"], per_sample(relu[0::2]))
    assert_close(accs["layer2.0.relu#1"], per_sample(relu[1::2]))
    assert_close(accs["avgpool"], per_sample(seen["avgpool"]))
    assert_close(accs["fc"], per_sample(seen["fc"]))
    assert tracker.layers[0].tap == "layer1.0.conv1"  # a foreign model: the selected module's own output
    table = tracker.spectra()
    assert list(table["layer"]) == [layer.name for layer in tracker.layers] and (table["n_images"] == 6).all()
    assert {"saturation", "rankme", "centered_alpha", "participation_ratio"} <= set(table.columns)


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=24, num_classes=3
    ).eval()


@pytest.mark.parametrize("prefix", ["drop", "keep", "only"])
def test_transformer_tokens_against_a_float64_reference(vit: nn.Module, prefix: str) -> None:
    """[N, T, C] token features, per sample over its tokens; the class token dropped, kept or taken alone; and a
    padding mask of real tokens."""
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 17, dtype=torch.bool)
    mask[0, 10:] = False
    mask[2, 3:] = False
    names = ["encoder.layers.encoder_layer_0.mlp.0", "encoder.ln"]
    seen, handles = capture(vit, names)
    with torch.inference_mode(), eigpipe.track(vit, names, prefix_tokens=1, prefix=prefix) as tracker:
        vit(x)
        tracker.mask_tokens(mask)
        vit(x)
    for handle in handles:
        handle.remove()
    part = {"drop": slice(1, None), "keep": slice(None), "only": slice(0, 1)}[prefix]
    for name in names:
        plain, masked = seen[name]
        samples = [plain[i, part].T.double().numpy() for i in range(3)]
        samples += [masked[i, part][mask[i, part]].T.double().numpy() for i in range(3)]
        assert_close(tracker.accumulators[name], samples)
        assert tracker.layers[names.index(name)].feature_shape == [plain.shape[-1], samples[0].shape[1], 1]


@pytest.mark.parametrize(
    ("prefix", "tokens", "message"),
    [("drop", 17, "17 prefix tokens leave none of its 17"), ("only", 18, "18 prefix tokens are more than its 17")],
)
def test_more_prefix_tokens_than_a_layer_has_are_one_line(vit: nn.Module, prefix, tokens, message) -> None:
    x = torch.rand(1, 3, 32, 32)
    tracker = eigpipe.track(vit, "encoder.ln", prefix_tokens=tokens, prefix=prefix)
    with pytest.raises(EigpipeError, match=f"^layer encoder.ln: {message} tokens$"), torch.inference_mode(), tracker:
        vit(x)


def test_a_token_mask_is_boolean_or_zero_one_of_n_by_t() -> None:
    """A nested list is a mask as a tensor is; a 3-D mask or one with other values is a one-line error."""
    model = nn.Sequential(nn.Linear(4, 3))
    tokens = torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(0))
    tables = []
    for mask in ([[True, False, True], [True, True, True]], torch.tensor([[1, 0, 1], [1, 1, 1]])):
        with torch.inference_mode(), eigpipe.track(model, "0") as tracker:
            tracker.mask_tokens(mask)
            model(tokens)
        tables.append(tracker.spectra())
        assert tracker.accumulators["0"].positions == 5
    pd.testing.assert_frame_equal(tables[0], tables[1])
    for bad, message in [
        (torch.ones(2, 3, 1), r"a mask of shape \(2, 3, 1\), not \[N, T\]"),
        ([[1.0, 0.5]], "a mask holds True / False"),
    ]:
        with pytest.raises(EigpipeError, match=f"^mask_tokens: {message}"):
            tracker.mask_tokens(bad)


@pytest.mark.parametrize("size", [4, 1, 64])
def test_a_layer_whose_channels_change_is_a_one_line_error(size: int) -> None:
    """Vectors (size 1), small maps (computed in groups, size 4) and large ones (size 64) alike."""
    model = nn.Sequential(nn.Identity())
    with pytest.raises(EigpipeError, match=r"^layer 0: 5 channels in batch 1, 3 before; a layer's channels must"):  # noqa: SIM117
        with torch.inference_mode(), eigpipe.track(model, "0"):
            for channels in (3, 5):  # the second batch takes a map's direct path first
                shape = (2, channels, size, size) if size > 1 else (2, channels)
                model(torch.rand(shape))


def test_modules_acting_on_the_last_axis_are_read_channels_last() -> None:
    """A Linear or LayerNorm on [N, H, W, C] maps (Swin, ConvNeXt blocks) keeps the channels last: axis 1 would
    take the height for the channels."""
    from torchvision.ops.misc import Permute

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 2, stride=2), Permute([0, 2, 3, 1]), nn.LayerNorm(8)),  # as Swin's stem
        nn.Linear(8, 12),
    ).eval()
    x = torch.rand(3, 3, 10, 10)
    with torch.inference_mode(), eigpipe.track(model, ["0", "1"]) as tracker:
        model(x)
    with torch.inference_mode():
        stem = model[0](x)
        outputs = {"0": stem, "1": model[1](stem)}
    for name, output in outputs.items():
        assert tracker.accumulators[name].channels == output.shape[-1]
        assert_close(tracker.accumulators[name], per_sample([output.permute(0, 3, 1, 2)]))


def test_channels_last_tuple_outputs_and_conv1d() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 5, 3)
            self.last = nn.Identity()  # sees a channels-last view
            self.pair = nn.LSTM(5, 4, batch_first=True)  # returns (output, (h, c))
            self.line = nn.Conv1d(5, 6, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            self.last(y.permute(0, 2, 3, 1))
            self.pair(y.flatten(2).transpose(1, 2))
            return self.line(y.flatten(2))

    torch.manual_seed(0)
    model, x = Model().eval(), torch.rand(2, 3, 9, 9)
    options = {"channel_axis": {"last": -1, "line": 1}, "output_index": {"pair": 0}}
    with torch.inference_mode(), eigpipe.track(model, ["conv", "last", "pair", "line"], **options) as tracker:
        model(x)
    accs = tracker.accumulators
    for key in ("second_moment", "mean"):
        assert torch.allclose(getattr(accs["last"], key), getattr(accs["conv"], key), rtol=1e-12, atol=0)
    with torch.inference_mode():
        y = model.conv(x)
        lstm = model.pair(y.flatten(2).transpose(1, 2))[0]
        line = model.line(y.flatten(2))
    assert_close(accs["pair"], [lstm[i].T.double().numpy() for i in range(2)])
    assert_close(accs["line"], per_sample([line]))
    with (
        pytest.raises(
            EigpipeError, match=r"layer pair: its output is a tuple of 2; choose an element with output_index"
        ),
        torch.inference_mode(),
        eigpipe.track(model, ["pair"]),
    ):
        model(x)
    spectral = nn.Sequential(nn.Identity())  # a complex output would lose its imaginary part in real buffers
    with pytest.raises(EigpipeError, match=r"layer 0: its output is complex \(torch.complex64\)"):  # noqa: SIM117
        with eigpipe.track(spectral, "0"):
            spectral(torch.fft.fft(torch.rand(4, 6)))


def test_hooks_are_removed_after_an_exception_and_nothing_is_written_on_the_modules() -> None:
    class Boom(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), Boom())
    before = hook_state(model)
    with pytest.raises(RuntimeError, match="boom"), eigpipe.track(model, ["0", "Conv2d:*", "1"]):
        assert hook_state(model) != before  # hooked inside
        model(torch.rand(2, 3, 8, 8))
    assert hook_state(model) == before
    # an error inside a hook (a tuple output without output_index) too
    lstm = nn.Sequential(nn.LSTM(3, 2))
    before = hook_state(lstm)
    with pytest.raises(EigpipeError, match="output_index"), eigpipe.track(lstm, ["0"]):
        lstm(torch.rand(2, 1, 3))
    assert hook_state(lstm) == before


def test_a_layer_that_never_runs_is_named_in_a_warning_after_the_first_batch() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    model = Branchy()
    with pytest.warns(UserWarning, match=r"1 selected layer\(s\) did not run in the first batch: unused"):  # noqa: SIM117
        with torch.inference_mode(), eigpipe.track(model, ["Linear:*"]) as tracker:
            model(torch.rand(5, 4))
            model(torch.rand(5, 4))  # warned once, after the first batch
    assert list(tracker.spectra()["layer"]) == ["used"]


def test_one_selector_may_be_given_alone() -> None:
    """``layers="Linear:*"`` is that one selector (not its characters, each a selector of its own)."""
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    tables = []
    for layers in ("Linear:*", ["Linear:*"]):
        with torch.inference_mode(), eigpipe.track(model, layers) as tracker:
            model(torch.rand(6, 4, generator=torch.Generator().manual_seed(0)))
        tables.append(tracker.spectra())
    assert list(tables[0]["layer"]) == ["0", "2"]
    pd.testing.assert_frame_equal(tables[0], tables[1])


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_batches_of_no_samples_add_nothing(precision: str) -> None:
    """Forward passes on empty batches, first or between others, leave every layer's statistics as they are
    without them (conv maps, vectors, tokens)."""

    class Both(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc, self.mix = nn.Conv2d(3, 8, 3), nn.Linear(27, 5), nn.Linear(9, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).sum() + self.fc(x.flatten(1)).sum() + self.mix(x.flatten(2)).sum()

    model = Both()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.rand(n, 3, 3, 3, generator=gen) for n in (0, 4, 0, 3)]
    tables = []
    for stream in (batches, [b for b in batches if len(b)]):
        with torch.inference_mode(), eigpipe.track(model, "Linear:*", precision=precision) as tracker:
            for batch in stream:
                model(batch)
        with torch.inference_mode(), eigpipe.track(model, "conv", precision=precision) as convs:
            for batch in stream:
                model(batch)
        tables.append(pd.concat([tracker.spectra(), convs.spectra()], ignore_index=True))
    assert list(tables[0]["layer"]) == ["fc", "mix", "conv"] and set(tables[0]["n_images"]) == {7}
    pd.testing.assert_frame_equal(tables[0], tables[1])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"every": 0}, r"every: 0 is not a whole number >= 1"),
        ({"every": True}, r"every: True is not a whole number >= 1"),
        ({"channel_axis": "-1"}, r"channel_axis: '-1' is not a whole number or a \{layer glob: whole number\} dict"),
        ({"output_index": {"pair": 0.0}}, r"output_index: \{'pair': 0.0\} is not a whole number or a \{layer glob"),
        ({"prefix_tokens": 1.5}, r"prefix_tokens: 1.5 is not a whole number >= 0"),
        ({"prefix_tokens": -1}, r"prefix_tokens: -1 is not a whole number >= 0"),
        ({"run": 7}, r"run: 7 is not a name"),
        ({"layers": 3}, r"layers: no list of layer selectors given"),
        ({"layers": ["0", None]}, r"layers: None is not a selector \(a module-path glob, Type:glob or preset name\)"),
        ({"layers": [""]}, r"layers: '' is not a selector"),
        ({"save_every": "8"}, r"save_every: '8' is not a whole number >= 1"),
    ],
)
def test_bad_tracker_options_are_one_line_errors(tmp_path: Path, options: dict, message: str) -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(EigpipeError, match=f"^{message}"):
        rest = {key: value for key, value in options.items() if key != "layers"}
        if "save_every" in options:
            eigpipe.track_training(model, options.get("layers", "0"), tmp_path / "dynamics", **rest)
        else:
            eigpipe.track(model, options.get("layers", "0"), **rest)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"iteration": -1}, r"iteration: -1 is not a whole number >= 0"),
        ({"iteration": "3"}, r"iteration: '3' is not a whole number >= 0"),
        ({"attrs": ["imagenet"]}, r"attrs: give a dict of JSON values, not a list"),
        ({"attrs": {"task": "covariance"}}, r"attrs: task is recorded by eigpipe itself"),
        ({"attrs": {"kind": "x"}}, r"attrs: kind is recorded by eigpipe itself"),
        ({"attrs": {"run": "x"}}, r"attrs: run is recorded by eigpipe itself \(give run= to eigpipe.track\)"),
        ({"attrs": {"lr": np.float32(0.1)}}, r"attrs: lr: np.float32\(0.1\) is not a JSON value"),
        ({"attrs": {"loss": float("nan")}}, r"attrs: loss: nan is not a JSON value"),
    ],
)
def test_save_refuses_a_bad_iteration_or_attribute_and_writes_nothing(tmp_path: Path, options: dict, message: str):
    model = nn.Sequential(nn.Linear(4, 3))
    with eigpipe.track(model, "0") as tracker:
        model(torch.rand(5, 4))
    with pytest.raises(EigpipeError, match=f"^{message}"):
        tracker.save(tmp_path / "run.zarr", **options)
    assert list(tmp_path.iterdir()) == []
    tracker.save(tmp_path / "run.zarr", iteration=2, attrs={"init": "scratch", "data": {"images": 5}})
    attrs = dict(store.open_store(tmp_path / "run.zarr", store.COVARIANCE_KIND).attrs)
    assert (attrs["init"], attrs["data"], attrs["task"], attrs["iteration"]) == ("scratch", {"images": 5}, "library", 2)


def test_a_forward_pass_that_raises_counts_for_the_layers_it_reached() -> None:
    class Failing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.second, self.fail = nn.Linear(4, 3), nn.Conv2d(3, 5, 1), False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.first(x)
            if self.fail:
                raise RuntimeError("out of memory")
            return self.second(y[:, :, None, None].expand(-1, -1, 4, 4).contiguous())

    model = Failing()
    with eigpipe.track(model, ["first", "second"]) as tracker:
        model(torch.rand(5, 4))
        model.fail = True
        with pytest.raises(RuntimeError, match="out of memory"):
            model(torch.rand(6, 4))
        model.fail = False
        model(torch.rand(7, 4))
    table = tracker.spectra()
    assert dict(zip(table["layer"], table["n_images"], strict=True)) == {"first": 18, "second": 12}


def test_inside_a_training_step_every_second_batch_without_autograd() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    model(torch.rand(1, 3, 8, 8))
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen, handles = capture(model, ["2"])
    batches = [torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    with eigpipe.track(model, ["2"], every=2) as tracker:
        for batch in batches:
            loss = model(batch).square().mean()
            optimizer.zero_grad()
            loss.backward()  # the tracker's statistics are not part of the graph
            optimizer.step()
    for handle in handles:
        handle.remove()
    acc = tracker.accumulators["2"]
    assert_close(acc, per_sample(seen["2"][0::2]))  # batches 0, 2 and 4
    assert tracker.forwards == 5 and tracker.hooks.batches == 3
    assert not acc.second_moment.requires_grad and all(p.grad is not None for p in model.parameters())


def test_autocast_features_are_accumulated_in_float64() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
    x = torch.rand(6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16), eigpipe.track(model, ["0"]) as tracker:
        out = model[0](x)
        model(x)
    assert out.dtype == torch.bfloat16
    assert_close(tracker.accumulators["0"], per_sample([out.detach().float()]), tol=1e-12)
    assert tracker.hooks.outside == {"0"}  # the direct call of model[0] is not a forward pass of the model


def test_tracker_on_an_eigpipe_detector_gives_the_covariance_stage_store(on_disk: dict, tmp_path: Path) -> None:
    from eigpipe.data.coco import CocoDetection
    from eigpipe.models import load_checkpoint

    cfg = json.dumps({"covariance": {"images": 4, "batch_size": 2}, "runtime": {"threads": 1}})
    stage = tmp_path / "stage.zarr"
    assert cli.main(covariance_args(on_disk, "faster_rcnn-scratch", cfg, stage)) == 0
    model, _meta = load_checkpoint(on_disk["checkpoints"]["faster_rcnn-scratch"], "cpu")
    dataset = CocoDetection(on_disk["annotations"], on_disk["images"], train=False)
    torch.set_num_threads(1)
    model.eval()
    with torch.inference_mode(), eigpipe.track(model, ["default"], run="faster_rcnn-scratch") as tracker:
        for first in (0, 2):
            model([dataset[i][0] for i in (first, first + 1)])
    library = tracker.save(tmp_path / "library.zarr", iteration=30)
    arrays = ("second_moment", "mean")
    stage_attrs, stage_layers = store.read_store(stage, store.COVARIANCE_KIND, arrays)
    lib_attrs, lib_layers = store.read_store(library, store.COVARIANCE_KIND, arrays)
    assert lib_attrs["layers"] == stage_attrs["layers"] and lib_attrs["run"] == "faster_rcnn-scratch"
    for name, (values, attrs) in stage_layers.items():
        lib_values, lib_attrs_layer = lib_layers[name]
        for key in ("tap", "count", "positions", "channels", "feature_shape", "forward_index"):
            assert lib_attrs_layer[key] == attrs[key], (name, key)
        for key in arrays:
            assert np.array_equal(lib_values[key], values[key]), (name, key)


DDP_SCRIPT = """
import sys
import torch, torch.distributed as dist
import eigpipe
from torch import nn

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.set_num_threads(1)
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Conv2d(5, 7, 3)).eval()
batches = [torch.rand(2, 3, 9, 9, generator=torch.Generator().manual_seed(i)) for i in range(5)]
with torch.inference_mode(), eigpipe.track(model, ["Conv2d:*", "1"]) as tracker:
    for batch in batches[rank::world]:
        model(batch)
tracker.save(sys.argv[1])
table = tracker.spectra()
if rank == 0:
    table.to_csv(sys.argv[1] + ".csv", index=False)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_process_ddp_on_the_cpu_equals_one_process(tmp_path: Path) -> None:
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    runs = {}
    for procs in (1, 2):
        out = tmp_path / f"{procs}.zarr"
        command = [torchrun, "--standalone", "--nproc_per_node", str(procs), str(script), str(out)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[procs] = store.read_store(out, store.COVARIANCE_KIND, ("second_moment", "mean"))
    (attrs_1, layers_1), (attrs_2, layers_2) = runs[1], runs[2]
    assert attrs_2["layers"] == attrs_1["layers"] == ["0", "1", "2"]
    for name, (values, attrs) in layers_1.items():
        assert layers_2[name][1]["count"] == attrs["count"] == 10
        for key, value in values.items():
            assert np.allclose(layers_2[name][0][key], value, rtol=1e-12, atol=1e-14), (name, key)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1.zarr", "1.zarr.csv", "2.zarr", "2.zarr.csv", "ddp.py"]


def test_training_tracker_writes_a_store_every_k_steps(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with eigpipe.track_training(model, ["Linear:*"], tmp_path / "dyn", save_every=3, run="mlp") as recorder:
        for step in range(7):
            x = torch.rand(4, 4, generator=torch.Generator().manual_seed(step))
            loss = model(x).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            recorder.step()
    assert [p.name for p in recorder.saved] == ["3.zarr", "6.zarr", "7.zarr"]  # the last step's, at the end
    for path, step in zip(recorder.saved, (3, 6, 7), strict=True):
        attrs, layers = store.read_store(path, store.COVARIANCE_KIND, ("second_moment", "mean"))
        assert attrs["iteration"] == step and attrs["run"] == "mlp" and attrs["layers"] == ["0", "2"]
        count = 4 if step == 7 else 12  # 3 steps of 4 samples, and the last one
        assert all(layer_attrs["count"] == count for _, layer_attrs in layers.values())
    with pytest.raises(RuntimeError, match="stopped"):  # noqa: SIM117
        with eigpipe.track_training(model, ["Linear:*"], tmp_path / "failed", save_every=3) as failed:
            for _ in range(4):
                model(torch.rand(4, 4))
                failed.step()
            raise RuntimeError("stopped")
    assert [p.name for p in failed.saved] == ["3.zarr"] and sorted(os.listdir(tmp_path / "failed")) == ["3.zarr"]


def test_a_save_window_without_a_batch_writes_no_store_and_warns(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.warns(UserWarning, match=r"no batch was taken in steps 5-6 \(every=3\): no store for step 6"):  # noqa: SIM117
        with eigpipe.track_training(model, ["0"], tmp_path / "dyn", save_every=2, every=3) as recorder:
            for _ in range(6):  # forward passes 1 and 4 are taken
                model(torch.rand(4, 4))
                recorder.step()
    assert [p.name for p in recorder.saved] == ["2.zarr", "4.zarr"] and len(list((tmp_path / "dyn").iterdir())) == 2


def test_no_statistics_says_whether_no_batch_was_taken_or_the_layers_did_not_run(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    with eigpipe.track(model, "0", every=2) as tracker:
        model(torch.rand(4, 4))
        tracker.reset()
        model(torch.rand(4, 4))  # not taken
    with pytest.raises(EigpipeError, match=r"no forward pass was taken since the tracker started or was reset"):
        tracker.save(tmp_path / "run.zarr")
    with pytest.warns(UserWarning, match="did not run"), eigpipe.track(model, "0") as unused:
        model[1](torch.rand(4, 3))  # outside a forward pass of the model
        model.forward = lambda x: x  # the selected layer does not run in the batches
        model(torch.rand(4, 4))
        model(torch.rand(4, 4))
    del model.forward
    with pytest.raises(EigpipeError, match=r"none of 0 ran in the 2 batch\(es\) taken"):
        unused.spectra()


@pytest.mark.parametrize("training", [False, True])
def test_a_tracker_entered_inside_its_own_with_block_is_refused(tmp_path: Path, training: bool) -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    tracker = eigpipe.track_training(model, "0", tmp_path, save_every=5) if training else eigpipe.track(model, "0")
    with tracker:
        with pytest.raises(EigpipeError, match=r"^eigpipe.track: this tracker is already active"), tracker:
            pass
        model(torch.rand(5, 4))  # the outer block goes on
    inner = tracker.tracker if training else tracker
    assert list(inner.spectra()["layer"]) == ["0"] and inner.accumulators["0"].count == 5


def test_concurrent_forward_passes_are_refused_sequential_ones_from_other_threads_are_not() -> None:
    entered, release = threading.Event(), threading.Event()

    class Gate(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if threading.current_thread() is not threading.main_thread():
                entered.set()
                release.wait(30)
            return x

    model, errors = nn.Sequential(nn.Linear(4, 3), Gate()), []

    def run() -> None:
        try:
            model(torch.rand(5, 4))
        except Exception as exc:  # noqa: BLE001 (the test names it below)
            errors.append(exc)

    with eigpipe.track(model, "0") as tracker:
        worker = threading.Thread(target=run)
        worker.start()
        assert entered.wait(30)  # the worker's forward pass is in progress
        with pytest.raises(EigpipeError, match=r"^eigpipe.track: concurrent forward passes .* DistributedDataParallel"):
            model(torch.rand(6, 4))
        release.set()
        worker.join()
        for _ in range(2):  # one after the other: fine
            worker = threading.Thread(target=run)
            worker.start()
            worker.join()
    assert errors == [] and list(tracker.accumulators) == ["0"] and tracker.accumulators["0"].count == 15


@pytest.mark.filterwarnings("ignore:eigpipe.track. 1 selected layer")  # the refused layer did not run
def test_a_layer_run_in_another_thread_during_a_batch_is_refused() -> None:
    class Replicas(nn.Module):  # runs its layer in a thread of its own, as nn.DataParallel's replicas do
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            found: dict[str, Any] = {}

            def work() -> None:
                try:
                    found["out"] = self.layer(x)
                except EigpipeError as exc:
                    found["error"] = exc

            worker = threading.Thread(target=work)
            worker.start()
            worker.join()
            if "error" in found:
                raise found["error"]
            return found["out"]

    model = Replicas()
    with pytest.raises(EigpipeError, match=r"^layer layer: concurrent forward passes"), eigpipe.track(model, "layer"):
        model(torch.rand(5, 4))


@pytest.mark.parametrize("clash", ["r#1", "r#0"])
def test_a_module_named_like_a_call_of_a_module_that_runs_twice_is_refused(clash: str) -> None:
    relu = nn.ReLU()
    model = nn.Sequential(OrderedDict([("r", relu), (clash, nn.Tanh()), ("again", relu)]))
    with pytest.raises(EigpipeError, match=rf"^layer r: it runs more than once .* {clash} is also the name of a"):  # noqa: SIM117
        with eigpipe.track(model, ["r", clash]):
            model(torch.rand(5, 4))


class Apply(nn.Module):
    """A layer whose output is ``fn`` of its input."""

    def __init__(self, fn: Any) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> Any:
        return self.fn(x)


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (lambda x: x[:, :0], r"its output of shape \[4, 0\] has 0 channels \(axis 1\)"),
        (lambda x: x[:, None, :0], r"its output of shape \[4, 1, 0\] has 0 channels \(axis 2\)"),
        (lambda x: x.to_sparse(), r"its output is a torch.sparse_coo tensor; select one with dense output"),
        (lambda x: torch.empty_like(x, device="meta"), r"its output is on the meta device"),
        (lambda x: x.argmax(1, keepdim=True), r"its output is torch.int64; select a layer with real-valued features"),
        (lambda x: x > 0.5, r"its output is torch.bool; select a layer with real-valued features"),
    ],
    ids=["no-channels", "no-token-channels", "sparse", "meta", "integers", "bools"],
)
def test_outputs_the_tracker_cannot_use_are_one_line_errors(fn: Any, message: str) -> None:
    model = nn.Sequential(Apply(fn))
    with pytest.raises(EigpipeError, match=f"^layer 0: {message}"), eigpipe.track(model, "0"):
        model(torch.rand(4, 6))


@pytest.mark.filterwarnings("ignore:.torch.jit.script. is deprecated")
def test_a_scripted_model_is_refused() -> None:
    scripted = torch.jit.script(nn.Sequential(nn.Linear(4, 3)))
    with pytest.raises(EigpipeError, match=r"^eigpipe.track: a scripted model .* track the model before scripting"):
        eigpipe.track(scripted, "0")


@pytest.mark.parametrize("iteration", [-1, 1.5, True, "abc"])
def test_spectra_refuses_a_bad_iteration(iteration: object) -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    with eigpipe.track(model, "0") as tracker:
        model(torch.rand(5, 4))
    with pytest.raises(EigpipeError, match=rf"^iteration: {re.escape(repr(iteration))} is not a whole number >= 0"):
        tracker.spectra(iteration=iteration)


def test_paths_starting_with_a_tilde_are_in_the_home_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    model = nn.Sequential(nn.Linear(4, 3))
    with eigpipe.track_training(model, "0", "~/dyn", save_every=1) as recorder:
        model(torch.rand(5, 4))
        recorder.step()
    with eigpipe.track(model, "0") as tracker:
        model(torch.rand(5, 4))
    tracker.save("~/x.zarr")
    assert sorted(p.name for p in (tmp_path / "home").iterdir()) == ["dyn", "x.zarr"]
    assert [p.name for p in (tmp_path / "home" / "dyn").iterdir()] == ["1.zarr"] and not (tmp_path / "~").exists()


def test_track_training_checks_its_folder_before_the_first_step(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    with eigpipe.track(model, "0") as tracker:
        model(torch.rand(5, 4))
    (tmp_path / "file").write_text("mine")
    store_path = tracker.save(tmp_path / "run.zarr")
    foreign = tmp_path / "foreign" / "4.zarr"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    for folder, message in [
        ("file", r"file: is a file, not a folder for the training stores"),
        ("run.zarr", r"run.zarr: is a zarr store, not a folder for the training stores"),
        ("foreign", r"4.zarr: exists and is not an eigpipe covariance store; track_training writes"),
    ]:
        with pytest.raises(EigpipeError, match=message):
            eigpipe.track_training(model, "0", tmp_path / folder, save_every=2)
    assert (foreign / "notes.txt").read_text() == "mine" and (tmp_path / "file").read_text() == "mine"
    assert store.read_store(store_path, store.COVARIANCE_KIND, ("second_moment", "mean"))[0]["run"] == "Sequential"
    for step in (2, 4):
        tracker.save(tmp_path / "earlier" / f"{step}.zarr", iteration=step)
    recorder = eigpipe.track_training(model, "0", tmp_path / "earlier", save_every=2)
    with pytest.warns(UserWarning, match=r"holds 2 covariance store\(s\) of an earlier run; those of steps this run"):  # noqa: SIM117
        with recorder:
            pass


def test_a_layer_name_that_cannot_be_a_folder_name_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    model = nn.Sequential(OrderedDict(zarr=nn.Sequential(OrderedDict(json=nn.Linear(4, 3)))))
    with eigpipe.track(model, "zarr.json") as tracker:
        model(torch.rand(5, 4))
    with pytest.raises(EigpipeError, match=r"^layer 'zarr.json': not usable as a zarr group name"):
        tracker.save(tmp_path / "sub" / "run.zarr")
    assert list(tmp_path.iterdir()) == []


def test_spectra_keep_full_names_where_stripping_the_body_prefix_would_merge_two_layers() -> None:
    model = nn.Sequential(OrderedDict(conv=nn.Linear(4, 3), body=nn.Sequential(OrderedDict(conv=nn.Linear(3, 2)))))
    with eigpipe.track(model, "Linear:*") as tracker:
        model(torch.rand(5, 4))
    assert list(tracker.spectra()["canonical"]) == ["conv", "body.conv"]
    with eigpipe.track(model, "body.conv") as alone:
        model(torch.rand(5, 4))
    assert list(alone.spectra()["canonical"]) == ["conv"]


@pytest.mark.parametrize("option", ["channel_axis", "output_index"])
def test_a_per_layer_glob_that_matches_no_selected_layer_is_one_line(option: str) -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    with pytest.raises(EigpipeError, match=rf"^{option}: '2\*' matches none of the selected layers \(0, 1\)$"):
        eigpipe.track(model, ["0", "1"], **{option: {"0": 1, "2*": 1}})
