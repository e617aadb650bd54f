"""Discrimination metrics on per-patient arrays: the pooled reference.

These are the exact figures one would compute if all patient rows sat in one
place. The federated form in :mod:`common.metrics.summaries` is checked
against them.

Sign convention (everywhere in this package): a HIGHER SCORE MEANS HIGHER RISK
of recurrence. For the AUC, positives (``label == 1``, recurrence) should have
higher scores than negatives. For the C-index, the patient who recurs earlier
should have the higher score. Note that ``lifelines.utils.concordance_index``
uses the opposite convention (higher = longer survival), so
``harrell_c_index(t, e, s) == lifelines.utils.concordance_index(t, -s, e)``.

All inputs are 1-D array-likes of shape ``(n,)``.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import norm

__all__ = [
    "roc_auc",
    "delong_ci",
    "concordance_counts",
    "harrell_c_index",
]

# Rows of events processed at once in the vectorised pair count; bounds the
# temporary boolean matrices at _CHUNK * n elements.
_CHUNK = 1024


def _as_1d_float(x: ArrayLike, name: str) -> NDArray[np.float64]:
    """Return ``x`` as a float64 array of shape ``(n,)``; ValueError if not 1-D or non-finite."""
    arr = np.asarray(x, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-dimensional with shape (n,), got shape {arr.shape}")
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains infinite values")
    return arr


def _as_binary(x: ArrayLike, name: str) -> NDArray[np.bool_]:
    """Return a 0/1 array of shape ``(n,)`` as bool; ValueError for any other value."""
    arr = _as_1d_float(x, name)
    if not np.isin(arr, (0.0, 1.0)).all():
        bad = np.unique(arr[~np.isin(arr, (0.0, 1.0))])[:5]
        raise ValueError(f"{name} must contain only 0 and 1, found e.g. {bad.tolist()}")
    return arr.astype(bool)


def _check_same_length(**arrays: NDArray) -> None:
    lengths = {name: a.shape[0] for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"mismatched lengths: {lengths}")


def _split_classes(labels: ArrayLike, scores: ArrayLike) -> tuple[NDArray, NDArray]:
    """Validate and return (positive scores, negative scores)."""
    y = _as_binary(labels, "labels")
    s = _as_1d_float(scores, "scores")
    _check_same_length(labels=y, scores=s)
    pos, neg = s[y], s[~y]
    if pos.size == 0 or neg.size == 0:
        raise ValueError(
            "AUC is undefined when only one class is present "
            f"(n_pos={pos.size}, n_neg={neg.size})"
        )
    return pos, neg


def _placements(pos: NDArray, neg: NDArray) -> tuple[NDArray, NDArray]:
    """DeLong placement values.

    Returns ``(v10, v01)`` of shapes ``(n_pos,)`` and ``(n_neg,)``:
    ``v10[i]`` = P(neg < pos_i) + 1/2 P(neg == pos_i) over the negatives,
    ``v01[j]`` = P(pos > neg_j) + 1/2 P(pos == neg_j) over the positives.
    O(n log n) via sorting (equivalent to Sun & Xu's mid-rank form).
    """
    neg_sorted, pos_sorted = np.sort(neg), np.sort(pos)
    below = np.searchsorted(neg_sorted, pos, side="left")
    below_or_eq = np.searchsorted(neg_sorted, pos, side="right")
    v10 = (below + below_or_eq) / (2.0 * neg.size)
    above = pos.size - np.searchsorted(pos_sorted, neg, side="right")
    above_or_eq = pos.size - np.searchsorted(pos_sorted, neg, side="left")
    v01 = (above + above_or_eq) / (2.0 * pos.size)
    return v10, v01


def roc_auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve (Mann-Whitney form; score ties count 1/2).

    Parameters
    ----------
    labels : shape (n,), values in {0, 1}; 1 = recurrence (positive class).
    scores : shape (n,), finite; higher = higher risk.

    Returns
    -------
    P(score_pos > score_neg) + 1/2 P(score_pos == score_neg).

    Raises
    ------
    ValueError on mismatched lengths, NaN/inf scores, labels outside {0, 1},
    or when only one class is present (AUC undefined).
    """
    pos, neg = _split_classes(labels, scores)
    v10, _ = _placements(pos, neg)
    return float(v10.mean())


def delong_ci(
    labels: ArrayLike, scores: ArrayLike, alpha: float = 0.05
) -> tuple[float, float, float, float]:
    """AUC with DeLong's standard error and a Wald confidence interval.

    Parameters
    ----------
    labels : shape (n,), values in {0, 1}; 1 = positive (recurrence).
    scores : shape (n,), finite; higher = higher risk.
    alpha : two-sided level; the interval is ``auc +/- z_{1-alpha/2} * se``
        clipped to [0, 1].

    Returns
    -------
    (auc, se, lower, upper). The variance is
    ``var(V10)/n_pos + var(V01)/n_neg`` with the placement values V10, V01
    (DeLong, DeLong & Clarke-Pearson 1988) and unbiased (n-1) variances.

    Raises
    ------
    ValueError as :func:`roc_auc`, and when either class has fewer than 2
    members (the variance is then undefined) or alpha is not in (0, 1).
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    pos, neg = _split_classes(labels, scores)
    if pos.size < 2 or neg.size < 2:
        raise ValueError(
            "DeLong variance needs at least 2 positives and 2 negatives "
            f"(n_pos={pos.size}, n_neg={neg.size})"
        )
    v10, v01 = _placements(pos, neg)
    auc = float(v10.mean())
    var = v10.var(ddof=1) / pos.size + v01.var(ddof=1) / neg.size
    se = float(np.sqrt(var))
    z = float(norm.ppf(1.0 - alpha / 2.0))
    return auc, se, max(0.0, auc - z * se), min(1.0, auc + z * se)


def concordance_counts(
    times: ArrayLike, events: ArrayLike, scores: ArrayLike
) -> tuple[float, float]:
    """Harrell's concordance numerator and number of comparable pairs.

    Parameters
    ----------
    times : shape (n,), finite follow-up times (any unit, any origin).
    events : shape (n,), 1 = recurrence observed at ``times``, 0 = censored.
    scores : shape (n,), finite; higher = higher risk.

    Pair rules (identical to lifelines' ``concordance_index``):
    a pair (i, j) is comparable iff ``events[i] == 1`` and either
    ``times[i] < times[j]``, or ``times[i] == times[j]`` and ``events[j] == 0``
    (at tied times the event is taken to come first; two events at the same
    time, or two censored patients, are never comparable). It is concordant
    when ``scores[i] > scores[j]`` and counts 1/2 when the scores tie.

    Returns
    -------
    (numerator, comparable_pairs): numerator = concordant + ties / 2.

    Cost: O(n^2) time, vectorised in chunks of events (O(chunk * n) memory);
    a few thousand patients take milliseconds.
    """
    t = _as_1d_float(times, "times")
    e = _as_binary(events, "events")
    s = _as_1d_float(scores, "scores")
    _check_same_length(times=t, events=e, scores=s)
    ev_idx = np.flatnonzero(e)
    twice_num = 0  # 2 * concordant + ties, kept integer for exactness
    pairs = 0
    for start in range(0, ev_idx.size, _CHUNK):
        idx = ev_idx[start : start + _CHUNK]
        ti, si = t[idx, None], s[idx, None]
        comparable = (t[None, :] > ti) | ((t[None, :] == ti) & ~e[None, :])
        higher = comparable & (si > s[None, :])
        tied = comparable & (si == s[None, :])
        pairs += int(comparable.sum())
        twice_num += 2 * int(higher.sum()) + int(tied.sum())
    return twice_num / 2.0, float(pairs)


def harrell_c_index(times: ArrayLike, events: ArrayLike, scores: ArrayLike) -> float:
    """Harrell's C-index (higher score = higher risk = earlier recurrence).

    Parameters
    ----------
    times : shape (n,), follow-up times.
    events : shape (n,), 1 = recurrence observed, 0 = censored.
    scores : shape (n,), higher = higher risk.

    Returns
    -------
    numerator / comparable_pairs from :func:`concordance_counts`; equals
    ``lifelines.utils.concordance_index(times, -scores, events)``.

    Raises
    ------
    ValueError on bad input or when there is no comparable pair (e.g. all
    patients censored).
    """
    num, pairs = concordance_counts(times, events, scores)
    if pairs == 0:
        raise ValueError("C-index is undefined: no comparable pairs (are all patients censored?)")
    return num / pairs
