"""Confidence intervals for the study's comparisons: Student t over seeds (one sample, paired, Welch), the
delete-a-group jackknife over image folds, bootstrap percentiles over images, and the sum of two independent
sources of noise (seeds and images) with Welch-Satterthwaite degrees of freedom. NumPy only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """An estimate with its standard error and a two-sided interval; ``df`` is inf for a normal quantile and
    nan where the interval is not a t-interval (bootstrap percentiles)."""

    estimate: float
    low: float
    high: float
    se: float = math.nan
    df: float = math.nan
    sd: float = math.nan  # of the sample the interval comes from (seeds), where there is one

    def excludes(self, value: float) -> bool:
        return not self.low <= value <= self.high


def _beta_fraction(x: float, a: float, b: float) -> float:
    """The continued fraction of the regularized incomplete beta function (modified Lentz's method)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        even = m * (b - m) * x / ((qam + 2 * m) * (a + 2 * m))
        odd = -(a + m) * (qab + m) * x / ((a + 2 * m) * (qap + 2 * m))
        for numerator in (even, odd):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def incomplete_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), the regularized incomplete beta function."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_fraction(x, a, b) / a
    return 1.0 - front * _beta_fraction(1.0 - x, b, a) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom (any df > 0; inf is the normal)."""
    if math.isinf(df):
        return NormalDist().cdf(t)
    tail = 0.5 * incomplete_beta(df / (df + t * t), df / 2.0, 0.5)
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t (bisection on the CDF, to 1e-12)."""
    if not 0.0 < p < 1.0 or not df > 0:
        raise ValueError(f"t quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if math.isinf(df):
        return NormalDist().inv_cdf(p)
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2.0
    while high - low > 1e-12 * max(1.0, high):
        middle = (low + high) / 2.0
        low, high = (middle, high) if t_cdf(middle, df) < p else (low, middle)
    return (low + high) / 2.0


def t_interval(estimate: float, se: float, df: float, confidence: float = CONFIDENCE, sd: float = math.nan) -> Interval:
    half = t_quantile(0.5 + confidence / 2.0, df) * se
    return Interval(float(estimate), float(estimate - half), float(estimate + half), float(se), float(df), float(sd))


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The t-interval of a mean over n >= 2 values (n - 1 degrees of freedom)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        raise ValueError("a t-interval needs at least two values")
    sd = float(x.std(ddof=1))
    return t_interval(float(x.mean()), sd / math.sqrt(len(x)), len(x) - 1, confidence, sd)


def paired_interval(values: Sequence[float], reference: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The t-interval of mean(values - reference) over pairs (the same seeds)."""
    return mean_interval(np.asarray(values, dtype=np.float64) - np.asarray(reference, dtype=np.float64), confidence)


def welch_interval(values: Sequence[float], reference: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The Welch t-interval of mean(values) - mean(reference) for unpaired samples of at least two each."""
    a, b = np.asarray(values, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("a Welch interval needs at least two values on each side")
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if se > 0 else math.inf
    return t_interval(float(a.mean() - b.mean()), se, df, confidence)


def jackknife_se(leave_one_out: np.ndarray) -> np.ndarray:
    """Delete-a-group jackknife standard error from the K estimates that each leave one group out (axis 0):
    sqrt((K - 1) / K * sum_k (theta_k - mean theta)^2)."""
    values = np.asarray(leave_one_out, dtype=np.float64)
    k = values.shape[0]
    if k < 2:
        raise ValueError("a jackknife needs at least two groups")
    return np.sqrt((k - 1) / k * ((values - values.mean(axis=0)) ** 2).sum(axis=0))


def percentile_interval(estimate: float, samples: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The bootstrap percentile interval (and the samples' sd as the standard error)."""
    x = np.asarray(samples, dtype=np.float64)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(x, [tail, 1.0 - tail])
    return Interval(float(estimate), float(low), float(high), float(x.std(ddof=1)))


def combined(
    estimate: float, seeds: Interval | None, images_se: float, images_df: float, confidence: float = CONFIDENCE
) -> Interval:
    """An interval for noise from both seeds and images: the variances add (SE^2 = SE_seeds^2 + SE_images^2), and
    the t quantile takes the Welch-Satterthwaite degrees of freedom. The images term (the spread of the mean over
    the same seeds when the images are resampled) also holds some seed x image noise, so the sum errs wide.
    Without a seed interval (one seed) only the images term remains."""
    a = seeds.se**2 if seeds is not None else 0.0
    b = images_se**2
    if a + b == 0:
        return Interval(float(estimate), float(estimate), float(estimate), 0.0, math.inf)
    parts = ((a, seeds.df if seeds is not None else math.inf), (b, images_df))
    df = (a + b) ** 2 / sum(v**2 / d for v, d in parts if v > 0)
    return t_interval(estimate, math.sqrt(a + b), df, confidence, seeds.sd if seeds is not None else math.nan)
