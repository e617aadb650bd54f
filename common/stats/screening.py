"""Univariate screening from moments: two-sample t / Welch tests and a correlation filter.

Inputs are the pooled per-class moments of :mod:`common.stats.moments`
(``n``, ``sum``, ``sumsq`` about one shift shared by both classes).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy import stats

from hccfed.common.stats.moments import mean_var


def two_sample_tests(pos: dict[str, NDArray], neg: dict[str, NDArray], equal_var: bool = True
                     ) -> dict[str, NDArray]:
    """Per-feature t statistic and two-sided p value of class 1 vs class 0.

    Same as ``scipy.stats.ttest_ind(x[y == 1], x[y == 0], equal_var=...)``:
    Student's pooled-variance test, or Welch's with Satterthwaite's degrees of freedom.
    """
    n1, n0 = float(pos["n"]), float(neg["n"])
    m1, v1 = mean_var(pos)
    m0, v0 = mean_var(neg)
    if equal_var:
        df = np.full_like(m1, n1 + n0 - 2.0)
        pooled = ((n1 - 1) * v1 + (n0 - 1) * v0) / df
        se = np.sqrt(pooled * (1.0 / n1 + 1.0 / n0))
    else:
        a, b = v1 / n1, v0 / n0
        se = np.sqrt(a + b)
        with np.errstate(invalid="ignore", divide="ignore"):
            df = (a + b) ** 2 / (a ** 2 / (n1 - 1) + b ** 2 / (n0 - 1))
    with np.errstate(invalid="ignore", divide="ignore"):
        t = (m1 - m0) / se
    p = 2.0 * stats.t.sf(np.abs(t), df)
    return {"t": t, "p": p, "df": df, "mean_pos": m1, "mean_neg": m0}


def correlation_filter(corr: NDArray, order: NDArray, threshold: float = 0.8) -> NDArray:
    """Indices kept by a greedy |r| filter: walk features by ``order`` (most wanted first),
    keep one unless |r| > threshold with a feature already kept. Returns sorted indices."""
    kept: list[int] = []
    for j in np.asarray(order, dtype=int):
        if not np.isfinite(corr[j, j]):
            continue  # constant feature
        if all(abs(corr[j, k]) <= threshold for k in kept):
            kept.append(int(j))
    return np.array(sorted(kept), dtype=int)
