"""Spectrum measures that users of other tools know, on a clipped, descending eigenvalue spectrum.

Definitions (README, "Spectra and dimensions"), each from the source named:
- delve's saturation count: delve 0.1.50, ``delve/metrics.py`` (``compute_intrinsic_dimensionality``);
- participation ratio: (sum mu)^2 / sum mu^2;
- RankMe: Garrido et al. 2023 (ICML), the entropy of the normalised singular values of the feature matrix;
- alpha-ReQ: Agrawal et al. 2022 (NeurIPS), the exponent of a power law mu_i ~ i^-alpha fitted over a range of
  ranks (the authors' reptrix, ``reptrix/alpha.py``, fits ranks 6 to 100 by default).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RANKME_EPSILON = 1e-7  # Garrido et al.'s epsilon in p_k = sigma_k / ||sigma||_1 + epsilon (float32 features)


def saturation_dim(values: np.ndarray, threshold: float = 0.99) -> int:
    """delve's intrinsic dimensionality, as delve 0.1.50 computes it: the number of leading directions whose
    cumulative share of the variance is below ``threshold``, at least one (0 for a zero spectrum). delve's code
    means to add one more direction when that share falls more than 0.02 short of the threshold, but it slices the
    already reduced eigenvector matrix, so the extra direction is never added; this reproduces delve's numbers.
    delve's saturation is this count divided by the channels."""
    values = np.asarray(values, dtype=np.float64)
    total = values.sum()
    if not total > 0:
        return 0
    return max(1, int((np.cumsum(values) / total < threshold).sum()))


def participation_ratio(values: np.ndarray) -> float:
    """(sum mu)^2 / sum mu^2: 1 for one direction, C for a flat spectrum (0 for a zero one)."""
    values = np.asarray(values, dtype=np.float64)
    squares = float((values**2).sum())
    return float(values.sum()) ** 2 / squares if squares > 0 else 0.0


def rankme(values: np.ndarray, epsilon: float = RANKME_EPSILON) -> float:
    """RankMe of the feature matrix Z whose Gram matrix has eigenvalues ``values``: its singular values are their
    square roots (up to one common factor, which the normalisation removes), p_k = sigma_k / sum sigma + epsilon,
    and RankMe = exp(-sum_k p_k log p_k). Not the entropy of the eigenvalues themselves (that is effective_rank)."""
    sigma = np.sqrt(np.clip(np.asarray(values, dtype=np.float64), 0.0, None))
    total = sigma.sum()
    if not total > 0:
        return 0.0
    p = sigma / total + epsilon
    return float(np.exp(-(p * np.log(p)).sum()))


def alpha_req(values: np.ndarray, ranks: Sequence[int] = (6, 100)) -> tuple[float, float]:
    """(alpha, R^2) of the ordinary least-squares line log mu_i = c - alpha log i over the 1-based ranks
    ``ranks[0]..ranks[1]`` (clipped to the spectrum; zero eigenvalues left out). NaN for fewer than 3 points;
    R^2 is NaN when the fitted eigenvalues are all equal."""
    first, last = int(ranks[0]), int(ranks[1])
    values = np.asarray(values, dtype=np.float64)
    rank = np.arange(1, len(values) + 1)
    keep = (rank >= first) & (rank <= last) & (values > 0)
    if keep.sum() < 3:
        return float("nan"), float("nan")
    x, y = np.log(rank[keep]), np.log(values[keep])
    slope, intercept = np.polyfit(x, y, 1)
    residual = float(((y - (slope * x + intercept)) ** 2).sum())
    spread = float(((y - y.mean()) ** 2).sum())
    return float(-slope), (1.0 - residual / spread) if spread > 0 else float("nan")
