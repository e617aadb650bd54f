"""Random-effects meta-analysis of per-site estimates (DerSimonian & Laird 1986).

Used for per-site AUCs with their DeLong variances: it says how much sites
differ (tau^2, I^2) on top of the pooled figure computed from all patients.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import chi2, norm

__all__ = ["dersimonian_laird"]


def dersimonian_laird(estimates: ArrayLike, variances: ArrayLike, alpha: float = 0.05) -> dict[str, float]:
    """DerSimonian-Laird random-effects pooled estimate.

    Parameters
    ----------
    estimates : shape (k,), per-site estimates (e.g. AUCs), k >= 2.
    variances : shape (k,), their within-site variances (e.g. DeLong se^2), > 0.
    alpha : two-sided level of the Wald interval.

    Returns
    -------
    dict with estimate, se, ci_lower, ci_upper (estimate -/+ z se),
    tau2 = max(0, (Q - df) / (S1 - S2 / S1)) with S1 = sum w, S2 = sum w^2,
    w = 1 / variance; q (Cochran's Q), df = k - 1, p_heterogeneity,
    i2 = max(0, (Q - df) / Q) (0 when Q = 0), fixed_estimate, k.
    """
    y = np.asarray(estimates, dtype=float)
    v = np.asarray(variances, dtype=float)
    if y.ndim != 1 or y.shape != v.shape:
        raise ValueError(f"estimates and variances must be 1-D of equal shape, got {y.shape} and {v.shape}")
    if y.size < 2:
        raise ValueError(f"meta-analysis needs at least 2 sites, got {y.size}")
    if not (np.isfinite(y).all() and np.isfinite(v).all()) or (v <= 0).any():
        raise ValueError("estimates must be finite and variances finite and > 0")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    w = 1.0 / v
    fixed = float(np.dot(w, y) / w.sum())
    q = float(np.dot(w, (y - fixed) ** 2))
    df = y.size - 1
    tau2 = max(0.0, (q - df) / (w.sum() - np.dot(w, w) / w.sum()))
    w_re = 1.0 / (v + tau2)
    est = float(np.dot(w_re, y) / w_re.sum())
    se = float(np.sqrt(1.0 / w_re.sum()))
    z = float(norm.ppf(1.0 - alpha / 2.0))
    return {"estimate": est, "se": se, "ci_lower": est - z * se, "ci_upper": est + z * se,
            "tau2": float(tau2), "q": q, "df": df, "p_heterogeneity": float(chi2.sf(q, df)),
            "i2": max(0.0, (q - df) / q) if q > 0 else 0.0, "fixed_estimate": fixed, "k": int(y.size)}
