"""The jackknife over image folds (covariance.folds): each layer's statistics without one fold at a time, and the
standard error of any measure from its values on those leave-one-fold-out statistics.

A store's fold arrays hold each fold's own per-image-weighted statistics (count n_k, second moment S_k, mean m_k);
without fold k they are (sum_j n_j S_j - n_k S_k) / (n - n_k), the same for the mean. The delete-a-group
jackknife standard error of a measure theta is sqrt((K - 1) / K * sum_k (theta_(k) - mean theta)^2), K the folds
that hold images.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from eigpipe.intervals import jackknife_se

FOLD_ARRAYS = ("fold_second_moment", "fold_mean")
# eigenvalue-store arrays: the descending eigenvalues of each leave-one-fold-out matrix, [K, C]
JACKKNIFE_ARRAYS = {"second_moment": "second_moment_jackknife", "covariance": "covariance_jackknife"}
# measures that get a standard error column (<measure>_se, and centered_<measure>_se)
SE_MEASURES = ("intrinsic_dim", "intrinsic_dim_ratio", "relative_dim", "soft_dof", "effective_rank")


def leave_one_out(
    moments: np.ndarray, means: np.ndarray, counts: Sequence[int]
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(second moment, mean) of all images but one fold's, for every fold that holds images."""
    weights = np.asarray(counts, dtype=np.float64)
    used = np.flatnonzero(weights > 0)
    if len(used) < 2:
        raise ValueError("a jackknife needs at least two folds with images")
    total = weights[used].sum()
    moment_sum = np.tensordot(weights[used], moments[used], axes=1)
    mean_sum = weights[used] @ means[used]
    for k in used:
        rest = total - weights[k]
        yield (moment_sum - weights[k] * moments[k]) / rest, (mean_sum - weights[k] * means[k]) / rest


def standard_errors(values: Sequence[dict[str, float]], names: Sequence[str]) -> dict[str, float]:
    """{name_se: jackknife SE} of measures computed on each leave-one-fold-out statistic."""
    return {f"{name}_se": float(jackknife_se(np.array([v[name] for v in values], dtype=np.float64))) for name in names}
