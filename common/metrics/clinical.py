"""Threshold metrics and the paired DeLong test on per-patient arrays: the pooled reference.

Paired DeLong test of two correlated AUCs, the confusion table at a threshold
and Youden's threshold. Calibration-type figures (Brier, calibration curve,
intercept and slope, Hosmer-Lemeshow, net benefit) are in
:mod:`common.metrics.calibration`. The summary forms in
:mod:`common.metrics.summary_discrimination` and :mod:`common.metrics.federated_delong`
are checked against these.

Conventions (as in :mod:`common.metrics.discrimination`):

- A HIGHER SCORE MEANS HIGHER RISK. Scores are logits or any risk score;
  probabilities are predicted risks in [0, 1] of the positive class.
- ``labels`` hold 1 (recurrence, positive) and 0 (no recurrence); callers
  drop the unknown label ``-1`` before calling (the summaries do that themselves).
- A patient is predicted positive (high risk) when ``score >= threshold``
  (or ``prob >= threshold``), up to a relative tolerance of 1e-9
  (:func:`at_or_above`), so that a threshold written to a JSON file and read
  back, or typed by hand from a printed value, classifies as intended.

All inputs are 1-D arrays of shape ``(n,)``.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import norm

from hccfed.common.metrics.discrimination import _as_1d_float, _as_binary, _check_same_length, _placements

__all__ = [
    "delong_paired_test",
    "delong_paired_test_from_moments",
    "threshold_metrics",
    "metrics_from_counts",
    "youden_threshold",
    "youden_from_sorted_counts",
    "logit",
    "at_or_above",
]

# Probabilities are clipped to [_P_EPS, 1 - _P_EPS] before the logit, so
# that a predicted 0 or 1 gives a large finite logit (+/- 27.6).
_P_EPS = 1e-12


def _binary_and_values(labels: ArrayLike, values: ArrayLike, name: str) -> tuple[NDArray, NDArray]:
    y = _as_binary(labels, "labels")
    v = _as_1d_float(values, name)
    _check_same_length(labels=y, **{name: v})
    if y.size == 0:
        raise ValueError("no patients: labels is empty")
    return y, v


def _check_both_classes(y: NDArray[np.bool_], what: str) -> None:
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        raise ValueError(f"{what} is undefined when only one class is present (n_pos={n_pos}, n_neg={y.size - n_pos})")


def logit(probs: ArrayLike) -> NDArray[np.float64]:
    """log(p / (1 - p)) with p clipped to [1e-12, 1 - 1e-12]; shape as ``probs``."""
    p = np.clip(np.asarray(probs, dtype=float), _P_EPS, 1.0 - _P_EPS)
    return np.log(p) - np.log1p(-p)


def at_or_above(values: ArrayLike, threshold: ArrayLike) -> NDArray[np.bool_]:
    """``values >= threshold - 1e-9 * max(1, |threshold|)`` (broadcasting); the positive-call rule."""
    t = np.asarray(threshold, dtype=float)
    return np.asarray(values, dtype=float) >= t - 1e-9 * np.maximum(1.0, np.abs(t))


# --------------------------------------------------------------- paired DeLong
def delong_paired_test_from_moments(
    n_pos: int, n_neg: int, auc: NDArray, s10: NDArray, s01: NDArray, i: int = 0, j: int = 1
) -> dict[str, float]:
    """Paired DeLong z-test of AUC_i - AUC_j from the placement covariances.

    Parameters
    ----------
    n_pos, n_neg : numbers of positives and negatives.
    auc : shape (k,), the AUCs of k models on the same patients.
    s10, s01 : shape (k, k), unbiased covariance matrices of the positives'
        placement values V10 and of the negatives' V01 across the models.
    i, j : the two models compared.

    Returns
    -------
    dict with auc_a, auc_b, diff (= auc_a - auc_b), se (of the difference),
    z, p_value (two-sided), var_a, var_b, cov_ab.
    """
    cov = np.asarray(s10, dtype=float) / n_pos + np.asarray(s01, dtype=float) / n_neg
    var_diff = cov[i, i] + cov[j, j] - 2.0 * cov[i, j]
    diff = float(auc[i] - auc[j])
    se = float(np.sqrt(max(var_diff, 0.0)))
    if se == 0.0:
        z, p = (0.0, 1.0) if diff == 0.0 else (float(np.copysign(np.inf, diff)), 0.0)
    else:
        z = diff / se
        p = float(2.0 * norm.sf(abs(z)))
    return {"auc_a": float(auc[i]), "auc_b": float(auc[j]), "diff": diff, "se": se, "z": float(z),
            "p_value": p, "var_a": float(cov[i, i]), "var_b": float(cov[j, j]), "cov_ab": float(cov[i, j])}


def delong_paired_test(labels: ArrayLike, scores_a: ArrayLike, scores_b: ArrayLike) -> dict[str, float]:
    """DeLong's test that two correlated ROC AUCs (same patients) are equal.

    Parameters
    ----------
    labels : shape (n,), 1 = positive (recurrence), 0 = negative.
    scores_a, scores_b : shape (n,), two models' scores; higher = higher risk.

    Returns
    -------
    dict with auc_a, auc_b, diff, se, z = diff / se, p_value (two-sided),
    var_a, var_b, cov_ab (DeLong, DeLong & Clarke-Pearson 1988; unbiased
    placement covariances, as pROC's ``roc.test(method="delong")``).

    Raises
    ------
    ValueError on bad input, one class only, or fewer than 2 per class.
    """
    y = _as_binary(labels, "labels")
    a = _as_1d_float(scores_a, "scores_a")
    b = _as_1d_float(scores_b, "scores_b")
    _check_same_length(labels=y, scores_a=a, scores_b=b)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUC is undefined when only one class is present (n_pos={n_pos}, n_neg={n_neg})")
    if n_pos < 2 or n_neg < 2:
        raise ValueError(f"DeLong covariance needs at least 2 positives and 2 negatives (n_pos={n_pos}, n_neg={n_neg})")
    v10 = np.empty((2, n_pos))
    v01 = np.empty((2, n_neg))
    for k, s in enumerate((a, b)):
        v10[k], v01[k] = _placements(s[y], s[~y])
    auc = v10.mean(axis=1)
    return delong_paired_test_from_moments(n_pos, n_neg, auc, np.cov(v10), np.cov(v01))


# --------------------------------------------------------------- thresholds
def metrics_from_counts(tp: float, fp: float, tn: float, fn: float) -> dict[str, float]:
    """Accuracy, sensitivity, specificity, PPV, NPV from a confusion table.

    Returns a dict with the four counts and the five ratios; a ratio whose
    denominator is 0 is NaN (e.g. PPV when nobody is predicted positive).
    """
    def ratio(num: float, den: float) -> float:
        return float(num / den) if den > 0 else float("nan")

    return {"tp": float(tp), "fp": float(fp), "tn": float(tn), "fn": float(fn),
            "accuracy": ratio(tp + tn, tp + fp + tn + fn), "sensitivity": ratio(tp, tp + fn),
            "specificity": ratio(tn, tn + fp), "ppv": ratio(tp, tp + fp), "npv": ratio(tn, tn + fn)}


def threshold_metrics(labels: ArrayLike, scores: ArrayLike, threshold: float) -> dict[str, float]:
    """Confusion table and its ratios at a fixed threshold.

    Parameters
    ----------
    labels : shape (n,), 1 = positive, 0 = negative.
    scores : shape (n,); a patient is predicted positive iff ``score >= threshold``
        (see :func:`at_or_above`).
    threshold : on the scale of ``scores`` (e.g. chosen by
        :func:`youden_threshold` on another set and applied unchanged).

    Returns
    -------
    See :func:`metrics_from_counts`.
    """
    y, s = _binary_and_values(labels, scores, "scores")
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    pred = at_or_above(s, threshold)
    return metrics_from_counts(int((pred & y).sum()), int((pred & ~y).sum()),
                               int((~pred & ~y).sum()), int((~pred & y).sum()))


def youden_from_sorted_counts(values: NDArray, pos: NDArray, neg: NDArray) -> tuple[float, float]:
    """Best threshold over distinct ascending ``values`` with per-value class counts.

    Candidate thresholds are the values themselves (positive iff score >=
    value). J = TP/P - FP/N; ties in J go to the highest threshold.
    """
    n_pos, n_neg = pos.sum(), neg.sum()
    tp = np.cumsum(pos[::-1])[::-1]  # patients with value >= values[k]
    fp = np.cumsum(neg[::-1])[::-1]
    j = tp / n_pos - fp / n_neg
    best = len(j) - 1 - int(np.argmax(j[::-1]))
    return float(values[best]), float(j[best])


def youden_threshold(labels: ArrayLike, scores: ArrayLike) -> float:
    """Threshold maximizing Youden's J = sensitivity + specificity - 1.

    Candidates are the observed scores; a patient is positive iff
    ``score >= threshold``. Among equal J the highest threshold wins (fewest
    positives). Choose it on one set and pass it unchanged to
    :func:`threshold_metrics` on another.

    Raises ValueError when only one class is present.
    """
    y, s = _binary_and_values(labels, scores, "scores")
    _check_both_classes(y, "Youden's threshold")
    values, inverse = np.unique(s, return_inverse=True)
    pos = np.bincount(inverse[y], minlength=values.size)
    neg = np.bincount(inverse[~y], minlength=values.size)
    return youden_from_sorted_counts(values, pos, neg)[0]
