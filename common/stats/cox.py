"""Cox proportional hazards from per-time aggregates of the sites, on a shared time grid.

Event times are patient-level, so sites never send them: each site reports a
histogram of its event counts on a fixed grid (bins of ``width`` months over
[0, max_months]); the server keeps the bins with an event and sends their
times back. Follow-up times are rounded to the grid by the site (exact when
times are recorded with the grid's resolution, e.g. 0.1 month).

For each grid time t_k a site returns, over its patients at risk (time >= t_k):
S0 (K,) = sum exp(xb), S1 (K, p) = sum x exp(xb), S2 (K, p, p) = sum x x^T exp(xb);
and over its events at t_k: d (K,), E0, E1, E2 (the same sums over the tied
events, needed for Efron's ties) and X1 (K, p) = sum x. The pooled partial
likelihood, gradient and Hessian follow exactly (Breslow or Efron ties).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray


def grid_index(times: ArrayLike, width: float) -> NDArray:
    """Grid bin of each time: round(time / width) (integers)."""
    return np.rint(np.asarray(times, dtype=float) / width).astype(np.int64)


def event_histogram(times: ArrayLike, events: ArrayLike, width: float, max_months: float) -> NDArray:
    """Event counts per grid bin, shape (round(max_months / width) + 1,)."""
    size = int(round(max_months / width)) + 1
    idx = grid_index(times, width)[np.asarray(events).astype(bool)]
    if idx.size and (idx.max() >= size or idx.min() < 0):
        raise ValueError(f"an event time lies outside the grid [0, {max_months}] months; raise max_months")
    return np.bincount(idx, minlength=size).astype(float)


def cox_contribution(x: NDArray, times: ArrayLike, events: ArrayLike, beta: ArrayLike, grid: ArrayLike,
                     width: float) -> dict[str, NDArray]:
    """Per-grid-time risk-set and event sums of one site's rows ``x`` (n, p) (standardised)."""
    idx = grid_index(times, width)
    ev = np.asarray(events).astype(bool)
    grid = np.asarray(grid, dtype=np.int64)
    eta = x @ np.asarray(beta, dtype=float)
    risk = np.exp(eta)
    k, p = len(grid), x.shape[1]
    out = {name: np.zeros(shape) for name, shape in
           (("S0", k), ("S1", (k, p)), ("S2", (k, p, p)), ("d", k), ("E0", k), ("E1", (k, p)),
            ("E2", (k, p, p)), ("X1", (k, p)))}
    outer = x[:, :, None] * x[:, None, :] * risk[:, None, None]
    for j, g in enumerate(grid):
        at_risk = idx >= g
        here = ev & (idx == g)
        out["S0"][j], out["S1"][j], out["S2"][j] = (risk[at_risk].sum(), x[at_risk].T @ risk[at_risk],
                                                    outer[at_risk].sum(axis=0))
        out["d"][j], out["E0"][j], out["E1"][j] = here.sum(), risk[here].sum(), x[here].T @ risk[here]
        out["E2"][j], out["X1"][j] = outer[here].sum(axis=0), x[here].sum(axis=0)
    return out


def partial_likelihood(total: dict[str, NDArray], beta: NDArray, ties: str = "efron"
                       ) -> tuple[float, NDArray, NDArray]:
    """Log partial likelihood, gradient (p,) and negative Hessian (p, p) from pooled sums."""
    if ties not in ("efron", "breslow"):
        raise ValueError(f"ties must be 'efron' or 'breslow', got {ties!r}")
    p = len(beta)
    loglik, grad, hess = 0.0, np.zeros(p), np.zeros((p, p))
    for j in range(len(total["d"])):
        d = int(round(total["d"][j]))
        if d == 0:
            continue
        loglik += float(total["X1"][j] @ beta)
        grad += total["X1"][j]
        fractions = np.arange(d) / d if ties == "efron" else np.zeros(d)
        for f in fractions:
            s0 = total["S0"][j] - f * total["E0"][j]
            s1 = total["S1"][j] - f * total["E1"][j]
            s2 = total["S2"][j] - f * total["E2"][j]
            mean = s1 / s0
            loglik -= np.log(s0)
            grad -= mean
            hess += s2 / s0 - np.outer(mean, mean)
    return loglik, grad, hess


def hazard_ratio_table(beta: NDArray, cov: NDArray, names: list[str], z: float = 1.959963984540054
                       ) -> list[dict]:
    """Rows of coefficient, SE, HR and its 95% CI, z and two-sided p (per feature, raw scale)."""
    from scipy import stats

    se = np.sqrt(np.diag(cov))
    rows = []
    for name, b, s in zip(names, beta, se):
        rows.append({"feature": name, "coef": float(b), "se": float(s), "hr": float(np.exp(b)),
                     "hr_lower": float(np.exp(b - z * s)), "hr_upper": float(np.exp(b + z * s)),
                     "z": float(b / s), "p": float(2 * stats.norm.sf(abs(b / s)))})
    return rows
