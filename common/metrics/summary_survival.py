"""Survival figures from the survival table (``cidx_*``) of :mod:`common.metrics.summaries`.

Kaplan-Meier curves of risk groups, their log-rank test and the
cumulative/dynamic time-dependent AUC with IPCW: each is the per-patient
figure of :mod:`common.metrics.survival_clinical` on the rows the table
counts, through the same ``*_from_counts`` formulas, so a pooled table gives
the pooled figure. Risk groups follow :func:`common.metrics.survival_clinical.risk_groups`:
a patient is in group k when k cutpoints are <= its score.
Sign convention: a HIGHER SCORE MEANS HIGHER RISK; times in months.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from hccfed.common.metrics.survival_clinical import (
    censoring_survival_from_counts,
    kaplan_meier_from_counts,
    logrank_from_counts,
    weighted_auc_from_counts,
)

__all__ = [
    "score_quantile_cutpoints",
    "kaplan_meier_by_group_from_summary",
    "logrank_from_summary",
    "time_dependent_auc_from_summary",
]


def _table(m: dict) -> tuple[NDArray, NDArray, NDArray, NDArray]:
    t, s = np.asarray(m["cidx_time"], dtype=float), np.asarray(m["cidx_score"], dtype=float)
    ev, al = np.asarray(m["cidx_event"], dtype=np.int64), np.asarray(m["cidx_all"], dtype=np.int64)
    if al.sum() == 0:
        raise ValueError("no patient in the survival table")
    return t, s, ev, al


def score_quantile_cutpoints(m: dict, quantiles: ArrayLike = (0.5,)) -> NDArray[np.float64]:
    """Cutpoints at the type-7 quantiles of all patients' scores (default the median: two groups).

    Equal to ``np.quantile`` of the pooled rows' scores; duplicates dropped,
    so the result is strictly increasing.
    """
    _, s, _, al = _table(m)
    q = np.atleast_1d(np.asarray(quantiles, dtype=float))
    if ((q <= 0) | (q >= 1)).any():
        raise ValueError("quantiles must lie in (0, 1)")
    return np.unique(np.quantile(np.repeat(s, al), q))


def _groups(s: NDArray, cutpoints: ArrayLike) -> tuple[NDArray[np.intp], int]:
    c = np.atleast_1d(np.asarray(cutpoints, dtype=float))
    if c.ndim != 1 or c.size == 0 or not np.isfinite(c).all() or (np.diff(c) <= 0).any():
        raise ValueError("cutpoints must be a non-empty, strictly increasing 1-D array of finite values")
    return np.searchsorted(c, s, side="right").astype(np.intp), c.size + 1


def _by_time_and_group(m: dict, cutpoints: ArrayLike) -> tuple[NDArray, NDArray, NDArray]:
    """(distinct times, events, patients), the last two of shape (times, groups)."""
    t, s, ev, al = _table(m)
    group, k = _groups(s, cutpoints)
    times, ti = np.unique(t, return_inverse=True)
    events, everyone = np.zeros((times.size, k)), np.zeros((times.size, k))
    np.add.at(events, (ti, group), ev)
    np.add.at(everyone, (ti, group), al)
    return times, events, everyone


def kaplan_meier_by_group_from_summary(m: dict, cutpoints: ArrayLike) -> list[dict]:
    """KM curve of each risk group (0 = lowest risk), one dict per group.

    Each dict: times (the group's distinct follow-up times, months),
    n_at_risk, n_events, n_censored, survival (just after each time), n;
    as :func:`common.metrics.survival_clinical.kaplan_meier` of the group's rows.
    """
    times, events, everyone = _by_time_and_group(m, cutpoints)
    curves = []
    for g in range(events.shape[1]):
        occupied = everyone[:, g] > 0
        at_risk = np.cumsum(everyone[::-1, g])[::-1]
        surv = kaplan_meier_from_counts(times, at_risk, events[:, g])
        curves.append({"times": times[occupied], "n_at_risk": at_risk[occupied], "n_events": events[occupied, g],
                       "n_censored": (everyone - events)[occupied, g], "survival": surv[occupied],
                       "n": float(everyone[:, g].sum())})
    return curves


def logrank_from_summary(m: dict, cutpoints: ArrayLike) -> dict:
    """Log-rank test across the risk groups: ``lifelines.statistics.multivariate_logrank_test`` on the rows."""
    _, events, everyone = _by_time_and_group(m, cutpoints)
    return logrank_from_counts(np.cumsum(everyone[::-1], axis=0)[::-1], events)


def time_dependent_auc_from_summary(m: dict, horizon: float = 24.0) -> dict:
    """Cumulative/dynamic AUC at ``horizon`` months with IPCW (Uno 2007), from the survival table.

    Cases: events at times <= horizon, weighted by 1 / G(time), G the KM of
    censoring of all patients (events before censorings at a tied time);
    controls: patients with times > horizon. As
    :func:`common.metrics.survival_clinical.time_dependent_auc` on the rows.
    """
    if not np.isfinite(horizon) or horizon <= 0:
        raise ValueError(f"horizon must be a positive number of months, got {horizon}")
    t, s, ev, al = _table(m)
    times, ti = np.unique(t, return_inverse=True)
    n_all = np.bincount(ti, weights=al, minlength=times.size)
    d = np.bincount(ti, weights=ev, minlength=times.size)
    g = censoring_survival_from_counts(np.cumsum(n_all[::-1])[::-1], d, n_all - d)[ti]
    case, control = (t <= horizon) & (ev > 0), t > horizon
    n_cases, n_controls = int(ev[case].sum()), int(al[control].sum())
    if n_cases == 0 or n_controls == 0:
        raise ValueError(f"time-dependent AUC at {horizon} months needs cases and controls "
                         f"(n_cases={n_cases}, n_controls={n_controls})")
    if (g[case] <= 0).any():
        raise ValueError("the censoring survival reaches 0 before a case; IPCW weights are undefined")
    levels, li = np.unique(s, return_inverse=True)
    w = np.bincount(li[case], weights=ev[case] / g[case], minlength=levels.size)
    controls = np.bincount(li[control], weights=al[control], minlength=levels.size)
    return {"auc": weighted_auc_from_counts(w, controls), "n_cases": n_cases, "n_controls": n_controls}
