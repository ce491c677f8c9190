"""The measures users of other tools know (delve's saturation, participation ratio, RankMe, alpha-ReQ), each against
values computed by hand, and their columns in the spectrum stage's table."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from eigpipe.errors import ConfigError
from eigpipe.spectral import spectrum, store
from eigpipe.spectral.measures import alpha_req, participation_ratio, rankme, saturation_dim

SPECTRUM = [5.0, 3.0, 1.0, 0.5, 0.5]  # cumulative shares 0.5, 0.8, 0.9, 0.95, 1.0


@pytest.mark.parametrize(
    ("threshold", "count"),
    [
        (0.99, 4),  # 0.5, 0.8, 0.9 and 0.95 are below 0.99 (delve's +1 for falling 0.04 short is never applied)
        (0.96, 4),
        (0.9, 2),  # 0.5 and 0.8 below; 0.9 is not
        (0.81, 2),
        (0.4, 1),  # none below: at least one direction
    ],
)
def test_saturation_count_is_what_delve_computes(threshold: float, count: int) -> None:
    assert saturation_dim(np.array(SPECTRUM), threshold) == count


def test_saturation_of_a_zero_spectrum_is_zero_and_the_table_divides_by_channels(complete) -> None:
    assert saturation_dim(np.zeros(4)) == 0
    found = spectrum.measures(np.array(SPECTRUM), complete("spectrum", {"saturation_threshold": 0.9}))
    assert found["saturation_dim"] == 2 and found["saturation"] == pytest.approx(2 / 5)


def test_participation_ratio_by_hand() -> None:
    assert participation_ratio(np.array(SPECTRUM)) == pytest.approx(10.0**2 / (25 + 9 + 1 + 0.25 + 0.25))
    assert participation_ratio(np.array([2.0, 2.0, 2.0, 2.0])) == pytest.approx(4.0)
    assert participation_ratio(np.array([7.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert participation_ratio(np.zeros(3)) == 0.0


def test_rankme_uses_singular_values_not_eigenvalues() -> None:
    # eigenvalues 4, 1, 0 -> singular values 2, 1, 0 -> p = 2/3, 1/3, 0 (plus Garrido et al.'s epsilon)
    by_hand = math.exp(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)))
    assert rankme(np.array([4.0, 1.0, 0.0])) == pytest.approx(by_hand, abs=1e-5)
    eigen_entropy = math.exp(-(0.8 * math.log(0.8) + 0.2 * math.log(0.2)))  # the common mistake
    assert abs(rankme(np.array([4.0, 1.0, 0.0])) - eigen_entropy) > 0.2
    assert rankme(np.array([3.0, 3.0, 3.0])) == pytest.approx(3.0, abs=1e-5) and rankme(np.zeros(2)) == 0.0


def test_rankme_of_the_second_moment_is_rankme_of_the_feature_matrix() -> None:
    z = np.random.default_rng(0).normal(size=(200, 6)) * np.array([3.0, 2.0, 1.0, 0.5, 0.1, 0.01])
    sigma = np.linalg.svd(z, compute_uv=False)
    p = sigma / sigma.sum() + 1e-7
    direct = float(np.exp(-(p * np.log(p)).sum()))  # Garrido et al.'s formula on Z itself
    values, _ = spectrum.eigenvalues(z.T @ z / len(z))
    assert rankme(values) == pytest.approx(direct, rel=1e-9)


def test_alpha_by_hand() -> None:
    ranks = np.arange(1, 201)
    alpha, r2 = alpha_req(3.0 * ranks**-1.5, (6, 100))
    assert alpha == pytest.approx(1.5, rel=1e-9) and r2 == pytest.approx(1.0)
    # three points, slope by the closed form cov(x, y) / var(x) of x = log i, y = log mu
    x, y = np.log([1.0, 2.0, 3.0]), np.log([8.0, 4.0, 1.0])
    slope = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
    fitted = y.mean() + slope * (x - x.mean())
    r2_by_hand = 1 - ((y - fitted) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    alpha, r2 = alpha_req(np.array([8.0, 4.0, 1.0, 0.5]), (1, 3))
    assert alpha == pytest.approx(-slope) and r2 == pytest.approx(r2_by_hand) and r2 < 1


def test_alpha_range_is_clipped_zeros_left_out_and_too_few_points_nan() -> None:
    values = np.array([1.0, 1 / 4, 1 / 9, 1 / 16, 0.0, 0.0])
    assert alpha_req(values, (1, 100))[0] == pytest.approx(2.0)  # ranks 1-4: the zeros are left out
    assert all(math.isnan(v) for v in alpha_req(values, (3, 100)))  # only ranks 3 and 4 are left
    with pytest.raises(ConfigError, match="spectrum.alpha_ranks: first rank 9 is after the last 2"):
        spectrum.check_settings({"alpha_ranks": [9, 2]})


def test_spectrum_table_has_every_measure_for_both_matrices(tmp_path: Path, complete) -> None:
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(5, 5)))
    second = q @ np.diag(SPECTRUM) @ q.T
    mean = np.zeros(5)  # centred == uncentred: both sets of columns equal the hand-computed values
    path = store.write_store(
        tmp_path / "s.zarr",
        store.COVARIANCE_KIND,
        {"a": {"second_moment": second, "mean": mean}},
        {"run": "r", "iteration": 0},
        {"a": {"forward_index": 0}},
    )
    cfg = complete("spectrum", {"alpha_ranks": [1, 5]})
    row = spectrum.decompose({"spectrum": cfg}, path, tmp_path / "s.csv").iloc[0]
    for prefix in ("", "centered_"):
        assert row[prefix + "saturation_dim"] == 4 and row[prefix + "saturation"] == 0.8
        assert row[prefix + "participation_ratio"] == pytest.approx(100 / 35.5)
        assert row[prefix + "rankme"] == pytest.approx(rankme(np.array(SPECTRUM)))
        assert row[prefix + "alpha"] == pytest.approx(alpha_req(np.array(SPECTRUM), (1, 5))[0])
    assert (row["saturation_threshold"], row["alpha_rank_first"], row["alpha_rank_last"]) == (0.99, 1, 5)
