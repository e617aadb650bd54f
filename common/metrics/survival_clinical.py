"""Survival figures on per-patient arrays: Kaplan-Meier, log-rank, time-dependent AUC.

The pooled reference for :mod:`common.metrics.summary_survival`. Each figure
is computed in two steps, per-time count tables and then a formula on them
(``*_from_counts``), so the federated form feeds the same formulas with
tables built from summed histograms.

Conventions: times are follow-up in months (>= 0); ``events`` 1 = recurrence
observed at that time, 0 = censored. A HIGHER SCORE MEANS HIGHER RISK. At a
tied time, events are taken to come before censorings (a patient censored at
t is still at risk at t). All inputs are 1-D arrays of shape ``(n,)``.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import chi2

from hccfed.common.metrics.discrimination import _as_1d_float, _as_binary, _check_same_length

__all__ = [
    "kaplan_meier",
    "kaplan_meier_from_counts",
    "survival_at",
    "logrank_test",
    "logrank_from_counts",
    "risk_groups",
    "censoring_survival_from_counts",
    "time_dependent_auc",
    "weighted_auc_from_counts",
]


def _survival_arrays(times: ArrayLike, events: ArrayLike) -> tuple[NDArray, NDArray]:
    t = _as_1d_float(times, "times")
    e = _as_binary(events, "events")
    _check_same_length(times=t, events=e)
    if t.size == 0:
        raise ValueError("no patients: times is empty")
    if (t < 0).any():
        raise ValueError("times must be >= 0 months")
    return t, e


def _counts_by_time(t: NDArray, e: NDArray) -> tuple[NDArray, NDArray, NDArray, NDArray]:
    """Distinct ascending times, at risk (T >= time), events and censorings at each."""
    values, inverse = np.unique(t, return_inverse=True)
    n_all = np.bincount(inverse, minlength=values.size)
    n_events = np.bincount(inverse[e], minlength=values.size)
    at_risk = np.cumsum(n_all[::-1])[::-1]
    return values, at_risk, n_events, n_all - n_events


def kaplan_meier_from_counts(times: NDArray, at_risk: NDArray, n_events: NDArray) -> NDArray[np.float64]:
    """Product-limit survival just after each time: prod over times <= t of (1 - d/r).

    times, at_risk, n_events : shape (m,), ascending times; rows with r = 0
    contribute a factor 1. Returns survival of shape (m,).
    """
    r = np.asarray(at_risk, dtype=float)
    d = np.asarray(n_events, dtype=float)
    factor = np.where(r > 0, 1.0 - np.divide(d, r, out=np.zeros_like(d), where=r > 0), 1.0)
    return np.cumprod(factor)


def kaplan_meier(times: ArrayLike, events: ArrayLike) -> dict[str, NDArray]:
    """Kaplan-Meier estimate of recurrence-free survival.

    Returns
    -------
    dict of arrays of shape (m,) over the m distinct follow-up times
    (ascending): times, n_at_risk, n_events, n_censored, survival (the
    estimate just after each time, as lifelines' ``survival_function_``).
    All censored gives survival 1 everywhere.
    """
    t, e = _survival_arrays(times, events)
    values, at_risk, d, c = _counts_by_time(t, e)
    return {"times": values, "n_at_risk": at_risk, "n_events": d, "n_censored": c,
            "survival": kaplan_meier_from_counts(values, at_risk, d)}


def survival_at(curve: dict, at: ArrayLike) -> NDArray[np.float64]:
    """Step-function value of a KM ``curve`` at the times ``at`` (1 before the first time)."""
    t = np.asarray(curve["times"], dtype=float)
    s = np.concatenate([[1.0], np.asarray(curve["survival"], dtype=float)])
    return s[np.searchsorted(t, np.asarray(at, dtype=float), side="right")]


def risk_groups(scores: ArrayLike, cutpoints: ArrayLike) -> NDArray[np.intp]:
    """Risk group 0..len(cutpoints) of each score: the number of cutpoints <= score.

    With one cutpoint c: group 1 (high risk) iff ``score >= c``, as
    :func:`common.metrics.clinical.threshold_metrics`.
    """
    s = _as_1d_float(scores, "scores")
    c = np.atleast_1d(np.asarray(cutpoints, dtype=float))
    if c.ndim != 1 or c.size == 0 or not np.isfinite(c).all() or (np.diff(c) <= 0).any():
        raise ValueError("cutpoints must be a non-empty, strictly increasing 1-D array of finite values")
    return np.searchsorted(c, s, side="right").astype(np.intp)


def logrank_from_counts(at_risk: NDArray, n_events: NDArray) -> dict:
    """k-group log-rank test from per-time tables of shape (m, k).

    at_risk[i, g], n_events[i, g]: patients of group g at risk at time i and
    their events there. Groups with no patient are dropped. The statistic is
    (O - E)' V^- (O - E) on the first k - 1 groups, hypergeometric variance
    (Mantel 1966), k - 1 degrees of freedom.

    Returns dict with chi2, df, p_value, observed (k,), expected (k,).
    Raises ValueError with fewer than two non-empty groups.
    """
    r = np.asarray(at_risk, dtype=float)
    d = np.asarray(n_events, dtype=float)
    present = r.max(axis=0) > 0 if r.size else np.zeros(r.shape[1], bool)
    if present.sum() < 2:
        raise ValueError(f"the log-rank test needs at least two non-empty groups, got {int(present.sum())}")
    r, d = r[:, present], d[:, present]
    r_tot, d_tot = r.sum(axis=1), d.sum(axis=1)
    keep = r_tot > 0
    r, d, r_tot, d_tot = r[keep], d[keep], r_tot[keep], d_tot[keep]
    frac = r / r_tot[:, None]
    observed, expected = d.sum(axis=0), (d_tot[:, None] * frac).sum(axis=0)
    scale = np.where(r_tot > 1, d_tot * (r_tot - d_tot) / np.maximum(r_tot - 1, 1), 0.0)
    k = r.shape[1]
    var = np.einsum("i,ig,gh->gh", scale, frac, np.eye(k)) - np.einsum("i,ig,ih->gh", scale, frac, frac)
    diff = (observed - expected)[:-1]
    stat = float(diff @ np.linalg.pinv(var[:-1, :-1]) @ diff)
    df = k - 1
    full_o = np.zeros(present.size)
    full_e = np.zeros(present.size)
    full_o[present], full_e[present] = observed, expected
    return {"chi2": stat, "df": df, "p_value": float(chi2.sf(stat, df)), "observed": full_o, "expected": full_e}


def logrank_test(times: ArrayLike, events: ArrayLike, groups: ArrayLike) -> dict:
    """Log-rank test of equal recurrence-free survival across groups.

    groups : shape (n,), integer group of each patient (e.g. from
    :func:`risk_groups`). Returns as :func:`logrank_from_counts`, with the
    group labels under ``groups``; equals
    ``lifelines.statistics.multivariate_logrank_test``.
    """
    t, e = _survival_arrays(times, events)
    g = np.asarray(groups)
    if g.shape != t.shape:
        raise ValueError(f"groups must have shape {t.shape}, got {g.shape}")
    labels, gi = np.unique(g, return_inverse=True)
    values, ti = np.unique(t, return_inverse=True)
    shape = (values.size, labels.size)
    n_all = np.zeros(shape)
    n_ev = np.zeros(shape)
    np.add.at(n_all, (ti, gi), 1.0)
    np.add.at(n_ev, (ti[e], gi[e]), 1.0)
    at_risk = np.cumsum(n_all[::-1], axis=0)[::-1]
    out = logrank_from_counts(at_risk, n_ev)
    out["groups"] = labels
    return out


def censoring_survival_from_counts(at_risk: NDArray, n_events: NDArray, n_censored: NDArray) -> NDArray:
    """KM of the censoring distribution G just after each time, shape (m,).

    Events come before censorings at a tied time, so the censoring risk set
    at time i is ``at_risk - n_events`` (scikit-survival's
    ``kaplan_meier_estimator(reverse=True)``).
    """
    r = np.asarray(at_risk, dtype=float) - np.asarray(n_events, dtype=float)
    c = np.asarray(n_censored, dtype=float)
    factor = np.where(r > 0, 1.0 - np.divide(c, r, out=np.zeros_like(c), where=r > 0), 1.0)
    return np.cumprod(factor)


def weighted_auc_from_counts(case_weight: NDArray, control_count: NDArray) -> float:
    """AUC of weighted cases against controls over ordered score levels.

    case_weight, control_count : shape (m,), per ascending score level. A
    case beats the controls at lower levels and ties (1/2) at its own level.
    """
    w = np.asarray(case_weight, dtype=float)
    c = np.asarray(control_count, dtype=float)
    below = np.cumsum(c) - c
    return float(np.dot(w, below + 0.5 * c) / (w.sum() * c.sum()))


def time_dependent_auc(times: ArrayLike, events: ArrayLike, scores: ArrayLike, horizon: float = 24.0) -> dict:
    """Cumulative/dynamic AUC at ``horizon`` months with IPCW (Uno 2007; Hung & Chiang 2010).

    Cases: recurrence observed at ``T <= horizon``, weighted by 1 / G(T), G the
    KM of censoring of the same patients (:func:`censoring_survival_from_counts`).
    Controls: ``T > horizon`` (weight 1 / G(horizon), a constant that cancels).
    AUC = sum_i w_i * #{controls below s_i, ties 1/2} / (sum_i w_i * n_controls),
    as ``sksurv.metrics.cumulative_dynamic_auc`` with the same data for
    training and test.

    Returns dict with auc, n_cases, n_controls.
    Raises ValueError without cases or controls (e.g. all censored before
    the horizon) or when G reaches 0 before a case.
    """
    t, e = _survival_arrays(times, events)
    s = _as_1d_float(scores, "scores")
    _check_same_length(times=t, scores=s)
    if not np.isfinite(horizon) or horizon <= 0:
        raise ValueError(f"horizon must be a positive number of months, got {horizon}")
    values, at_risk, d, c = _counts_by_time(t, e)
    g = censoring_survival_from_counts(at_risk, d, c)
    g_at = g[np.searchsorted(values, t)]
    case = e & (t <= horizon)
    control = t > horizon
    if not case.any() or not control.any():
        raise ValueError(f"time-dependent AUC at {horizon} months needs cases and controls "
                         f"(n_cases={int(case.sum())}, n_controls={int(control.sum())})")
    if (g_at[case] <= 0).any():
        raise ValueError("the censoring survival reaches 0 before a case; IPCW weights are undefined")
    levels, li = np.unique(s, return_inverse=True)
    w = np.bincount(li[case], weights=1.0 / g_at[case], minlength=levels.size)
    ctrl = np.bincount(li[control], minlength=levels.size)
    return {"auc": weighted_auc_from_counts(w, ctrl), "n_cases": int(case.sum()), "n_controls": int(control.sum())}
