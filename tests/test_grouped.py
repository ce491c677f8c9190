"""The fast paths of the extraction: small layers computed in groups at a batch's end (eigpipe.spectral.grouped) and
widening layers measured at their input in the float32 mode (eigpipe.spectral.widening), each against the
per-layer float64 update of the features themselves."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import eigpipe
from eigpipe.errors import NumericalError
from eigpipe.spectral.accumulator import CovarianceAccumulator
from eigpipe.spectral.grouped import GROUPED_ELEMENTS, BatchGroups, StackedState

torch.set_num_threads(1)
BUDGET = 1e-6  # the float32 mode's relative error budget (tests/test_precision.py)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def offset_batches(count: int, n: int, c: int, size: int, seed: int) -> list[torch.Tensor]:
    """float32 [N, C, size, size] batches with mean 1e3, per-image offsets and per-channel scales."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.rand(c, 1, 1, generator=gen) + 0.5
    return [
        (torch.randn(n, c, size, size, generator=gen) * scale + 1e3 + torch.randn(n, c, 1, 1, generator=gen)).float()
        for _ in range(count)
    ]


def exact(batches: list[torch.Tensor]) -> CovarianceAccumulator:
    acc = CovarianceAccumulator(batches[0].shape[1])
    for batch in batches:
        acc.update(batch)
    return acc


@pytest.mark.parametrize(("precision", "tolerance"), [("float64", 1e-12), ("float32", BUDGET)])
@pytest.mark.parametrize(("channels", "size"), [(8, 32), (16, 16), (64, 8), (64, 4)])
def test_groups_match_the_per_layer_update(precision: str, tolerance: float, channels: int, size: int) -> None:
    """Three layers of one shape in a group, one of them a batch ahead (another image count): each layer's
    statistics as the exact per-layer update's, with per-image products (narrow layers, or as many positions as
    channels) and channel-major ones (fewer positions than channels) alike."""
    layers = [offset_batches(3, 4, channels, size, seed) for seed in range(3)]
    accs = [CovarianceAccumulator(channels, precision=precision) for _ in layers]
    accs[2].update(layers[2][0])  # a different count: its own merge within the group
    groups = BatchGroups()
    for step in range(3):
        for acc, batches in zip(accs, layers, strict=True):
            if not (acc is accs[2] and step == 0):
                groups.add(acc, batches[step])
        groups.flush()
    for acc, batches in zip(accs, layers, strict=True):
        reference = exact(batches)
        assert acc.count == reference.count and acc.positions == reference.positions
        for key in ("covariance", "second_moment", "mean"):
            assert rel(getattr(acc, key), getattr(reference, key)) <= tolerance, key


def test_layers_leaving_and_joining_a_group_keep_their_statistics() -> None:
    """A group's running states are stacked; a layer that skips a batch, or a group whose members change order,
    moves its state to a new stack without losing or double-counting anything."""
    layers = [offset_batches(4, 2, 32, 8, seed) for seed in range(3)]
    accs = [CovarianceAccumulator(32) for _ in layers]
    schedule = [(0, 1, 2), (0, 1, 2), (2, 0), (1, 2, 0)]  # layer 1 skips the third batch; then another order
    groups = BatchGroups()
    for step, members in enumerate(schedule):
        for i in members:
            groups.add(accs[i], layers[i][step])
        groups.flush()
    for i, (acc, batches) in enumerate(zip(accs, layers, strict=True)):
        reference = exact([batches[step] for step, members in enumerate(schedule) if i in members])
        assert acc.count == reference.count and acc.positions == reference.positions
        for key in ("covariance", "mean"):
            assert rel(getattr(acc, key), getattr(reference, key)) <= 1e-12, (i, key)


@pytest.mark.parametrize(("precision", "tolerance"), [("float64", 1e-12), ("float32", BUDGET)])
@pytest.mark.parametrize(("channels", "size"), [(16, 16), (64, 4)])
def test_held_batches_are_merged_when_full_and_whenever_read(
    monkeypatch: pytest.MonkeyPatch, precision: str, tolerance: float, channels: int, size: int
) -> None:
    """A group holds its batches' products and images' means and merges them every few images, and before a layer
    is read: read after some batches (mid-hold or just merged) and not others, each layer's statistics are those of
    the batches so far, never counted twice."""
    monkeypatch.setattr(StackedState, "HELD_IMAGES", 6)  # batches of 4: merged at every second batch
    monkeypatch.setattr(CovarianceAccumulator, "FLOAT32_FLUSH", 3 * size * size)  # products moved mid-hold too
    layers = [offset_batches(5, 4, channels, size, seed) for seed in range(2)]
    accs = [CovarianceAccumulator(channels, precision=precision) for _ in layers]
    groups = BatchGroups()
    for step in range(5):
        for acc, batches in zip(accs, layers, strict=True):
            groups.add(acc, batches[step])
        groups.flush()
        if step % 2:  # some batches are read, some are not
            continue
        for acc, batches in zip(accs, layers, strict=True):
            reference = exact(batches[: step + 1])
            assert (acc.count, acc.positions) == (reference.count, reference.positions)
            assert rel(acc.covariance, reference.covariance) <= tolerance
            assert rel(acc.mean, reference.mean) <= 1e-12


def test_a_non_finite_feature_in_a_group_names_its_layer_and_image() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1))
    images = torch.randn(4, 3, 8, 8)
    images[2, 0, 3, 3] = float("nan")
    with eigpipe.track(model, ["Conv2d:*"]), pytest.raises(NumericalError, match=r"^layer 0: non-finite .*sample 2 "):
        model(images)


class InPlaceAfterTheTap(nn.Module):
    """A conv whose output the forward pass changes in place afterwards (as `out += identity` in a ResNet)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        out += 100.0
        return self.head(out.relu_())


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_a_group_keeps_the_features_as_the_hook_saw_them(precision: str) -> None:
    """Grouped features are copied when the hook runs: later in-place changes of the output do not reach them."""
    torch.manual_seed(0)
    model = InPlaceAfterTheTap().eval()
    batches = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    seen: list[torch.Tensor] = []
    handle = model.conv.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    with torch.no_grad():
        for batch in batches:
            model(batch)
    handle.remove()
    with torch.no_grad(), eigpipe.track(model, ["conv"], precision=precision) as tracker:
        for batch in batches:
            model(batch)
    assert seen[0].numel() <= GROUPED_ELEMENTS  # the case under test: a grouped layer
    tolerance = 1e-12 if precision == "float64" else BUDGET  # the +100 shift, had it leaked in, is ~1e4 relative
    assert rel(tracker.accumulators["conv"].second_moment, exact(seen).second_moment) <= tolerance


class Widening(nn.Module):
    """A strided 1x1 projection and a token MLP's first Linear, both widening their input."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.project = nn.Conv2d(8, 32, 1, stride=2)
        self.fc1 = nn.Linear(32, 96)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.project(self.stem(x).relu())
        return self.fc1(maps.flatten(2).transpose(1, 2))  # [N, T, C] tokens


def outputs_of(model: nn.Module, batches: list[torch.Tensor], step=None) -> dict[str, list[torch.Tensor]]:
    """Each widening layer's outputs as the layer's features ([N, C, positions, 1])."""
    seen: dict[str, list[torch.Tensor]] = {"project": [], "fc1": []}
    handles = [
        model.project.register_forward_hook(lambda m, i, o: seen["project"].append(o.detach().clone())),
        model.fc1.register_forward_hook(lambda m, i, o: seen["fc1"].append(o.detach().transpose(1, 2).unsqueeze(-1))),
    ]
    for batch in batches:
        model(batch)
        if step is not None:
            step()
    for handle in handles:
        handle.remove()
    return seen


@pytest.mark.parametrize("training", [False, True])
def test_widening_layers_take_their_input_within_the_float32_budget(training: bool) -> None:
    """float32 mode: the strided 1x1 conv and the Linear take their statistics from their inputs (input Gram
    mapped through the weights); with weights changing between batches (training) each batch uses its own weights."""
    torch.manual_seed(0)
    model = Widening()
    batches = [torch.randn(4, 3, 16, 16) + 2.0 for _ in range(4)]

    def step() -> None:  # the same sequence of updates in both runs
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.05 * torch.randn(param.shape, generator=updates))

    state = {k: v.clone() for k, v in model.state_dict().items()}
    updates = torch.Generator().manual_seed(1)
    with torch.no_grad():
        seen = outputs_of(model, batches, step if training else None)
    model.load_state_dict(state)
    updates.manual_seed(1)
    with torch.no_grad(), eigpipe.track(model, ["project", "fc1"], precision="float32") as tracker:
        for batch in batches:
            model(batch)
            if training:
                step()
    taken = {name: tracker.hooks.streams[(name, 0)].widening.weights is not None for name in ("project", "fc1")}
    assert taken == {"project": not training, "fc1": not training}  # training: the output from the second batch on
    for name, outputs in seen.items():
        acc, reference = tracker.accumulators[name], exact(outputs)
        assert acc.count == reference.count and acc.positions == reference.positions
        assert rel(acc.covariance, reference.covariance) <= BUDGET, name
        assert rel(acc.second_moment, reference.second_moment) <= BUDGET, name


def test_a_widening_layer_with_another_hook_takes_its_output() -> None:
    """A foreign forward hook may change what the module returns: then the output itself is measured."""
    torch.manual_seed(0)
    model = Widening()
    model.project.register_forward_hook(lambda m, i, o: o * 2.0 + 1.0)
    batches = [torch.randn(2, 3, 16, 16) for _ in range(3)]
    with torch.no_grad():
        seen = outputs_of(model, batches)
        with eigpipe.track(model, ["project"], precision="float32") as tracker:
            for batch in batches:
                model(batch)
    assert rel(tracker.accumulators["project"].second_moment, exact(seen["project"]).second_moment) <= BUDGET
    assert tracker.hooks.streams[("project", 0)].widening.weights is None  # its input was never taken


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_one_tracker_serves_inference_mode_then_a_training_step_then_a_second_with(precision: str) -> None:
    """Buffers made while the model ran under torch.inference_mode stay usable in a training step (autograd on) and
    across the tracker's ``with`` blocks; the statistics are those of every batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1))
    batches = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    seen: list[torch.Tensor] = []
    handle = model[2].register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    tracker = eigpipe.track(model, ["2"], precision=precision)
    with tracker:
        with torch.inference_mode():
            model(batches[0])
        model(batches[1]).square().mean().backward()
    with tracker:
        model(batches[2])
    handle.remove()
    acc = tracker.accumulators["2"]
    assert acc.count == 6
    tolerance = 1e-12 if precision == "float64" else BUDGET
    assert rel(acc.second_moment, exact(seen).second_moment) <= tolerance
