"""Federated survival figures from the (time bin x score bin) histograms of a model summary.

Input: the pooled ``cidx_event`` and ``cidx_all`` arrays of shape
(time_bins, cindex_score_bins) of :func:`common.metrics.federated_clinical.model_site_summary`
(events and all patients per right-closed time bin and score bin). Patients
of one time bin are taken to share its upper edge as follow-up time, so the
figures equal those of :mod:`common.metrics.survival_clinical` exactly when
follow-up times lie on bin edges (e.g. whole months on the default 0.25-month
grid), and otherwise within a bin width in time.

Risk groups are unions of score bins: give cutpoints on the C-index score
grid edges (:func:`snap_to_score_edges`); a score bin joins group k when k
cutpoints are <= its centre, which is the per-patient rule
``score >= cutpoint`` of :func:`common.metrics.survival_clinical.risk_groups`.
Sign convention: a HIGHER SCORE MEANS HIGHER RISK.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from hccfed.common.metrics.federated_clinical import ClinicalGrid
from hccfed.common.metrics.survival_clinical import (
    censoring_survival_from_counts,
    kaplan_meier_from_counts,
    logrank_from_counts,
    weighted_auc_from_counts,
)

__all__ = [
    "snap_to_score_edges",
    "score_quantile_cutpoints",
    "kaplan_meier_by_group_from_summary",
    "logrank_from_summary",
    "time_dependent_auc_from_summary",
]


def _arrays(m: dict, grid: ClinicalGrid) -> tuple[NDArray, NDArray]:
    ev = np.asarray(m["cidx_event"], dtype=float)
    al = np.asarray(m["cidx_all"], dtype=float)
    expected = (grid.base.time_bins, grid.base.cindex_score_bins)
    if ev.shape != expected or al.shape != expected:
        raise ValueError(f"cidx arrays must have shape {expected} for this grid, got {ev.shape} and {al.shape}")
    return ev, al


def snap_to_score_edges(values: ArrayLike, grid: ClinicalGrid | None = None) -> NDArray[np.float64]:
    """Each value moved to the nearest C-index score-bin edge (inner edges only)."""
    grid = ClinicalGrid() if grid is None else grid
    edges = grid.cindex_score_edges[1:-1]
    v = np.atleast_1d(np.asarray(values, dtype=float))
    idx = np.clip(np.searchsorted(edges, v), 1, edges.size - 1)
    left, right = edges[idx - 1], edges[idx]
    return np.where(np.abs(v - left) <= np.abs(right - v), left, right)


def score_quantile_cutpoints(m: dict, quantiles: ArrayLike = (0.5,), grid: ClinicalGrid | None = None) -> NDArray:
    """Score cutpoints at pooled quantiles of all patients' scores, snapped to bin edges.

    The cutpoint for q is the upper edge of the first score bin at which the
    cumulative count reaches q * n, so the low group (score < cutpoint) holds
    at least a fraction q of the patients (default: the median, two risk
    groups). Duplicates are dropped. Returns a strictly increasing array.
    """
    grid = ClinicalGrid() if grid is None else grid
    _, al = _arrays(m, grid)
    cum = np.cumsum(al.sum(axis=0))
    if cum[-1] == 0:
        raise ValueError("no patient in the summary")
    q = np.atleast_1d(np.asarray(quantiles, dtype=float))
    if ((q <= 0) | (q >= 1)).any():
        raise ValueError("quantiles must lie in (0, 1)")
    first = np.searchsorted(cum, q * cum[-1], side="left")
    idx = np.clip(first + 1, 1, grid.base.cindex_score_bins - 1)
    return np.unique(grid.cindex_score_edges[idx])


def _group_of_score_bins(cutpoints: ArrayLike, grid: ClinicalGrid) -> NDArray[np.intp]:
    c = np.atleast_1d(np.asarray(cutpoints, dtype=float))
    if c.ndim != 1 or c.size == 0 or not np.isfinite(c).all() or (np.diff(c) <= 0).any():
        raise ValueError("cutpoints must be a non-empty, strictly increasing 1-D array of finite values")
    edges = grid.cindex_score_edges
    centres = 0.5 * (edges[:-1] + edges[1:])
    return np.searchsorted(c, centres, side="right").astype(np.intp)


def _by_group(m: dict, cutpoints: ArrayLike, grid: ClinicalGrid) -> tuple[NDArray, NDArray]:
    """Events and all patients per (time bin, risk group), shape (time_bins, groups)."""
    ev, al = _arrays(m, grid)
    group = _group_of_score_bins(cutpoints, grid)
    k = int(np.size(cutpoints)) + 1
    onehot = np.eye(k)[group]  # (score_bins, groups)
    return ev @ onehot, al @ onehot


def kaplan_meier_by_group_from_summary(m: dict, cutpoints: ArrayLike, grid: ClinicalGrid | None = None) -> list[dict]:
    """KM curve of each risk group (0 = lowest risk), one dict per group.

    Each dict: times (upper edges of the occupied time bins, months),
    n_at_risk, n_events, n_censored, survival (just after each time), n.
    """
    grid = ClinicalGrid() if grid is None else grid
    ev, al = _by_group(m, cutpoints, grid)
    upper = grid.time_upper_edges
    curves = []
    for g in range(ev.shape[1]):
        occupied = al[:, g] > 0
        at_risk = np.cumsum(al[::-1, g])[::-1]
        surv = kaplan_meier_from_counts(upper, at_risk, ev[:, g])
        curves.append({"times": upper[occupied], "n_at_risk": at_risk[occupied], "n_events": ev[occupied, g],
                       "n_censored": (al - ev)[occupied, g], "survival": surv[occupied], "n": float(al[:, g].sum())})
    return curves


def logrank_from_summary(m: dict, cutpoints: ArrayLike, grid: ClinicalGrid | None = None) -> dict:
    """Log-rank test across the risk groups (see :func:`~common.metrics.survival_clinical.logrank_from_counts`)."""
    grid = ClinicalGrid() if grid is None else grid
    ev, al = _by_group(m, cutpoints, grid)
    return logrank_from_counts(np.cumsum(al[::-1], axis=0)[::-1], ev)


def time_dependent_auc_from_summary(m: dict, horizon: float = 24.0, grid: ClinicalGrid | None = None) -> dict:
    """Cumulative/dynamic AUC at ``horizon`` months with IPCW, from the histograms.

    Cases: events in time bins whose upper edge is <= horizon, weighted by
    1 / G at their bin (G the KM of censoring, events before censorings);
    controls: all patients in later bins. Score bins are the ordered score
    levels (same bin = tie, 1/2). As
    :func:`common.metrics.survival_clinical.time_dependent_auc`.
    """
    grid = ClinicalGrid() if grid is None else grid
    if not np.isfinite(horizon) or horizon <= 0:
        raise ValueError(f"horizon must be a positive number of months, got {horizon}")
    ev, al = _arrays(m, grid)
    d, n_all = ev.sum(axis=1), al.sum(axis=1)
    at_risk = np.cumsum(n_all[::-1])[::-1]
    g = censoring_survival_from_counts(at_risk, d, n_all - d)
    case_bins = grid.time_upper_edges <= horizon + 1e-9
    n_cases, n_controls = int(ev[case_bins].sum()), int(al[~case_bins].sum())
    if n_cases == 0 or n_controls == 0:
        raise ValueError(f"time-dependent AUC at {horizon} months needs cases and controls "
                         f"(n_cases={n_cases}, n_controls={n_controls})")
    with_cases = case_bins & (d > 0)
    if (g[with_cases] <= 0).any():
        raise ValueError("the censoring survival reaches 0 before a case; IPCW weights are undefined")
    w = (ev[with_cases] / g[with_cases, None]).sum(axis=0)
    return {"auc": weighted_auc_from_counts(w, al[~case_bins].sum(axis=0)),
            "n_cases": n_cases, "n_controls": n_controls}
