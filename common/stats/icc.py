"""Intraclass correlation (two-way ANOVA, Shrout & Fleiss / McGraw & Wong) from additive sums.

Ratings: (n patients, k readers, p features). A site sends, per feature, about
a shift the server chose (the pooled mean): n, the sum over patients of the
squared patient totals (p,), the reader totals (k, p) and the sum of squares (p,).
From these the pooled mean squares follow exactly:
ICC(3,1) consistency = (MSR - MSE) / (MSR + (k-1) MSE);
ICC(2,1) absolute agreement = (MSR - MSE) / (MSR + (k-1) MSE + k (MSC - MSE) / n).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

#: The seed of the perturbed-mask "second reader" whose radiomics the ICC filter compares with the
#: first (a robustness-by-perturbation test in the manner of Zwanenburg et al. 2019, where no second
#: segmentation exists): the same in the simulation and in the ServerApp's stats job.
PERTURBED_READER_SEED = 1
#: How many training patients per site the second reader reads: a random subset, as reproducibility
#: studies re-segment a subset (commonly 30 or more patients) rather than the whole cohort.
ICC_PATIENTS_PER_SITE = 30


def icc_contribution(ratings: ArrayLike, shift: ArrayLike | None = None) -> dict[str, NDArray]:
    """Additive sums of ratings (n, k, p) about ``shift`` (p,)."""
    r = np.asarray(ratings, dtype=float)
    if r.ndim != 3:
        raise ValueError(f"ratings must be (patients, readers, features), got shape {r.shape}")
    if shift is not None:
        r = r - np.asarray(shift, dtype=float)
    totals = r.sum(axis=1)  # (n, p)
    return {"n": np.array(float(r.shape[0])), "row_sq": (totals ** 2).sum(axis=0),
            "col_sum": r.sum(axis=0), "sumsq": (r ** 2).sum(axis=(0, 1))}


def icc_from_sums(total: dict[str, NDArray], kind: str = "icc3") -> NDArray:
    """ICC per feature (p,) from pooled sums; ``kind`` "icc3" (ICC(3,1)) or "icc2" (ICC(2,1))."""
    n = float(total["n"])
    col = np.asarray(total["col_sum"])
    k = col.shape[0]
    grand = col.sum(axis=0)
    correction = grand ** 2 / (n * k)
    ss_rows = total["row_sq"] / k - correction
    ss_cols = (col ** 2).sum(axis=0) / n - correction
    ss_err = total["sumsq"] - correction - ss_rows - ss_cols
    msr, msc = ss_rows / (n - 1), ss_cols / (k - 1)
    mse = ss_err / ((n - 1) * (k - 1))
    with np.errstate(invalid="ignore", divide="ignore"):
        if kind == "icc3":
            return (msr - mse) / (msr + (k - 1) * mse)
        if kind == "icc2":
            return (msr - mse) / (msr + (k - 1) * mse + k * (msc - mse) / n)
    raise ValueError(f"kind must be 'icc3' or 'icc2', got {kind!r}")
