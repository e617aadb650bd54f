"""Tests of common.metrics: exact per-patient metrics and their form from site summary tables.

Sign convention under test: higher score = higher risk. lifelines'
concordance_index takes higher = longer survival, hence the negated scores.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lifelines.utils import concordance_index
from sklearn.metrics import roc_auc_score

from hccfed.common.metrics.discrimination import (
    concordance_counts,
    delong_ci,
    harrell_c_index,
    roc_auc,
)
from hccfed.common.metrics.summaries import EVALUATION_KEYS, check_summary, pool_summaries, site_summary
from hccfed.common.metrics.summary_discrimination import auc_from_summary, cindex_from_summary, roc_curve_from_summary

REFDATA = Path(__file__).resolve().parents[1] / "data"  # tests/data: public reference data, see its README
ASAH = REFDATA / "asah.csv"


# ----------------------------------------------------------------- helpers
def _labels_scores(rng: np.random.Generator, n: int, ties: bool) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, 2, n)
    y[:2] = (0, 1)
    s = rng.normal(size=n) + 0.8 * y
    if ties:
        s = np.round(s * 2) / 2
    return y, s


def _survival(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Times with ties (integers), events, and scores with ties."""
    s = rng.integers(0, 8, n) / 3.0
    t = rng.integers(1, 25, n).astype(float)
    e = rng.integers(0, 2, n)
    return t, e, s


def _slow_delong_se(y: np.ndarray, s: np.ndarray) -> float:
    """Obvious O(n^2) DeLong: psi matrix, its row and column means, their variances."""
    x, z = s[y == 1], s[y == 0]
    psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    return float(np.sqrt(v10.var(ddof=1) / x.size + v01.var(ddof=1) / z.size))


def _slow_concordance(t: np.ndarray, e: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    """Pair-by-pair loop with lifelines' rules (higher score = higher risk)."""
    num = pairs = 0.0
    for i in range(t.size):
        for j in range(t.size):
            if e[i] == 1 and (t[i] < t[j] or (t[i] == t[j] and e[j] == 0)):
                pairs += 1
                num += 1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0
    return num, pairs


# ---------------------------------------------------- per-patient reference
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ties", [False, True])
def test_roc_auc_and_delong_match_sklearn_and_slow_delong(seed: int, ties: bool) -> None:
    rng = np.random.default_rng(seed)
    y, s = _labels_scores(rng, 150, ties)
    expected = roc_auc_score(y, s)
    assert roc_auc(y, s) == pytest.approx(expected, abs=1e-12)
    auc, se, lo, hi = delong_ci(y, s)
    assert auc == pytest.approx(expected, abs=1e-12)
    assert se == pytest.approx(_slow_delong_se(y, s), abs=1e-12)
    assert lo == pytest.approx(max(0.0, auc - 1.959963984540054 * se))
    assert hi == pytest.approx(min(1.0, auc + 1.959963984540054 * se))


def test_asah_s100b_matches_published_proc_values() -> None:
    """pROC: roc(aSAH$outcome, aSAH$s100b) AUC 0.7314, DeLong 95% CI 0.6301-0.8326."""
    with ASAH.open() as f:
        rows = list(csv.DictReader(f))
    y = np.array([r["outcome"] == "Poor" for r in rows], dtype=int)
    s = np.array([float(r["s100b"]) for r in rows])
    assert (y.size, y.sum()) == (113, 41)
    auc, se, lo, hi = delong_ci(y, s)
    assert round(auc, 4) == 0.7314
    assert (round(lo, 4), round(hi, 4)) == (0.6301, 0.8326)
    # Through the summary tables of two sites: the same figures, with no grid to choose.
    half = y.size // 2
    parts = [site_summary(y[sl], s[sl], np.ones(sl.stop - sl.start), np.zeros(sl.stop - sl.start))
             for sl in (slice(0, half), slice(half, y.size))]
    fed = auc_from_summary(pool_summaries(parts))
    assert fed["auc"] == pytest.approx(auc, abs=1e-12)
    assert fed["se"] == pytest.approx(se, abs=1e-12)
    assert (round(fed["ci_lower"], 4), round(fed["ci_upper"], 4)) == (0.6301, 0.8326)


@pytest.mark.parametrize("seed", range(6))
def test_harrell_matches_lifelines_with_tied_times_and_scores(seed: int) -> None:
    rng = np.random.default_rng(seed)
    t, e, s = _survival(rng, 200)
    assert harrell_c_index(t, e, s) == pytest.approx(concordance_index(t, -s, e), abs=1e-12)


def test_concordance_counts_match_slow_loop() -> None:
    rng = np.random.default_rng(11)
    t, e, s = _survival(rng, 60)
    assert concordance_counts(t, e, s) == _slow_concordance(t, e, s)


def test_harrell_matches_lifelines_across_chunks() -> None:
    """More than one chunk of events (1024) in the vectorised count."""
    rng = np.random.default_rng(5)
    n = 2600
    t = np.round(rng.exponential(30, n), 1)
    e = (rng.random(n) < 0.9).astype(int)
    s = np.round(rng.normal(size=n), 2)
    assert harrell_c_index(t, e, s) == pytest.approx(concordance_index(t, -s, e), abs=1e-12)


def test_invariances() -> None:
    rng = np.random.default_rng(3)
    t, e, s = _survival(rng, 150)
    c = harrell_c_index(t, e, s)
    assert harrell_c_index(t + 17.25, e, s) == pytest.approx(c, abs=1e-12)
    assert harrell_c_index(t, e, np.exp(2 * s) - 5) == pytest.approx(c, abs=1e-12)
    assert harrell_c_index(t, e, -s) == pytest.approx(1 - c, abs=1e-12)
    y, s2 = _labels_scores(rng, 150, ties=True)
    auc = roc_auc(y, s2)
    assert roc_auc(y, np.tanh(s2) * 3 + 1) == pytest.approx(auc, abs=1e-12)
    assert roc_auc(y, -s2) == pytest.approx(1 - auc, abs=1e-12)


def test_edge_cases_raise() -> None:
    with pytest.raises(ValueError, match="no comparable pairs"):
        harrell_c_index([1, 2, 3], [0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="only one class"):
        roc_auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="only one class"):
        delong_ci([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="at least 2"):
        delong_ci([0, 0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="mismatched lengths"):
        roc_auc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        roc_auc([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match="NaN"):
        harrell_c_index([1, 2], [1, 0], [np.nan, 0.0])
    with pytest.raises(ValueError, match="0 and 1"):
        roc_auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="mismatched lengths"):
        concordance_counts([1, 2], [1, 0, 1], [0.1, 0.2])


# ------------------------------------------------------------ the summaries
def test_tables_hold_each_distinct_value_once_with_its_counts() -> None:
    labels = np.array([1, 0, 0, -1, 1, 0])
    scores = np.array([0.5, 0.5, -2.0, 9.0, 1e6, 0.5])
    times = np.array([3.0, 3.0, 12.0, 1.5, 3.0, 12.0])
    events = np.array([1, 0, 0, 0, 1, 0])
    summ = site_summary(labels, scores, times, events)
    assert set(summ) == set(EVALUATION_KEYS)
    assert summ["auc_value"].tolist() == [-2.0, 0.5, 1e6]  # the unknown label's 9.0 is left out
    assert (summ["auc_pos"].tolist(), summ["auc_neg"].tolist()) == ([0, 1, 1], [1, 2, 0])
    rows = list(zip(summ["cidx_time"], summ["cidx_score"], summ["cidx_event"], summ["cidx_all"]))
    assert rows == [(1.5, 9.0, 0, 1), (3.0, 0.5, 1, 2), (3.0, 1e6, 1, 1), (12.0, -2.0, 0, 1), (12.0, 0.5, 0, 1)]
    assert check_summary(summ) == ["auc", "cidx"]
    assert summ["auc_pos"].dtype == np.int64 and summ["auc_value"].dtype == np.float64


def test_summary_errors() -> None:
    with pytest.raises(ValueError, match="mismatched lengths"):
        site_summary([0, 1], [0.1, 0.2], [1.0], [0, 1])
    with pytest.raises(ValueError, match="-1"):
        site_summary([0, 2], [0.1, 0.2], [1.0, 2.0], [0, 1])
    with pytest.raises(ValueError, match=r"NaN or infinite values \(1 patients\)"):
        site_summary([0, 1], [0.1, np.nan], [1.0, 2.0], [0, 1])
    with pytest.raises(ValueError, match=">= 0 months"):
        site_summary([0, 1], [0.1, 0.2], [1.0, -2.0], [0, 1])
    a = site_summary([0, 1], [0.1, 0.2], [1.0, 2.0], [0, 1])
    with pytest.raises(ValueError, match="summary 1 holds the tables"):
        pool_summaries([a, {k: v for k, v in a.items() if k.startswith("auc")}])
    with pytest.raises(ValueError, match="at least one"):
        pool_summaries([])
    with pytest.raises(ValueError, match="strictly ascending"):
        pool_summaries([{**a, "auc_value": a["auc_value"][::-1].copy()}])
    one_class = site_summary([1, 1, -1], [0.1, 0.2, 0.3], [1.0, 2.0, 3.0], [0, 0, 0])
    with pytest.raises(ValueError, match="only one class"):
        auc_from_summary(one_class)
    with pytest.raises(ValueError, match="no comparable pairs"):
        cindex_from_summary(one_class)


@settings(max_examples=25, deadline=None, database=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(20, 600), n_sites=st.integers(2, 6),
       ties=st.booleans(), p_unknown=st.sampled_from([0.0, 0.3]))
def test_pooled_auc_delong_and_cindex_equal_sklearn_and_lifelines(seed, n, n_sites, ties, p_unknown) -> None:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    y[:4] = (0, 1, 0, 1)
    y[4:][rng.random(n - 4) < p_unknown] = -1
    e = (rng.random(n) < 0.5).astype(int)
    e[0] = 1
    s = rng.normal(size=n) + 0.7 * (y == 1) + 0.5 * e
    t = rng.exponential(30, n)
    if ties:
        s, t = np.round(s, 1), np.round(t)
    cuts = np.sort(rng.choice(np.arange(1, n), n_sites - 1, replace=False))
    pooled = pool_summaries([site_summary(y[i], s[i], t[i], e[i]) for i in np.split(rng.permutation(n), cuts)])
    known = y >= 0
    auc, se, lo, hi = delong_ci(y[known], s[known])
    fed = auc_from_summary(pooled)
    assert (fed["n_pos"], fed["n_neg"]) == (int((y == 1).sum()), int((y == 0).sum()))
    assert fed["auc"] == pytest.approx(roc_auc_score(y[known], s[known]), abs=1e-12)
    assert (fed["se"], fed["ci_lower"], fed["ci_upper"]) == pytest.approx((se, lo, hi), abs=1e-12)
    assert fed["se"] == pytest.approx(_slow_delong_se(y[known], s[known]), abs=1e-12)
    c_fed = cindex_from_summary(pooled)
    assert (c_fed["n"], c_fed["n_events"]) == (n, int(e.sum()))
    assert c_fed["c_index"] == pytest.approx(concordance_index(t, -s, e), abs=1e-12)
    assert c_fed["comparable_pairs"] == concordance_counts(t, e, s)[1]


@pytest.mark.parametrize("seed", [0, 1])
def test_roc_curve_from_summary_matches_sklearn(seed: int) -> None:
    from sklearn.metrics import auc as trapezoid_area
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(seed)
    labels = rng.integers(-1, 2, 300)
    scores = np.round(rng.normal(labels.clip(0), 1.5), 2)  # ties within and across classes
    pooled = pool_summaries([site_summary(labels[:120], scores[:120], np.ones(120), np.zeros(120)),
                             site_summary(labels[120:], scores[120:], np.ones(180), np.zeros(180))])
    curve = roc_curve_from_summary(pooled)
    known = labels >= 0
    fpr, tpr, thresholds = roc_curve(labels[known], scores[known], drop_intermediate=False)
    np.testing.assert_allclose(curve["fpr"], fpr)
    np.testing.assert_allclose(curve["tpr"], tpr)
    np.testing.assert_allclose(curve["threshold"][1:], thresholds[1:])
    assert trapezoid_area(curve["fpr"], curve["tpr"]) == pytest.approx(auc_from_summary(pooled)["auc"], abs=1e-12)
    with pytest.raises(ValueError, match="only one class"):
        roc_curve_from_summary(pool_summaries([site_summary(np.ones(5), scores[:5], np.ones(5), np.zeros(5))]))
