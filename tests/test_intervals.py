"""Every interval of the report against a case computed by hand, and the verdict sentences."""

from __future__ import annotations

import math

import numpy as np
import pytest

from eigpipe import intervals
from eigpipe.intervals import Interval
from eigpipe.report.uncertainty import verdict

# Student's t, 97.5% quantiles (printed tables)
T975 = {1: 12.7062047, 2: 4.3026527, 3: 3.1824463, 4: 2.7764451, 10: 2.2281389, 30: 2.0422725, math.inf: 1.9599640}


@pytest.mark.parametrize(("df", "expected"), T975.items())
def test_t_quantile_against_tables(df: float, expected: float) -> None:
    assert intervals.t_quantile(0.975, df) == pytest.approx(expected, abs=5e-7)
    assert intervals.t_quantile(0.025, df) == pytest.approx(-expected, abs=5e-7)


def test_t_quantile_at_fractional_degrees_of_freedom() -> None:
    """Welch's df are fractional: the quantile's tail, integrated from the t density, is 2.5%."""
    df = 3.2347
    q = intervals.t_quantile(0.975, df)
    x = np.linspace(q, q + 4000.0, 2_000_001)
    density = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    tail = np.trapezoid(density * (1 + x**2 / df) ** (-(df + 1) / 2), x)
    assert tail == pytest.approx(0.025, abs=2e-5)  # the rest lies beyond q + 4000
    assert T975[4] < q < T975[3]


def test_mean_over_three_seeds_by_hand() -> None:
    # 0.60, 0.64, 0.68: mean 0.64, sd 0.04, se 0.04 / sqrt(3), 2 df
    found = intervals.mean_interval([0.60, 0.64, 0.68])
    half = T975[2] * 0.04 / math.sqrt(3)
    assert (found.estimate, found.sd, found.df) == pytest.approx((0.64, 0.04, 2))
    assert (found.low, found.high) == pytest.approx((0.64 - half, 0.64 + half), abs=1e-7)
    with pytest.raises(ValueError, match="at least two"):
        intervals.mean_interval([0.6])


def test_paired_difference_by_hand() -> None:
    # differences 0.05, 0.02, 0.09: mean 0.053333, sd sqrt(0.0024667 / 2) = 0.035119
    found = intervals.paired_interval([0.70, 0.66, 0.69], [0.65, 0.64, 0.60])
    sd = math.sqrt(((0.05 - 0.16 / 3) ** 2 + (0.02 - 0.16 / 3) ** 2 + (0.09 - 0.16 / 3) ** 2) / 2)
    assert sd == pytest.approx(0.035119, abs=1e-6) and found.sd == pytest.approx(sd)
    half = T975[2] * sd / math.sqrt(3)
    assert (found.low, found.high) == pytest.approx((0.16 / 3 - half, 0.16 / 3 + half), abs=1e-7)


def test_welch_difference_by_hand() -> None:
    # [1, 2, 3, 4] vs [2, 4, 6]: variances 5/3 and 4, se^2 = 5/12 + 4/3 = 1.75, df = 1.75^2 / (...) = 3.2347
    found = intervals.welch_interval([1, 2, 3, 4], [2, 4, 6])
    df = 1.75**2 / ((5 / 12) ** 2 / 3 + (4 / 3) ** 2 / 2)
    assert found.estimate == -1.5 and found.se == pytest.approx(math.sqrt(1.75)) and found.df == pytest.approx(df)
    assert df == pytest.approx(3.2347, abs=1e-4)
    half = intervals.t_quantile(0.975, df) * math.sqrt(1.75)
    assert (found.low, found.high) == pytest.approx((-1.5 - half, -1.5 + half))


def test_percentile_interval_by_hand() -> None:
    found = intervals.percentile_interval(50.0, np.arange(101.0))  # 0..100: the 2.5% and 97.5% points
    assert (found.low, found.high) == pytest.approx((2.5, 97.5)) and found.estimate == 50.0


def test_seeds_and_images_combined_by_hand() -> None:
    # se 0.03 over seeds (2 df) and 0.04 over images (199 df): se 0.05, df 0.05^4 / (0.03^4 / 2 + 0.04^4 / 199)
    seeds = Interval(0.01, -0.1, 0.1, se=0.03, df=2, sd=0.052)
    found = intervals.combined(0.01, seeds, 0.04, 199)
    df = 0.05**4 / (0.03**4 / 2 + 0.04**4 / 199)
    assert found.se == pytest.approx(0.05) and found.df == pytest.approx(df) and df == pytest.approx(14.957, abs=1e-3)
    half = intervals.t_quantile(0.975, df) * 0.05
    assert (found.low, found.high) == pytest.approx((0.01 - half, 0.01 + half))
    alone = intervals.combined(0.01, None, 0.04, 199)  # one seed: the images alone
    assert alone.se == 0.04 and alone.df == 199


@pytest.mark.parametrize(
    ("low", "high", "zero", "margin"),
    [
        (-0.061, 0.033, "includes 0 (no difference shown)", "a loss of up to 0.061 and a gain of up to 0.033 are not"),
        (-0.061, 0.020, "includes 0 (no difference shown)", "a loss of up to 0.061 is not excluded"),
        (-0.020, 0.025, "includes 0", "within the +-0.030 margin: equivalent"),
        (0.010, 0.020, "excludes 0 (a real gain)", "within the +-0.030 margin"),
        (0.040, 0.090, "excludes 0 (a real gain)", "a gain larger than the 0.030 margin is shown"),
        (-0.090, -0.040, "excludes 0 (a real loss)", "a loss larger than the 0.030 margin is shown"),
        (-0.020, 0.080, "includes 0", "no loss larger than the 0.030 margin"),
        (-0.080, 0.090, "includes 0", "inconclusive at +-0.030"),
    ],
)
def test_verdict_says_zero_and_margin(low: float, high: float, zero: str, margin: str) -> None:
    line = verdict("derived vs scratch", "AP", Interval((low + high) / 2, low, high), 0.03, 3, 200)
    assert line.startswith(f"derived vs scratch: AP {(low + high) / 2:+.3f} [95% CI {low:+.3f}, {high:+.3f}]")
    assert "over 3 seeds x 200 images" in line and zero in line and margin in line
