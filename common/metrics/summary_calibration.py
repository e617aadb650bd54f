"""Calibration-type figures from the probability table (``prob_*``) of :mod:`common.metrics.summaries`.

Brier score, calibration curve, logistic recalibration (intercept, slope,
calibration-in-the-large), Hosmer-Lemeshow test and net benefit: each is the
per-patient figure of :mod:`common.metrics.calibration` on the rows the
table counts (a distinct risk stands for as many patients as it counts), so
a pooled table gives the pooled figure for any distribution of risks, even
squeezed near 0. The one figure a table cannot always give is the
rank-grouped Hosmer-Lemeshow test when tied risks of both outcomes straddle
a group border (the per-patient rule splits them by row order): it is
refused with the number of patients concerned.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from hccfed.common.metrics.calibration import (
    calibration_curve_from_counts,
    fit_logistic_recalibration,
    hosmer_lemeshow_from_groups,
    net_benefit_from_counts,
    quantile_group_index,
    rank_group_index,
)
from hccfed.common.metrics.clinical import at_or_above, logit
from hccfed.common.metrics.summary_discrimination import _require_both, class_counts

__all__ = [
    "brier_from_summary",
    "calibration_curve_from_summary",
    "calibration_intercept_slope_from_summary",
    "hosmer_lemeshow_from_summary",
    "net_benefit_from_summary",
]


def _table(m: dict):
    value, pos, neg = class_counts(m, "prob")
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    if n_pos + n_neg == 0:
        raise ValueError("no patient with a known label in the summary")
    return value, pos, neg, n_pos, n_neg


def brier_from_summary(m: dict) -> float:
    """Mean squared difference between predicted risk and outcome: ``sklearn.metrics.brier_score_loss``."""
    p, pos, neg, n_pos, n_neg = _table(m)
    return float((np.dot(pos, (1.0 - p) ** 2) + np.dot(neg, p**2)) / (n_pos + n_neg))


def calibration_curve_from_summary(m: dict, n_bins: int = 10) -> dict:
    """Reliability curve on ``n_bins`` equal-width bins of [0, 1] (bin k: edges[k] < p <= edges[k+1])."""
    if not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    p, pos, neg, _, _ = _table(m)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.searchsorted(edges[1:-1], p, side="left")
    count = (pos + neg).astype(float)
    return calibration_curve_from_counts(edges, np.bincount(idx, weights=count, minlength=n_bins),
                                         np.bincount(idx, weights=count * p, minlength=n_bins),
                                         np.bincount(idx, weights=pos.astype(float), minlength=n_bins))


def calibration_intercept_slope_from_summary(m: dict) -> dict[str, float]:
    """Logistic recalibration ``logit P(y=1) = a + b logit(p)``: the same likelihood as per patient.

    Each distinct risk enters once, weighted by its patients (and its
    positives): :func:`common.metrics.calibration.calibration_intercept_slope`.
    """
    p, pos, neg, n_pos, n_neg = _table(m)
    _require_both(n_pos, n_neg, "the calibration slope")
    x, yw, nw = logit(p), pos.astype(float), (pos + neg).astype(float)
    a, b = fit_logistic_recalibration(x, yw, nw)
    citl, _ = fit_logistic_recalibration(x, yw, nw, fix_slope=True)
    return {"intercept": a, "slope": b, "citl": citl}


def hosmer_lemeshow_from_summary(m: dict, n_groups: int = 10, grouping: str = "quantile") -> dict:
    """Hosmer-Lemeshow test, as :func:`common.metrics.calibration.hosmer_lemeshow` on the rows.

    ``"quantile"``: groups cut at the type-7 quantiles of the risks, ties
    together (blorr; R's ResourceSelection ``hoslem.test``). ``"rank"``:
    ceil(rank / n * g) (UtilStat); ValueError when tied risks of both
    outcomes straddle a group border, since the rows' order would decide.
    """
    if not isinstance(n_groups, (int, np.integer)) or n_groups < 3:
        raise ValueError(f"n_groups must be an integer >= 3, got {n_groups!r}")
    p, pos, neg, n_pos, n_neg = _table(m)
    count = pos + neg
    if grouping == "quantile":
        q = np.quantile(np.repeat(p, count), np.linspace(0.0, 1.0, n_groups + 1))
        group = quantile_group_index(p, q)
        n = np.bincount(group, weights=count.astype(float), minlength=n_groups)
        o = np.bincount(group, weights=pos.astype(float), minlength=n_groups)
        e = np.bincount(group, weights=count * p, minlength=n_groups)
        return hosmer_lemeshow_from_groups(n, o, e, n_groups)
    if grouping != "rank":
        raise ValueError(f"grouping must be 'quantile' or 'rank', got {grouping!r}")
    of_rank = rank_group_index(n_pos + n_neg, n_groups)
    row = np.repeat(np.arange(p.size), count)
    last = np.cumsum(count) - 1
    split = (of_rank[last - count + 1] != of_rank[last]) & (pos > 0) & (neg > 0)
    if split.any():
        raise ValueError(f"the rank-grouped Hosmer-Lemeshow test is not defined by the summary: "
                         f"{int(count[split].sum())} patients share {int(split.sum())} risk value(s) across a "
                         f"group border with both outcomes, and only their row order would split them; "
                         f"use grouping='quantile'")
    n = np.bincount(of_rank, minlength=n_groups).astype(float)
    o = np.bincount(of_rank, weights=(pos / count)[row], minlength=n_groups)
    e = np.bincount(of_rank, weights=p[row], minlength=n_groups)
    return hosmer_lemeshow_from_groups(n, o, e, n_groups)


def net_benefit_from_summary(m: dict, thresholds: ArrayLike) -> dict:
    """Decision-curve net benefit: a patient is treated iff its risk >= p_t (thresholds in (0, 1))."""
    p, pos, neg, n_pos, n_neg = _table(m)
    pt = np.atleast_1d(np.asarray(thresholds, dtype=float))
    if pt.ndim != 1 or ((pt <= 0) | (pt >= 1)).any() or not np.isfinite(pt).all():
        raise ValueError("thresholds must be a 1-D array of probabilities in (0, 1)")
    treat = at_or_above(p[None, :], pt[:, None])
    return net_benefit_from_counts(treat @ pos.astype(float), treat @ neg.astype(float), float(n_pos + n_neg),
                                   float(n_pos), pt)
