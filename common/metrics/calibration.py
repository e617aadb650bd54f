"""Calibration-type figures of predicted risks on per-patient arrays: the pooled reference.

Brier score, the binned calibration curve, the logistic recalibration
(intercept, slope, calibration-in-the-large), the Hosmer-Lemeshow test and
the net benefit of decision curves. The summary forms in
:mod:`common.metrics.summary_calibration` are checked against these.

``labels`` hold 1 (positive) and 0 (negative); ``probs`` are predicted risks
in [0, 1] of the positive class; a patient is treated (or put in a higher
risk group) when ``prob >= threshold`` (:func:`common.metrics.clinical.at_or_above`).
All inputs are 1-D arrays of shape ``(n,)``.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import chi2

from hccfed.common.metrics.clinical import _binary_and_values, _check_both_classes, at_or_above, logit
from hccfed.common.metrics.discrimination import _as_1d_float

__all__ = [
    "brier_score",
    "calibration_curve",
    "calibration_curve_from_counts",
    "calibration_intercept_slope",
    "fit_logistic_recalibration",
    "hosmer_lemeshow",
    "hosmer_lemeshow_from_groups",
    "quantile_group_index",
    "rank_group_index",
    "net_benefit",
    "net_benefit_from_counts",
]


def _as_probs(probs: ArrayLike) -> NDArray[np.float64]:
    p = _as_1d_float(probs, "probs")
    if ((p < 0) | (p > 1)).any():
        raise ValueError("probs must lie in [0, 1]")
    return p


# --------------------------------------------------------------- calibration
def brier_score(labels: ArrayLike, probs: ArrayLike) -> float:
    """Mean squared difference between predicted risk and outcome, in [0, 1].

    labels : shape (n,), 0/1; probs : shape (n,), predicted risks in [0, 1].
    Equals ``sklearn.metrics.brier_score_loss``.
    """
    y, _ = _binary_and_values(labels, probs, "probs")
    p = _as_probs(probs)
    return float(np.mean((p - y) ** 2))


def calibration_curve(labels: ArrayLike, probs: ArrayLike, n_bins: int = 10) -> dict[str, NDArray]:
    """Binned reliability curve on ``n_bins`` equal-width bins of [0, 1].

    Bin k holds ``edges[k] < p <= edges[k+1]`` (the first bin also holds 0),
    as ``sklearn.calibration.calibration_curve(strategy="uniform")``.

    Returns
    -------
    dict of arrays of shape (n_bins,): bin_lower, bin_upper, count,
    mean_predicted and observed_rate (NaN for empty bins; sklearn drops them).
    """
    y, _ = _binary_and_values(labels, probs, "probs")
    p = _as_probs(probs)
    if not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.searchsorted(edges[1:-1], p, side="left")
    count = np.bincount(idx, minlength=n_bins).astype(float)
    sum_p = np.bincount(idx, weights=p, minlength=n_bins)
    sum_y = np.bincount(idx, weights=y.astype(float), minlength=n_bins)
    return calibration_curve_from_counts(edges, count, sum_p, sum_y)


def calibration_curve_from_counts(edges: NDArray, count: NDArray, sum_p: NDArray, sum_y: NDArray) -> dict[str, NDArray]:
    """The curve's dict from per-bin patients, sums of risks and positives (shape (n_bins,))."""
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.where(count > 0, sum_p / count, np.nan)
        rate = np.where(count > 0, sum_y / count, np.nan)
    return {"bin_lower": edges[:-1], "bin_upper": edges[1:], "count": count,
            "mean_predicted": mean_p, "observed_rate": rate}


def _check_not_separated(x: NDArray, yw: NDArray, nw: NDArray) -> None:
    """Raise when the classes are (quasi-)completely separated along ``x``: no finite slope exists.

    Values closer than 1e-6 (relative) count as tied, so the federated fit,
    whose pseudo-patients carry rounding noise of that order, agrees with the
    per-patient one on which data sets have no estimate.
    """
    pos, neg = x[yw > 0], x[(nw - yw) > 0]
    if pos.size == 0 or neg.size == 0:
        raise ValueError("logistic recalibration needs both classes")
    tol = 1e-6 * max(1.0, float(np.max(np.abs(x))))
    if pos.min() >= neg.max() - tol or pos.max() <= neg.min() + tol:
        raise ValueError("logistic recalibration has no finite slope: the classes are perfectly separated "
                         "by the predicted risk (complete or quasi-complete separation)")


def fit_logistic_recalibration(
    x: NDArray, y_weight: NDArray, n_weight: NDArray, fix_slope: bool = False, max_iter: int = 100
) -> tuple[float, float]:
    """Weighted logistic regression of the outcome on ``x`` (Newton-Raphson, steps halved until the
    log-likelihood does not fall, so a start far from the optimum does not overshoot).

    Parameters
    ----------
    x : shape (m,), covariate values (logits of the predicted risks).
    y_weight : shape (m,), number of positives at each value.
    n_weight : shape (m,), number of patients at each value (>= y_weight).
    fix_slope : if True, fit only the intercept with ``x`` as an offset
        (slope fixed to 1): calibration-in-the-large.

    Returns
    -------
    (intercept, slope). Raises ValueError when it does not converge
    (e.g. perfect separation).
    """
    x, yw, nw = (np.asarray(a, dtype=float) for a in (x, y_weight, n_weight))
    if not fix_slope:
        _check_not_separated(x, yw, nw)
    beta = np.zeros(2) if not fix_slope else np.array([0.0, 1.0])
    design = np.column_stack([np.ones_like(x), x])

    def loglik(b: NDArray) -> float:
        eta = design @ b
        return float(np.dot(yw, eta) - np.dot(nw, np.logaddexp(0.0, eta)))

    for _ in range(max_iter):
        eta = design @ beta
        mu = 0.5 * (1.0 + np.tanh(0.5 * eta))  # stable sigmoid
        grad = design.T @ (yw - nw * mu)
        info = (design * (nw * mu * (1.0 - mu))[:, None]).T @ design
        if fix_slope:
            step = np.array([grad[0] / info[0, 0], 0.0]) if info[0, 0] > 0 else np.array([np.inf, 0.0])
        else:
            try:
                step = np.linalg.solve(info, grad)
            except np.linalg.LinAlgError:
                step = np.array([np.inf, np.inf])
        if not np.isfinite(step).all():
            break
        current = loglik(beta)
        for _ in range(60):
            if loglik(beta + step) >= current - 1e-12 * max(1.0, abs(current)):
                break
            step = step / 2.0
        beta = beta + step
        if np.max(np.abs(step)) < 1e-10:
            return float(beta[0]), float(beta[1])
    raise ValueError("logistic recalibration did not converge (perfect separation or one class only?)")


def calibration_intercept_slope(labels: ArrayLike, probs: ArrayLike) -> dict[str, float]:
    """Logistic recalibration of predicted risks (Cox 1958; Van Calster 2016).

    Fits ``logit P(y=1) = a + b * logit(p)`` by maximum likelihood (no
    penalty): ``slope`` = b (1 is ideal; < 1 means too extreme predictions)
    and ``intercept`` = a of that joint fit. ``citl`` is the
    calibration-in-the-large: the intercept with ``logit(p)`` as an offset
    (slope fixed at 1; 0 is ideal, > 0 means risks too low on average).
    Probabilities are clipped to [1e-12, 1 - 1e-12] before the logit.

    Raises ValueError for one class only or when the fit does not converge.
    """
    y, _ = _binary_and_values(labels, probs, "probs")
    p = _as_probs(probs)
    _check_both_classes(y, "the calibration slope")
    x = logit(p)
    ones = np.ones_like(x)
    a, b = fit_logistic_recalibration(x, y.astype(float), ones)
    citl, _ = fit_logistic_recalibration(x, y.astype(float), ones, fix_slope=True)
    return {"intercept": a, "slope": b, "citl": citl}


# --------------------------------------------------------------- Hosmer-Lemeshow
def quantile_group_index(values: NDArray, quantiles: NDArray) -> NDArray[np.intp]:
    """Group 0..g-1 of each value given g+1 quantile cut points.

    Group 0 holds ``values <= q[1]``, group k holds ``q[k] < values <= q[k+1]``
    (R's ``cut(..., include.lowest=TRUE)``, blorr's grouping). Tied values
    always share a group.
    """
    g = len(quantiles) - 1
    return (np.clip(np.searchsorted(quantiles, values, side="left"), 1, g) - 1).astype(np.intp)


def rank_group_index(n: int, n_groups: int) -> NDArray[np.intp]:
    """Group 0..g-1 of the patients of ranks 1..n (ascending risk): ``ceil(rank / n * g) - 1``.

    UtilStat's equal-size groups; returns shape (n,).
    """
    return np.ceil(np.arange(1, n + 1) / n * n_groups).astype(np.intp) - 1


def hosmer_lemeshow_from_groups(n: NDArray, observed: NDArray, expected: NDArray, n_groups: int) -> dict:
    """Hosmer-Lemeshow statistic from per-group totals.

    n, observed, expected : shape (g,): patients, observed positives and the
    sum of predicted risks per group. Empty groups are dropped. The statistic
    is sum (O - E)^2 / E + ((n - O) - (n - E))^2 / (n - E) over groups, with
    ``n_groups - 2`` degrees of freedom (terms with E = 0 or E = n count 0
    when O equals E, and make the statistic infinite otherwise).
    """
    n, o, e = (np.asarray(a, dtype=float) for a in (n, observed, expected))
    keep = n > 0
    n, o, e = n[keep], o[keep], e[keep]
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = np.where(e > 0, (o - e) ** 2 / e, np.where(o == e, 0.0, np.inf))
        t0 = np.where(n - e > 0, (o - e) ** 2 / (n - e), np.where(o == e, 0.0, np.inf))
    stat = float(np.sum(t1 + t0))
    df = n_groups - 2
    return {"chi2": stat, "df": df, "p_value": float(chi2.sf(stat, df)),
            "n": n, "observed": o, "expected": e}


def hosmer_lemeshow(labels: ArrayLike, probs: ArrayLike, n_groups: int = 10, grouping: str = "quantile") -> dict:
    """Hosmer-Lemeshow goodness-of-fit test on groups of predicted risk.

    Parameters
    ----------
    labels : shape (n,), 0/1.  probs : shape (n,), predicted risks in [0, 1].
    n_groups : g, the number of risk groups (deciles: 10); df = g - 2.
    grouping : ``"quantile"`` (default): cut at the type-7 quantiles of the
        risks, ties kept together (blorr, R ``cut``); the federated form
        reproduces it. ``"rank"``: sort (stably) and cut the ranks into g
        equal-size groups, ``ceil(rank / n * g)`` (UtilStat's
        ``hosmerLemeshowTest``); tied risks at a group border are split by
        row order, so the summary form refuses a border tie of mixed outcomes.

    Returns
    -------
    dict with chi2, df, p_value and per-group arrays n, observed (positives),
    expected (sum of risks).
    """
    y, _ = _binary_and_values(labels, probs, "probs")
    p = _as_probs(probs)
    if not isinstance(n_groups, (int, np.integer)) or n_groups < 3:
        raise ValueError(f"n_groups must be an integer >= 3, got {n_groups!r}")
    if grouping == "quantile":
        group = quantile_group_index(p, np.quantile(p, np.linspace(0.0, 1.0, n_groups + 1)))
    elif grouping == "rank":
        order = np.argsort(p, kind="stable")
        group = np.empty(p.size, dtype=np.intp)
        group[order] = rank_group_index(p.size, n_groups)
    else:
        raise ValueError(f"grouping must be 'quantile' or 'rank', got {grouping!r}")
    n = np.bincount(group, minlength=n_groups)
    o = np.bincount(group, weights=y.astype(float), minlength=n_groups)
    e = np.bincount(group, weights=p, minlength=n_groups)
    return hosmer_lemeshow_from_groups(n, o, e, n_groups)


# --------------------------------------------------------------- decision curves
def net_benefit_from_counts(tp: NDArray, fp: NDArray, n: float, n_pos: float, thresholds: NDArray) -> dict:
    """Net benefit at each threshold from true/false positive counts (shape (m,))."""
    pt = np.asarray(thresholds, dtype=float)
    odds = pt / (1.0 - pt)
    prevalence = n_pos / n
    return {"thresholds": pt, "model": np.asarray(tp) / n - np.asarray(fp) / n * odds,
            "treat_all": prevalence - (1.0 - prevalence) * odds, "treat_none": np.zeros_like(pt)}


def net_benefit(labels: ArrayLike, probs: ArrayLike, thresholds: ArrayLike) -> dict[str, NDArray]:
    """Decision-curve net benefit (Vickers & Elkin 2006).

    Parameters
    ----------
    labels : shape (n,), 0/1.  probs : shape (n,), predicted risks.
    thresholds : shape (m,), threshold probabilities p_t in (0, 1); a patient
        is treated iff ``prob >= p_t``.

    Returns
    -------
    dict of arrays of shape (m,): thresholds, model = TP/n - FP/n * p_t/(1-p_t),
    treat_all = prevalence - (1 - prevalence) * p_t/(1-p_t), treat_none = 0.
    """
    y, _ = _binary_and_values(labels, probs, "probs")
    p = _as_probs(probs)
    pt = np.atleast_1d(np.asarray(thresholds, dtype=float))
    if pt.ndim != 1 or ((pt <= 0) | (pt >= 1)).any() or not np.isfinite(pt).all():
        raise ValueError("thresholds must be a 1-D array of probabilities in (0, 1)")
    treat = at_or_above(p[None, :], pt[:, None])
    tp = (treat & y[None, :]).sum(axis=1)
    fp = (treat & ~y[None, :]).sum(axis=1)
    return net_benefit_from_counts(tp, fp, float(y.size), float(y.sum()), pt)
