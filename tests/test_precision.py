"""float32 Gram products against the exact float64 path: the error budget, TF32 kept off locally."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eigpipe.spectral import buffers
from eigpipe.spectral.accumulator import CovarianceAccumulator
from eigpipe.spectral.buffers import Workspace
from eigpipe.spectral.hooks import accumulate
from eigpipe.spectral.layers import select_layers

torch.set_num_threads(1)

BUDGET = 1e-6  # relative error (Frobenius) of the second moment and of the centred covariance
THRESHOLD = 1e-3  # the paper's eigenvalue threshold (spectrum.threshold)


def rel(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Relative Frobenius error of ``a`` against ``b`` (the absolute one where ``b`` is zero)."""
    a, b = (np.asarray(v.cpu() if isinstance(v, torch.Tensor) else v, dtype=np.float64) for v in (a, b))
    return float(np.linalg.norm(a - b) / (np.linalg.norm(b) or 1.0))


def offset_features(n: int, c: int, size: int, seed: int) -> torch.Tensor:
    """float32 features with mean 1e3 and std about 1 (per-channel scale 0.5 to 1.5)."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.rand(c, 1, 1, generator=gen) + 0.5
    return (torch.randn(n, c, size, size, generator=gen) * scale + 1e3).float()


NEEDS_CUDA = pytest.mark.cuda  # skipped without a CUDA device (conftest.py)


def both(batches: list, channels: int, device: str = "cpu") -> tuple[CovarianceAccumulator, CovarianceAccumulator]:
    workspace = Workspace()
    exact = CovarianceAccumulator(channels, device, workspace)
    fast = CovarianceAccumulator(channels, device, workspace, precision="float32")
    for batch in batches:
        batch = batch.to(device) if isinstance(batch, torch.Tensor) else [f.to(device) for f in batch]
        exact.update(batch)
        fast.update(batch)
    return exact, fast


def errors(exact: CovarianceAccumulator, fast: CovarianceAccumulator) -> dict[str, float]:
    return {
        "second_moment": rel(fast.second_moment, exact.second_moment),
        "covariance": rel(fast.covariance, exact.covariance),
        "mean": rel(fast.mean, exact.mean),
    }


def dimension_agreement(exact: dict, fast: dict) -> tuple[int, int]:
    """(layers whose count differs outside the error band, layers with an eigenvalue inside the band).

    ``exact``/``fast``: {"second_moment", "covariance"} arrays. Weyl: every eigenvalue moves by at most the
    spectral norm of the difference, so a count can only change where an eigenvalue lies that close to
    the threshold; such a layer is counted as within the band, and its count may differ by its members.
    """
    wrong = within = 0
    for key in ("second_moment", "covariance"):
        band = np.linalg.norm(fast[key] - exact[key], 2)
        values = np.linalg.eigvalsh(exact[key])
        near = int((np.abs(values - THRESHOLD) <= band).sum())
        difference = abs(int((np.linalg.eigvalsh(fast[key]) > THRESHOLD).sum()) - int((values > THRESHOLD).sum()))
        within += near > 0
        wrong += difference > near
    return wrong, within


@pytest.mark.parametrize(
    ("device", "flush"),
    [("cpu", CovarianceAccumulator.FLOAT32_FLUSH), ("cpu", 1000), pytest.param("cuda", 0, marks=NEEDS_CUDA)],
)
def test_large_offset_float32_within_budget(device: str, flush: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mean 1e3, std 1, C=256: float32 products of per-image-centred features stay within 1e-6 (the pending
    float32 sum moved to float64 at the end, or every 1000 positions; chunked products on CUDA)."""
    monkeypatch.setattr(CovarianceAccumulator, "FLOAT32_FLUSH", flush)
    batches = [offset_features(4, 256, 16, seed) for seed in range(4)]
    exact, fast = both(batches, 256, device)
    found = errors(exact, fast)
    assert found["second_moment"] <= BUDGET and found["covariance"] <= BUDGET, found
    assert exact.count == fast.count == 16 and exact.positions == fast.positions
    # the data are hard: uncentred float32 sums, the naive fast path, miss the covariance by far more
    flat = torch.cat([b.permute(1, 0, 2, 3).reshape(256, -1) for b in batches], dim=1)
    naive = (flat @ flat.T).double() / flat.shape[1] - torch.outer(flat.double().mean(1), flat.double().mean(1))
    assert rel(naive, exact.covariance.cpu()) > 1e3 * BUDGET


def test_wide_layer_and_unequal_sizes_float32_within_budget() -> None:
    """The panel-triangular path (600 channels) and mixed image sizes (merged partial sums) in float32."""
    wide = both([offset_features(3, 600, 4, seed) for seed in range(3)], 600)
    gen = torch.Generator().manual_seed(7)
    mixed = [[torch.rand(24, h, w, generator=gen) * 5 + 50 for h, w in ((4, 9), (8, 8), (4, 9))] for _ in range(3)]
    for exact, fast in (wide, both(mixed, 24)):
        found = errors(exact, fast)
        assert found["second_moment"] <= BUDGET and found["covariance"] <= BUDGET, found
        assert torch.equal(fast.second_moment, fast.second_moment.T)


def randomise_norms(model: torch.nn.Module) -> None:
    """Trained-like BatchNorm statistics and affine (zero_init_residual would make every conv3 feature 0)."""
    gen = torch.Generator().manual_seed(5)
    for norm in model.modules():
        if hasattr(norm, "running_var"):
            c = norm.running_var.shape[0]
            norm.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
            norm.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            norm.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
            norm.bias.data.copy_(torch.randn(c, generator=gen) * 0.1)


@pytest.mark.parametrize(
    ("norm", "device"),
    [
        ("gn", "cpu"),
        ("frozen_bn", "cpu"),
        ("bn", "cpu"),
        pytest.param("gn", "cuda", marks=NEEDS_CUDA),
        pytest.param("bn", "cuda", marks=NEEDS_CUDA),
    ],
)
def test_detector_layers_float32_within_budget(tiny_model: dict, norm: str, device: str) -> None:
    """Every default layer of a small detector: relative errors <= 1e-6, equal intrinsic-dimension counts
    wherever no eigenvalue lies within the measured error band of the threshold. With an eval-mode BatchNorm
    every conv3 layer's float32 statistics are mapped from its conv2 layer's (eigpipe.spectral.affine)."""
    from eigpipe.models import build_detector

    torch.manual_seed(0)
    model_cfg = {**tiny_model, "norm": norm}
    model = build_detector("faster_rcnn", model_cfg, 4).eval()
    if norm != "gn":
        randomise_norms(model)
    model.to(device)
    meta = {"task": "detection", "model_config": model_cfg, "run": "t"}
    gen = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 64, 64, generator=gen) for _ in range(8)]
    batches = [(images[i : i + 4], list(range(i, i + 4))) for i in (0, 4)]
    results, mapped, shapes = {}, {}, {}
    for precision in ("float64", "float32"):
        layers = select_layers(model, ["default"])
        _, accs = accumulate(model, meta, layers, batches, device, precision=precision)
        mapped[precision] = {layer.name: layer.mapped_from for layer in layers if layer.mapped_from}
        shapes[precision] = {layer.name: layer.feature_shape for layer in layers}
        results[precision] = {
            name: {
                "second_moment": acc.second_moment.cpu().numpy(),
                "mean": acc.mean.cpu().numpy(),
                "covariance": acc.covariance.cpu().numpy(),
            }
            for name, acc in accs.items()
        }
    assert results["float32"].keys() == results["float64"].keys() and len(results["float64"]) > 50
    wrong = 0
    for name, exact in results["float64"].items():
        fast = results["float32"][name]
        for key in ("second_moment", "covariance"):
            assert rel(fast[key], exact[key]) <= BUDGET, (name, key, rel(fast[key], exact[key]))
        wrong += dimension_agreement(exact, fast)[0]
    assert wrong == 0
    conv3 = {name: name.replace("conv3", "conv2") for name in results["float64"] if name.endswith(".conv3")}
    assert mapped == {"float64": {}, "float32": {} if norm == "gn" else conv3} and len(conv3) == 16
    assert shapes["float32"] == shapes["float64"]  # mapped layers too


def test_affine_maps_need_an_eval_mode_norm_and_a_selected_source(tiny_model: dict) -> None:
    from eigpipe.models import build_detector
    from eigpipe.spectral.affine import affine_maps

    model = build_detector("faster_rcnn", {**tiny_model, "norm": "bn"}, 4)
    everything = select_layers(model, ["default"])
    assert affine_maps(model, everything) == {}  # training-mode BatchNorm normalises by the batch
    model.eval()
    assert len(affine_maps(model, everything)) == 16
    without_source = [layer for layer in everything if not layer.name.endswith("layer1.0.conv2")]
    assert "backbone.body.layer1.0.conv3" not in affine_maps(model, without_source)


def test_non_finite_mapped_statistics_name_the_layer(tiny_model: dict) -> None:
    from eigpipe.errors import NumericalError
    from eigpipe.models import build_detector

    model = build_detector("faster_rcnn", {**tiny_model, "norm": "frozen_bn"}, 4).eval()
    model.backbone.body.layer2[1].bn3.running_var[3] = float("nan")
    meta = {"task": "detection", "model_config": {**tiny_model, "norm": "frozen_bn"}, "run": "t"}
    batches = [([torch.rand(3, 64, 64)], [0])]
    layers = select_layers(model, ["*layer2.1.conv2", "*layer2.1.conv3"])  # not the block output after it
    with pytest.raises(NumericalError, match=r"layer backbone\.body\.layer2\.1\.conv3: non-finite"):
        accumulate(model, meta, layers, batches, "cpu", precision="float32")


def test_tf32_is_off_for_the_products_and_restored_after(monkeypatch: pytest.MonkeyPatch) -> None:
    """The float32 Gram products run in IEEE precision (no TF32 / bf16); the global setting is left as it was."""
    backends = buffers.float32_backends()
    saved = [backend.fp32_precision for backend in backends]
    seen = []
    originals = {"addmm_": torch.Tensor.addmm_, "bmm": torch.bmm}

    def spy(name: str):  # noqa: ANN202
        def call(*args: object, **kwargs: object) -> torch.Tensor:
            if args[0].dtype == torch.float32:
                seen.append((name, [backend.fp32_precision for backend in backends]))
            return originals[name](*args, **kwargs)

        return call

    try:
        for backend in backends:
            backend.fp32_precision = "tf32"
        monkeypatch.setattr(torch.Tensor, "addmm_", spy("addmm_"))
        monkeypatch.setattr(torch, "bmm", spy("bmm"))
        CovarianceAccumulator(16, precision="float32").update(offset_features(2, 16, 4, seed=0))
        monkeypatch.setattr(CovarianceAccumulator, "FLOAT32_CHUNK", {"cpu": 8})
        CovarianceAccumulator(16, precision="float32").update(offset_features(2, 16, 4, seed=0))
        monkeypatch.undo()
        assert {name for name, _ in seen} == {"addmm_", "bmm"}
        assert all(state == ["ieee"] * 4 for _, state in seen)
        assert [backend.fp32_precision for backend in backends] == ["tf32"] * 4
        with pytest.raises(RuntimeError), buffers.ieee_float32():
            raise RuntimeError
        assert [backend.fp32_precision for backend in backends] == ["tf32"] * 4
    finally:
        for backend, value in zip(backends, saved, strict=True):
            backend.fp32_precision = value


def test_extraction_forward_runs_in_ieee_float32(tiny_model: dict) -> None:
    """With TF32 asked for globally (runtime.tf32), the model's convolutions still run in IEEE float32 while
    features are measured, and the global setting comes back afterwards."""
    from eigpipe.models import build_detector

    model = build_detector("faster_rcnn", tiny_model, 4)
    meta = {"task": "detection", "model_config": tiny_model, "run": "t"}
    conv = torch.backends.cudnn.conv
    saved, seen = conv.fp32_precision, []
    handle = model.backbone.body.conv1.register_forward_hook(lambda *_: seen.append(conv.fp32_precision))
    try:
        conv.fp32_precision = "tf32"
        accumulate(model, meta, select_layers(model, ["*body.conv1"]), [([torch.rand(3, 64, 64)], [0])], "cpu")
        assert seen == ["ieee"] and conv.fp32_precision == "tf32"
    finally:
        handle.remove()
        conv.fp32_precision = saved


def test_float32_state_round_trip_and_unknown_precision() -> None:
    acc = CovarianceAccumulator(6, precision="float32")
    acc.update(offset_features(3, 6, 4, seed=2))
    again = CovarianceAccumulator.from_state_dict(acc.state_dict())
    assert again.precision == "float32" and torch.equal(again.second_moment, acc.second_moment)
    with pytest.raises(ValueError, match="precision"):
        CovarianceAccumulator(6, precision="float16")


def test_narrow_layers_take_float64_products() -> None:
    """Below NARROW channels the float32 mode runs the float64 path: bitwise the exact statistics."""
    batches = [offset_features(4, 8, 32, seed) for seed in range(2)]
    exact, fast = both(batches, 8)
    assert torch.equal(exact.second_moment, fast.second_moment) and torch.equal(exact.mean, fast.mean)


def test_chunked_float32_products_within_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """The chunked products (cuBLAS's path: at most FLOAT32_CHUNK positions each, summed in float64), on CPU."""
    monkeypatch.setattr(CovarianceAccumulator, "FLOAT32_CHUNK", {"cpu": 96})
    monkeypatch.setattr(CovarianceAccumulator, "GROUP_ELEMENTS", 3 * 40 * 40)  # several groups of chunks
    gen = torch.Generator().manual_seed(3)
    batches = [torch.relu(torch.randn(3, 40, 10, 11, generator=gen)) * 4 + 7 for _ in range(3)]  # 330 positions
    exact, fast = both(batches, 40)
    found = errors(exact, fast)
    assert found["second_moment"] <= BUDGET and found["covariance"] <= BUDGET, found


def test_spectrum_table_shows_the_precision(tmp_path, complete) -> None:
    from eigpipe.spectral import spectrum, store

    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 40)) + 2.0
    layer = {"second_moment": x @ x.T / 40, "mean": x.mean(axis=1)}
    cfg = {"spectrum": complete("spectrum")}
    rows = {}
    for precision in ("float32", None):  # None: a store written before the attribute (float64)
        root = {"run": "r", "iteration": 1, "n_images": 9, **({"precision": precision} if precision else {})}
        path = store.write_store(
            tmp_path / f"{precision}.zarr",
            store.COVARIANCE_KIND,
            {"a": layer},
            root,
            {"a": {"forward_index": 0, "count": 9}},
        )
        rows[precision] = spectrum.decompose(cfg, path, tmp_path / "spectra" / f"{precision}.csv")["precision"].tolist()
    assert rows == {"float32": ["float32"], None: ["float64"]}
