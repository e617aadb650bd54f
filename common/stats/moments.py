"""Per-feature moments: counts, sums and centred sums of squares / cross-products.

A site computes sums of ``x - shift`` (the shift is a pooled mean the server
sends back after a first round) so that the variance does not lose digits to
cancellation when a feature is large (radiomics energies reach 1e9).
Shapes: rows (n, p) -> n (scalar), sum (p,), sumsq (p,), cross (p, p).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray


def moment_contribution(x: ArrayLike, shift: ArrayLike | None = None, cross: bool = False) -> dict[str, NDArray]:
    """Additive moments of the rows ``x`` (n, p) about ``shift`` (p,) (default 0). NaNs are rejected."""
    x = np.asarray(x, dtype=float)
    if x.ndim != 2:
        raise ValueError(f"rows must be 2-D (patients, features), got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("rows contain NaN or infinite values; impute or drop them at the site first")
    centred = x - (np.zeros(x.shape[1]) if shift is None else np.asarray(shift, dtype=float))
    out = {"n": np.array(float(len(x))), "sum": centred.sum(axis=0), "sumsq": (centred ** 2).sum(axis=0)}
    if cross:
        out["cross"] = centred.T @ centred
    return out


def add_contributions(parts: list[dict[str, NDArray]]) -> dict[str, NDArray]:
    """Element-wise sum of the sites' contributions (same keys and shapes)."""
    if not parts:
        raise ValueError("no site contribution to add")
    keys = parts[0].keys()
    for part in parts:
        if part.keys() != keys:
            raise ValueError(f"site contributions disagree on keys: {sorted(keys)} vs {sorted(part.keys())}")
    return {k: np.sum([np.asarray(p[k], dtype=float) for p in parts], axis=0) for k in keys}


def mean_var(total: dict[str, NDArray], shift: ArrayLike | None = None, ddof: int = 1) -> tuple[NDArray, NDArray]:
    """Mean (p,) and variance (p,) from summed moments taken about ``shift``."""
    n = float(total["n"])
    if n - ddof <= 0:
        raise ValueError(f"too few patients ({n:g}) for a variance with ddof={ddof}")
    m = total["sum"] / n
    var = (total["sumsq"] - n * m ** 2) / (n - ddof)
    mean = m + (0.0 if shift is None else np.asarray(shift, dtype=float))
    return mean, np.maximum(var, 0.0)


def covariance(total: dict[str, NDArray], ddof: int = 1) -> NDArray:
    """Covariance (p, p) from summed moments with ``cross`` (any common shift)."""
    n = float(total["n"])
    m = total["sum"] / n
    return (total["cross"] - n * np.outer(m, m)) / (n - ddof)


def correlation(total: dict[str, NDArray]) -> NDArray:
    """Pearson correlation (p, p) from summed moments with ``cross``; constant features give NaN rows."""
    cov = covariance(total)
    sd = np.sqrt(np.diag(cov))
    with np.errstate(invalid="ignore", divide="ignore"):
        return cov / np.outer(sd, sd)
