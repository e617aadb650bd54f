"""Federated discrimination metrics: per-site histograms and server-side pooling.

Each site bins its own (label, score, time, event) rows into fixed-size count
arrays with :func:`site_summary`; the server adds the arrays of all sites with
:func:`pool_summaries` and computes the pooled AUC (with DeLong's CI) and
Harrell's C-index from the sums alone (:func:`auc_from_summary`,
:func:`cindex_from_summary`). No patient row leaves a site, and the size of a
summary does not depend on the number of patients.

Sign convention: a HIGHER SCORE MEANS HIGHER RISK of recurrence (as in
:mod:`common.metrics.discrimination`).

Exactness. The pooled figures are *exactly* the per-patient figures of the
binned data: the AUC equals ``roc_auc`` on the scores replaced by their
score-bin index (patients sharing a bin are ties), and the C-index equals
``lifelines.utils.concordance_index`` on (time-bin index, -C-index-score-bin
index, event), i.e. patients in the same time bin are treated as having tied
times, lifelines' way: an event and a censored patient in the same time bin
form a comparable pair with the event taken first; two events, or two
censored patients, in one time bin are not comparable. When the scores (and
times) already lie on the grid with at most one distinct value per bin, the
federated figures equal the pooled ones exactly.

Resolution trade-off. Finer bins bring the federated figures closer to the
exact pooled ones (fewer artificial ties), but the arrays grow, and at fine
resolution each occupied cell holds one patient, so the histograms approach
the information content of the unlinked (score, time, event) triples of every
patient. That is a real disclosure (e.g. a rare long follow-up time with its
score), which is why a later version adds differential-privacy noise to the
counts. Default grid (:class:`SummaryGrid`): AUC scores in 4000 bins of width
0.005 over [-10, 10] (two int64 vectors, 32 kB each); C-index scores in 1000
bins of width 0.02, times in 480 bins of 0.25 months up to 120 months (later
times share the last bin): two int32 arrays of 480 x 1000 = 1.9 MB each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import norm

__all__ = [
    "SummaryGrid",
    "SUMMARY_KEYS",
    "site_summary",
    "pool_summaries",
    "auc_from_summary",
    "cindex_from_summary",
    "roc_curve_from_summary",
]

SUMMARY_KEYS: tuple[str, ...] = ("auc_pos", "auc_neg", "cidx_event", "cidx_all")


@dataclass(frozen=True)
class SummaryGrid:
    """Binning of scores and follow-up times shared by all sites and the server.

    Scores are clipped to ``[score_min, score_max]`` and cut into equal-width
    bins: ``score_bins`` bins for the AUC and (coarser) ``cindex_score_bins``
    for the C-index. Times in months are cut into bins of ``time_bin_months``
    starting at 0; times at or beyond ``time_max_months`` go to the last bin.
    Every site and the server must use the same grid.
    """

    score_min: float = -10.0
    score_max: float = 10.0
    score_bins: int = 4000
    cindex_score_bins: int = 1000
    time_bin_months: float = 0.25
    time_max_months: float = 120.0

    def __post_init__(self) -> None:
        if not (np.isfinite(self.score_min) and np.isfinite(self.score_max)):
            raise ValueError("score_min and score_max must be finite")
        if self.score_max <= self.score_min:
            raise ValueError(f"score_max ({self.score_max}) must exceed score_min ({self.score_min})")
        for name in ("score_bins", "cindex_score_bins"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.time_bin_months > 0 or not np.isfinite(self.time_bin_months):
            raise ValueError(f"time_bin_months must be positive, got {self.time_bin_months}")
        if not self.time_max_months >= self.time_bin_months or not np.isfinite(self.time_max_months):
            raise ValueError(
                f"time_max_months ({self.time_max_months}) must be finite and "
                f">= time_bin_months ({self.time_bin_months})"
            )

    @property
    def time_bins(self) -> int:
        """Number of time bins: ceil(time_max_months / time_bin_months)."""
        return int(np.ceil(self.time_max_months / self.time_bin_months - 1e-9))

    def _bin(self, scores: ArrayLike, bins: int) -> NDArray[np.intp]:
        s = np.asarray(scores, dtype=float)
        if np.isnan(s).any():
            raise ValueError("scores contain NaN")
        s = np.clip(s, self.score_min, self.score_max)
        idx = np.floor((s - self.score_min) * bins / (self.score_max - self.score_min))
        return np.clip(idx, 0, bins - 1).astype(np.intp)

    def score_bin_index(self, scores: ArrayLike) -> NDArray[np.intp]:
        """AUC score-bin index in [0, score_bins), same shape as ``scores``."""
        return self._bin(scores, self.score_bins)

    def cindex_score_bin_index(self, scores: ArrayLike) -> NDArray[np.intp]:
        """C-index score-bin index in [0, cindex_score_bins), same shape as ``scores``."""
        return self._bin(scores, self.cindex_score_bins)

    def time_bin_index(self, times: ArrayLike) -> NDArray[np.intp]:
        """Time-bin index in [0, time_bins), same shape as ``times`` (months, >= 0)."""
        t = np.asarray(times, dtype=float)
        if np.isnan(t).any():
            raise ValueError("times contain NaN")
        if (t < 0).any():
            raise ValueError("times must be >= 0 months")
        idx = np.floor(np.minimum(t, self.time_max_months) / self.time_bin_months)
        return np.clip(idx, 0, self.time_bins - 1).astype(np.intp)

    def score_bin_centers(self, cindex: bool = False) -> NDArray[np.float64]:
        """Centres of the AUC score bins (or of the C-index bins), shape (bins,)."""
        bins = self.cindex_score_bins if cindex else self.score_bins
        width = (self.score_max - self.score_min) / bins
        return self.score_min + (np.arange(bins) + 0.5) * width


def validate_rows(
    labels: ArrayLike, scores: ArrayLike, times: ArrayLike, events: ArrayLike
) -> tuple[NDArray, NDArray, NDArray, NDArray]:
    """Float arrays of shape (n,) for one site's rows; ValueError naming what is wrong."""
    arrays = {}
    for name, x in (("labels", labels), ("scores", scores), ("times", times), ("events", events)):
        a = np.asarray(x, dtype=float)
        if a.ndim != 1:
            raise ValueError(f"{name} must be 1-dimensional with shape (n,), got shape {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError(f"{name} contains NaN or infinite values")
        arrays[name] = a
    lengths = {k: v.shape[0] for k, v in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"mismatched lengths: {lengths}")
    if not np.isin(arrays["labels"], (-1.0, 0.0, 1.0)).all():
        raise ValueError("labels must be 1 (recurrence), 0 (no recurrence) or -1 (unknown)")
    if not np.isin(arrays["events"], (0.0, 1.0)).all():
        raise ValueError("events must contain only 0 and 1")
    return arrays["labels"], arrays["scores"], arrays["times"], arrays["events"]


def site_summary(
    labels: ArrayLike,
    scores: ArrayLike,
    times: ArrayLike,
    events: ArrayLike,
    grid: SummaryGrid | None = None,
) -> dict[str, NDArray[np.integer]]:
    """One site's count arrays; their size does not depend on the number of patients.

    Parameters
    ----------
    labels : shape (n,), 1 = recurrence, 0 = none, -1 = unknown (the patient
        is left out of the AUC counts but still counts for the C-index).
    scores : shape (n,), finite; higher = higher risk.
    times : shape (n,), follow-up in months (>= 0).
    events : shape (n,), 1 = recurrence observed at ``times``, 0 = censored.
    grid : the shared binning; default ``SummaryGrid()``.

    Returns
    -------
    ``auc_pos``, ``auc_neg``: int64, shape (score_bins,): positives/negatives
    per AUC score bin. ``cidx_event``, ``cidx_all``: int32, shape
    (time_bins, cindex_score_bins): events, and all patients, per time bin and
    C-index score bin. See the module docstring for the resolution trade-off.
    """
    grid = SummaryGrid() if grid is None else grid
    y, s, t, e = validate_rows(labels, scores, times, events)
    sb = grid.score_bin_index(s)
    auc_pos = np.bincount(sb[y == 1], minlength=grid.score_bins).astype(np.int64)
    auc_neg = np.bincount(sb[y == 0], minlength=grid.score_bins).astype(np.int64)
    shape = (grid.time_bins, grid.cindex_score_bins)
    flat = grid.time_bin_index(t) * shape[1] + grid.cindex_score_bin_index(s)
    size = shape[0] * shape[1]
    cidx_all = np.bincount(flat, minlength=size).reshape(shape).astype(np.int32)
    cidx_event = np.bincount(flat[e == 1], minlength=size).reshape(shape).astype(np.int32)
    return {"auc_pos": auc_pos, "auc_neg": auc_neg, "cidx_event": cidx_event, "cidx_all": cidx_all}


def _check_summary(summary: dict, where: str) -> None:
    missing = [k for k in SUMMARY_KEYS if k not in summary]
    if missing:
        raise ValueError(f"{where}: missing keys {missing}")
    for key in SUMMARY_KEYS:
        a = np.asarray(summary[key])
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{where}: '{key}' must hold integer counts, got dtype {a.dtype}")
        if (a < 0).any():
            raise ValueError(f"{where}: '{key}' has negative counts")
    if np.shape(summary["auc_pos"]) != np.shape(summary["auc_neg"]) or np.ndim(summary["auc_pos"]) != 1:
        raise ValueError(f"{where}: 'auc_pos' and 'auc_neg' must be 1-D of equal shape")
    if np.shape(summary["cidx_event"]) != np.shape(summary["cidx_all"]) or np.ndim(summary["cidx_all"]) != 2:
        raise ValueError(f"{where}: 'cidx_event' and 'cidx_all' must be 2-D of equal shape")


def pool_summaries(summaries: list[dict]) -> dict[str, NDArray[np.int64]]:
    """Sum site summaries key by key (int64); the result does not depend on order.

    Raises ValueError for an empty list, missing keys, non-integer or negative
    counts, or shapes that differ between sites (different grids).
    """
    if len(summaries) == 0:
        raise ValueError("pool_summaries needs at least one site summary")
    for i, summary in enumerate(summaries):
        _check_summary(summary, f"summary {i}")
    pooled: dict[str, NDArray[np.int64]] = {}
    for key in SUMMARY_KEYS:
        shapes = {np.shape(s[key]) for s in summaries}
        if len(shapes) > 1:
            raise ValueError(f"summaries disagree on the shape of '{key}': {sorted(shapes)}")
        pooled[key] = np.sum([np.asarray(s[key], dtype=np.int64) for s in summaries], axis=0)
    return pooled


def auc_from_summary(pooled: dict, alpha: float = 0.05) -> dict[str, float | int]:
    """Pooled AUC and DeLong CI from the score histograms.

    Mann-Whitney on the binned scores (same bin = tie, counts 1/2). All
    positives in one bin share one placement value V10 (fraction of negatives
    below, plus half of those in the bin) and all negatives in one bin share
    V01, so DeLong's variance ``var(V10)/n_pos + var(V01)/n_neg`` (unbiased
    variances) is exact for the binned data. CI = auc +/- z * se, clipped to [0, 1].

    Returns dict with keys auc, se, ci_lower, ci_upper, n_pos, n_neg.
    Raises ValueError when a class is empty (AUC undefined) or has fewer than
    2 members (variance undefined).
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    _check_summary(pooled, "pooled summary")
    pos = np.asarray(pooled["auc_pos"], dtype=np.int64)
    neg = np.asarray(pooled["auc_neg"], dtype=np.int64)
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUC is undefined when only one class is present (n_pos={n_pos}, n_neg={n_neg})")
    if n_pos < 2 or n_neg < 2:
        raise ValueError(
            f"DeLong variance needs at least 2 positives and 2 negatives (n_pos={n_pos}, n_neg={n_neg})"
        )
    neg_below = np.cumsum(neg) - neg
    pos_above = n_pos - np.cumsum(pos)
    v10 = (neg_below + 0.5 * neg) / n_neg  # per score bin, for positives there
    v01 = (pos_above + 0.5 * pos) / n_pos  # per score bin, for negatives there
    auc = float(np.dot(pos, v10) / n_pos)
    s10 = float(np.dot(pos, (v10 - auc) ** 2) / (n_pos - 1))
    s01 = float(np.dot(neg, (v01 - auc) ** 2) / (n_neg - 1))
    se = float(np.sqrt(s10 / n_pos + s01 / n_neg))
    z = float(norm.ppf(1.0 - alpha / 2.0))
    return {
        "auc": auc,
        "se": se,
        "ci_lower": max(0.0, auc - z * se),
        "ci_upper": min(1.0, auc + z * se),
        "n_pos": n_pos,
        "n_neg": n_neg,
    }


def cindex_from_summary(pooled: dict) -> dict[str, float | int]:
    """Pooled Harrell's C-index from the (time bin, score bin) histograms.

    An event in cell (a, b) is compared with every patient in a later time
    bin and with every censored patient in time bin a (lifelines' rule for
    tied times: the event comes first); it is concordant with those in score
    bins < b and counts 1/2 with those in score bin b. Two events in the same
    time bin are not comparable. Vectorised with cumulative sums; a few ms on
    the default grid.

    Returns dict with keys c_index, comparable_pairs, n, n_events.
    Raises ValueError when there is no comparable pair (e.g. all censored).
    """
    _check_summary(pooled, "pooled summary")
    ev = np.asarray(pooled["cidx_event"], dtype=np.int64)
    al = np.asarray(pooled["cidx_all"], dtype=np.int64)
    if (ev > al).any():
        raise ValueError("cidx_event exceeds cidx_all in some cell")
    later = np.cumsum(al[::-1], axis=0)[::-1] - al  # patients in later time bins
    comparators = later + (al - ev)  # ... plus censored in the same time bin
    below = np.cumsum(comparators, axis=1) - comparators  # in lower score bins
    twice_num = int(np.sum(ev * (2 * below + comparators)))
    pairs = int(np.dot(ev.sum(axis=1), comparators.sum(axis=1)))
    if pairs == 0:
        raise ValueError("C-index is undefined: no comparable pairs (are all patients censored?)")
    return {
        "c_index": twice_num / (2.0 * pairs),
        "comparable_pairs": pairs,
        "n": int(al.sum()),
        "n_events": int(ev.sum()),
    }


def roc_curve_from_summary(pooled: dict, grid: SummaryGrid | None = None) -> dict[str, NDArray[np.float64]]:
    """The pooled ROC curve from the per-class score histograms.

    One point per occupied score bin, thresholds descending: a patient counts
    as predicted positive when its score bin is at or above the threshold bin.
    Starts at (0, 0) and ends at (1, 1). Equals ``sklearn.metrics.roc_curve``
    on the binned scores (``drop_intermediate=False``), so its trapezoidal area
    is the binned AUC of :func:`auc_from_summary`.

    Returns dict with ``fpr``, ``tpr`` and ``threshold`` (each shape (k,));
    the threshold is the lower edge of the bin in score units (+inf first).
    Raises ValueError when a class is empty or the histograms do not match ``grid``.
    """
    grid = SummaryGrid() if grid is None else grid
    pos = np.asarray(pooled["auc_pos"], dtype=np.int64)
    neg = np.asarray(pooled["auc_neg"], dtype=np.int64)
    if pos.shape != (grid.score_bins,) or neg.shape != (grid.score_bins,):
        raise ValueError(f"score histograms must have shape ({grid.score_bins},), got {pos.shape} and {neg.shape}")
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC curve is undefined when only one class is present (n_pos={n_pos}, n_neg={n_neg})")
    occupied = np.flatnonzero(pos + neg)[::-1]  # highest score bin first
    at_or_above_pos = np.cumsum(pos[::-1])[::-1]
    at_or_above_neg = np.cumsum(neg[::-1])[::-1]
    width = (grid.score_max - grid.score_min) / grid.score_bins
    return {
        "fpr": np.concatenate([[0.0], at_or_above_neg[occupied] / n_neg]),
        "tpr": np.concatenate([[0.0], at_or_above_pos[occupied] / n_pos]),
        "threshold": np.concatenate([[np.inf], grid.score_min + occupied * width]),
    }
