"""Statistics per fold of the images (covariance.folds): the merged statistics are bitwise those without folds,
each fold holds its own images' statistics, and the jackknife over folds gives standard errors that match the
spread of the measures on planted spectra whose true dimension is known."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from eigpipe import intervals
from eigpipe.errors import EigpipeError
from eigpipe.spectral import spectrum, store
from eigpipe.spectral.accumulator import CovarianceAccumulator
from eigpipe.spectral.affine import AffineMap, mapped_accumulator
from eigpipe.spectral.folds import FoldedAccumulator, FoldPlan, from_state
from eigpipe.spectral.jackknife import JACKKNIFE_ARRAYS, leave_one_out, standard_errors
from tests.helpers import complete_section

torch.set_num_threads(1)
# The spectrum section as stages receive it: the schema's defaults (alpha_ranks, saturation_threshold) filled in.
CFG = complete_section("spectrum", {"threshold": 1e-3, "relative_threshold": 1e-3, "soft_lambda": 1e-3})


def _batches(seed: int = 0, channels: int = 40) -> list[torch.Tensor | list[torch.Tensor]]:
    """Batches as extraction feeds them: equal sizes stacked, or a list of sizes; a large common offset."""
    gen = torch.Generator().manual_seed(seed)
    equal = [torch.randn(3, channels, 5, 4, generator=gen) * 2 + 30 for _ in range(3)]
    mixed = [torch.randn(channels, h, w, generator=gen) + 30 for h, w in ((5, 4), (3, 6), (5, 4))]
    return [*equal, mixed]


def _feed(acc: CovarianceAccumulator, folds_of: list[list[int]] | None = None) -> None:
    for i, batch in enumerate(_batches()):
        acc.update(batch) if folds_of is None else acc.update(batch, folds_of[i])


FOLDS_OF = [[0, 0, 0], [0, 1, 1], [1, 1, 2], [2, 2, 2]]  # images 0-2 fold 0, ...; two batches straddle a boundary


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_merged_statistics_are_bitwise_those_without_folds(precision: str) -> None:
    plain = CovarianceAccumulator(40, precision=precision)
    folded = FoldedAccumulator(40, precision=precision, folds=3)
    _feed(plain)
    _feed(folded, FOLDS_OF)
    assert folded.count == plain.count == 12 and folded.positions == plain.positions
    for name in ("second_moment", "mean", "covariance"):
        assert torch.equal(getattr(folded, name), getattr(plain, name)), name
    assert folded.fold_counts == [4, 4, 4]


def test_each_fold_holds_its_own_images_and_the_folds_pool_to_the_whole() -> None:
    folded = FoldedAccumulator(40, folds=3)
    _feed(folded, FOLDS_OF)
    own = [CovarianceAccumulator(40) for _ in range(3)]
    for batch, folds in zip(_batches(), FOLDS_OF, strict=True):
        for fold in sorted(set(folds)):
            members = [i for i, f in enumerate(folds) if f == fold]
            part = batch[members] if isinstance(batch, torch.Tensor) else [batch[i] for i in members]
            own[fold].update(part if len(members) < len(folds) else batch)
    arrays = folded.fold_arrays()
    for k in range(3):
        assert torch.equal(arrays["fold_second_moment"][k], own[k].second_moment)
        assert torch.equal(arrays["fold_mean"][k], own[k].mean)
    pooled = CovarianceAccumulator(40)
    for fold in folded.folds:
        pooled.merge(fold)
    assert torch.allclose(pooled.second_moment, folded.second_moment, rtol=1e-13, atol=0)


def test_state_round_trip_merge_and_affine_map_keep_the_folds() -> None:
    a, b = FoldedAccumulator(40, folds=3), FoldedAccumulator(40, folds=3)
    batches = _batches()
    a.update(batches[0], [0, 0, 1])
    b.update(batches[1], [1, 2, 2])
    restored = from_state(b.state_dict())
    assert isinstance(restored, FoldedAccumulator) and restored.fold_counts == [0, 1, 2]
    a.merge(restored)  # what the DDP gather does
    assert a.fold_counts == [2, 2, 2] and a.count == 6
    gen = torch.Generator().manual_seed(1)
    affine = AffineMap(
        "source", torch.randn(8, 40, generator=gen, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)
    )
    mapped = mapped_accumulator("target", a, affine)
    assert isinstance(mapped, FoldedAccumulator) and mapped.fold_counts == [2, 2, 2]
    for k, fold in enumerate(a.folds):
        expected = affine.matrix @ fold.covariance @ affine.matrix.T
        assert torch.allclose(mapped.folds[k].covariance, expected, rtol=1e-12, atol=1e-12)
    assert isinstance(from_state(CovarianceAccumulator(4).state_dict()), CovarianceAccumulator)


def test_fold_plan_is_consecutive_and_needs_enough_images() -> None:
    plan = FoldPlan.consecutive([11, 12, 13, 14, 15, 16, 17], 3)
    assert [plan.of[i] for i in (11, 12, 13, 14, 15, 16, 17)] == [0, 0, 0, 1, 1, 2, 2] and plan.sizes() == [3, 2, 2]
    with pytest.raises(EigpipeError, match="covariance.folds: 3 folds need at least 3 images, got 2"):
        FoldPlan.consecutive([1, 2], 3)
    with pytest.raises(EigpipeError, match="covariance.folds: 1 fold gives no jackknife"):
        FoldPlan.consecutive([1, 2], 1)


# ---- the jackknife on planted spectra ----


def _planted_images(eigenvalues: list[float], n: int, seed: int, positions: int = 16) -> list[torch.Tensor]:
    """n images whose positions are draws of a zero-mean Gaussian with the planted covariance (random basis)."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(len(eigenvalues), len(eigenvalues))))
    root = basis * np.sqrt(eigenvalues)
    draws = rng.normal(size=(n, positions, len(eigenvalues))) @ root.T
    return [torch.from_numpy(d.T.reshape(len(eigenvalues), 4, positions // 4).copy()) for d in draws]


def _folded(images: list[torch.Tensor], folds: int) -> FoldedAccumulator:
    acc = FoldedAccumulator(images[0].shape[0], folds=folds)
    plan = FoldPlan.consecutive(list(range(len(images))), folds)
    for start in range(0, len(images), 8):
        batch = torch.stack(images[start : start + 8])
        acc.update(batch, [plan.of[i] for i in range(start, start + len(batch))])
    return acc


def _write(path: Path, acc: CovarianceAccumulator) -> Path:
    arrays = {"second_moment": acc.second_moment, "mean": acc.mean}
    attrs = {"forward_index": 0, "module_type": "Conv2d", "count": acc.count}
    if isinstance(acc, FoldedAccumulator):
        arrays.update(acc.fold_arrays())
        attrs.update(folds=len(acc.folds), fold_counts=acc.fold_counts)
    root = {"run": "r", "iteration": 0, "init": "scratch", "task": "detection", "n_images": acc.count}
    return store.write_store(path, store.COVARIANCE_KIND, {"layer": arrays}, root, {"layer": attrs})


def test_known_dimension_comes_with_zero_error_and_the_spectrum_stage_reports_it(tmp_path: Path) -> None:
    """Four directions far above the 1e-3 threshold and two far below: every fold agrees on dimension 4."""
    acc = _folded(_planted_images([1.0, 0.5, 0.2, 0.05, 1e-6, 1e-7], n=40, seed=1), folds=5)
    table = spectrum.decompose({"spectrum": CFG}, _write(tmp_path / "c.zarr", acc), tmp_path / "t.parquet")
    row = table.iloc[0]
    assert row["intrinsic_dim"] == 4 and row["intrinsic_dim_se"] == 0.0 and row["folds"] == 5
    assert row["intrinsic_dim_ratio_se"] == 0.0 and row["soft_dof_se"] > 0 and row["centered_soft_dof_se"] > 0
    attrs, layers = spectrum.read_eigenvalues(tmp_path / "t.eigenvalues.zarr")
    jackknifed = layers["layer"][0][JACKKNIFE_ARRAYS["second_moment"]]
    assert jackknifed.shape == (5, 6) and ((jackknifed > 1e-3).sum(axis=1) == 4).all()


def test_jackknife_error_matches_the_spread_over_independent_image_sets() -> None:
    """soft_dof of eigenvalues near lambda moves with the images: over 60 independent sets of 60 images the
    jackknife SE (5 folds) estimates the estimates' own spread, and its t-interval covers the planted value."""
    planted = [4e-3, 2e-3, 1e-3, 5e-4, 2.5e-4, 1e-4]
    truth = sum(v / (v + CFG["soft_lambda"]) for v in planted)
    estimates, errors, covered = [], [], 0
    for seed in range(60):
        acc = _folded(_planted_images(planted, n=60, seed=100 + seed), folds=5)
        values, _ = spectrum.eigenvalues(acc.second_moment.numpy())
        estimate = spectrum.measures(values, CFG)["soft_dof"]
        loo = [
            spectrum.measures(spectrum.eigenvalues(s)[0], CFG)
            for s, _ in leave_one_out(
                acc.fold_arrays()["fold_second_moment"].numpy(), acc.fold_arrays()["fold_mean"].numpy(), acc.fold_counts
            )
        ]
        se = standard_errors(loo, ["soft_dof"])["soft_dof_se"]
        estimates.append(estimate)
        errors.append(se)
        covered += intervals.t_interval(estimate, se, 4).low <= truth <= intervals.t_interval(estimate, se, 4).high
    spread = float(np.std(estimates, ddof=1))
    assert 0.7 * spread < float(np.mean(errors)) < 1.4 * spread
    assert covered >= 0.85 * 60


def test_stores_without_folds_still_read(tmp_path: Path) -> None:
    plain = CovarianceAccumulator(6)
    for image in _planted_images([1.0, 0.5, 0.2, 0.05, 1e-6, 1e-7], n=10, seed=2):
        plain.update(image)
    table = spectrum.decompose({"spectrum": CFG}, _write(tmp_path / "c.zarr", plain), tmp_path / "t.csv")
    assert table.iloc[0]["intrinsic_dim"] == 4 and not [c for c in table.columns if c.endswith("_se")]
    assert "folds" not in pd.read_csv(tmp_path / "t.csv").columns
    _, layers = spectrum.read_eigenvalues(tmp_path / "t.eigenvalues.zarr")
    assert set(layers["layer"][0]) == set(spectrum.EIGENVALUE_ARRAYS)


def test_jackknife_standard_error_by_hand() -> None:
    # leave-one-out values 1, 2, 3, 6: mean 3, squares 4 + 1 + 0 + 9 = 14, SE = sqrt(3/4 * 14)
    assert intervals.jackknife_se(np.array([1.0, 2.0, 3.0, 6.0])) == pytest.approx(math.sqrt(10.5))
    # leave-one-out statistics by hand: folds of 1 and 3 images with second moments 1 and 5 (scalar layers)
    moments, means, counts = np.array([[[1.0]], [[5.0]], [[2.0]]]), np.array([[0.0], [1.0], [2.0]]), [1, 3, 2]
    out = [value for s, m in leave_one_out(moments, means, counts) for value in (float(s[0, 0]), float(m[0]))]
    assert out == pytest.approx([(15 + 4) / 5, (3 + 4) / 5, (1 + 4) / 3, 4 / 3, (1 + 15) / 4, 3 / 4])
