"""Discrimination figures from the tables of :mod:`common.metrics.summaries`: exact for any score.

AUC with DeLong's variance and CI, the ROC curve, Youden's threshold and the
confusion table at a threshold come from the score table (``auc_*``);
Harrell's C-index from the survival table (``cidx_*``). Each is the
per-patient figure of :mod:`common.metrics.discrimination` /
:mod:`common.metrics.clinical` on the rows the table counts (the same
formula over distinct values weighted by their counts), so a pooled table
gives the pooled figure. Sign convention: a HIGHER SCORE MEANS HIGHER RISK.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy.stats import norm

from hccfed.common.metrics.clinical import at_or_above, metrics_from_counts, youden_from_sorted_counts

__all__ = [
    "class_counts",
    "placements_from_counts",
    "auc_from_summary",
    "roc_curve_from_summary",
    "youden_threshold_from_summary",
    "threshold_metrics_from_summary",
    "concordance_from_table",
    "cindex_from_summary",
]


def class_counts(m: dict, prefix: str = "auc") -> tuple[NDArray, NDArray, NDArray]:
    """(values, positives, negatives) of the ``auc`` (score) or ``prob`` table of a summary."""
    return (np.asarray(m[f"{prefix}_value"], dtype=float), np.asarray(m[f"{prefix}_pos"], dtype=np.int64),
            np.asarray(m[f"{prefix}_neg"], dtype=np.int64))


def _require_both(n_pos: int, n_neg: int, what: str) -> None:
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"{what} is undefined when only one class is present (n_pos={n_pos}, n_neg={n_neg})")


def placements_from_counts(pos: NDArray, neg: NDArray) -> tuple[NDArray, NDArray]:
    """DeLong placement values of each ascending score level, shapes (k,) and (k,).

    V10 (for the positives at a level): the fraction of negatives below it
    plus half of those at it; V01 (for the negatives): the fraction of
    positives above plus half of those at it.
    """
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    _require_both(n_pos, n_neg, "the AUC")
    v10 = (np.cumsum(neg) - neg + 0.5 * neg) / n_neg
    v01 = (n_pos - np.cumsum(pos) + 0.5 * pos) / n_pos
    return v10, v01


def auc_from_summary(m: dict, alpha: float = 0.05) -> dict[str, float | int]:
    """AUC (Mann-Whitney, ties 1/2) with DeLong's standard error and Wald CI, from the score table.

    var = var(V10) / n_pos + var(V01) / n_neg (unbiased variances over the
    patients, every patient of a level sharing its placement value): exactly
    :func:`common.metrics.discrimination.delong_ci` on the rows. CI = auc
    +/- z se, clipped to [0, 1]. Returns auc, se, ci_lower, ci_upper, n_pos,
    n_neg. Raises ValueError with one class, or fewer than 2 in a class.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    _, pos, neg = class_counts(m)
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    _require_both(n_pos, n_neg, "AUC")
    if n_pos < 2 or n_neg < 2:
        raise ValueError(f"DeLong variance needs at least 2 positives and 2 negatives (n_pos={n_pos}, n_neg={n_neg})")
    v10, v01 = placements_from_counts(pos, neg)
    auc = float(np.dot(pos, v10) / n_pos)
    s10 = float(np.dot(pos, (v10 - auc) ** 2) / (n_pos - 1))
    s01 = float(np.dot(neg, (v01 - auc) ** 2) / (n_neg - 1))
    se = float(np.sqrt(s10 / n_pos + s01 / n_neg))
    z = float(norm.ppf(1.0 - alpha / 2.0))
    return {"auc": auc, "se": se, "ci_lower": max(0.0, auc - z * se), "ci_upper": min(1.0, auc + z * se),
            "n_pos": n_pos, "n_neg": n_neg}


def roc_curve_from_summary(m: dict) -> dict[str, NDArray[np.float64]]:
    """The ROC curve: one point per distinct score, thresholds descending (positive iff score >= threshold).

    Starts at (0, 0) (threshold +inf) and ends at (1, 1); equals
    ``sklearn.metrics.roc_curve(..., drop_intermediate=False)`` on the rows,
    so its trapezoidal area is the AUC. Returns fpr, tpr, threshold (k + 1,).
    """
    value, pos, neg = class_counts(m)
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    _require_both(n_pos, n_neg, "ROC curve")
    return {"fpr": np.concatenate([[0.0], np.cumsum(neg[::-1]) / n_neg]),
            "tpr": np.concatenate([[0.0], np.cumsum(pos[::-1]) / n_pos]),
            "threshold": np.concatenate([[np.inf], value[::-1]])}


def youden_threshold_from_summary(m: dict) -> float:
    """Youden's threshold (max sensitivity + specificity - 1) over the distinct scores.

    As :func:`common.metrics.clinical.youden_threshold` on the rows: a
    patient is positive iff score >= threshold; ties in J go to the highest
    threshold. Choose it on one set of patients and apply it to another.
    """
    value, pos, neg = class_counts(m)
    _require_both(int(pos.sum()), int(neg.sum()), "Youden's threshold")
    return youden_from_sorted_counts(value, pos, neg)[0]


def threshold_metrics_from_summary(m: dict, threshold: float) -> dict[str, float]:
    """Confusion table and its ratios at ``threshold`` (score units; positive iff score >= threshold)."""
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    value, pos, neg = class_counts(m)
    if pos.sum() + neg.sum() == 0:
        raise ValueError("no patient with a known label in the summary")
    pred = at_or_above(value, threshold)
    return metrics_from_counts(int(pos[pred].sum()), int(neg[pred].sum()), int(neg[~pred].sum()),
                               int(pos[~pred].sum()))


def _prefix(tree: list[int], i: int) -> int:
    """Sum of the Fenwick tree's first i positions."""
    total = 0
    while i > 0:
        total += tree[i]
        i -= i & -i
    return total


def _add(tree: list[int], i: int, value: int) -> None:
    """Add ``value`` at position i (0-based) of the Fenwick tree."""
    i += 1
    while i < len(tree):
        tree[i] += value
        i += i & -i


def concordance_from_table(time: NDArray, score: NDArray, event: NDArray, all_: NDArray) -> tuple[int, int]:
    """(2 x concordant + tied, comparable pairs) of Harrell's C over a survival table.

    The pair rules of :func:`common.metrics.discrimination.concordance_counts`
    (lifelines'): an event is compared with every patient of a later time and
    with every censored patient of its own time. Rows must be ordered by time,
    then score. Times are walked from the latest; a Fenwick tree over the
    score ranks of the later patients counts those below and at each event's
    score: O(m log m) for m rows.
    """
    censored = np.asarray(all_, dtype=np.int64) - np.asarray(event, dtype=np.int64)
    _, rank = np.unique(np.asarray(score, dtype=float), return_inverse=True)
    tree = [0] * (int(rank.max(initial=-1)) + 2)
    cuts = np.flatnonzero(np.diff(np.asarray(time, dtype=float))) + 1
    starts, ends = np.concatenate([[0], cuts]), np.concatenate([cuts, [len(time)]])
    twice = pairs = later = 0
    for a, b in zip(starts[::-1].tolist(), ends[::-1].tolist()):
        ranks, events = rank[a:b].tolist(), np.asarray(event[a:b]).tolist()
        cens, everyone = censored[a:b].tolist(), np.asarray(all_[a:b]).tolist()
        same_time_censored = sum(cens)
        below_censored = 0  # censored patients of this time with a lower score (rows ascend by score)
        for r, ev, c in zip(ranks, events, cens):
            if ev:
                below = _prefix(tree, r)
                at = _prefix(tree, r + 1) - below
                twice += ev * (2 * (below + below_censored) + at + c)
                pairs += ev * (later + same_time_censored)
            below_censored += c
        for r, n in zip(ranks, everyone):
            _add(tree, r, n)
        later += sum(everyone)
    return twice, pairs


def cindex_from_summary(m: dict) -> dict[str, float | int]:
    """Harrell's C-index from the survival table: lifelines' ``concordance_index(t, -score, e)`` on the rows.

    Returns c_index, comparable_pairs, n, n_events. Raises ValueError when
    there is no comparable pair (e.g. all censored).
    """
    t, s = np.asarray(m["cidx_time"], dtype=float), np.asarray(m["cidx_score"], dtype=float)
    ev, al = np.asarray(m["cidx_event"], dtype=np.int64), np.asarray(m["cidx_all"], dtype=np.int64)
    twice, pairs = concordance_from_table(t, s, ev, al)
    if pairs == 0:
        raise ValueError("C-index is undefined: no comparable pairs (are all patients censored?)")
    return {"c_index": twice / (2.0 * pairs), "comparable_pairs": pairs, "n": int(al.sum()),
            "n_events": int(ev.sum())}
