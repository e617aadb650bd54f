"""Multiple-testing adjustment of a family of p-values."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["holm_adjust"]


def holm_adjust(p_values: ArrayLike) -> NDArray[np.float64]:
    """Holm's step-down adjusted p-values (Holm 1979), same order as the input, shape (m,).

    With p sorted ascending, p_adj(i) = max over j <= i of min(1, (m - j + 1) p(j));
    rejecting p_adj <= alpha controls the family-wise error rate at alpha.
    Equals R's ``p.adjust(p, "holm")``. NaN p-values (tests not computed)
    stay NaN and do not count in m.
    """
    p = np.asarray(p_values, dtype=float)
    if p.ndim != 1 or ((p < 0) | (p > 1)).any():
        raise ValueError("p-values must be a 1-D array in [0, 1]")
    out = np.full(p.shape, np.nan)
    present = np.flatnonzero(~np.isnan(p))
    m = present.size
    order = present[np.argsort(p[present], kind="stable")]
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(scaled)
    return out
