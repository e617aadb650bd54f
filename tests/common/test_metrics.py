"""Tests of common.metrics: exact per-patient metrics and their federated form.

Sign convention under test: higher score = higher risk. lifelines'
concordance_index takes higher = longer survival, hence the negated scores.
"""

from __future__ import annotations

import csv
import time
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
from hccfed.common.metrics.summaries import (
    roc_curve_from_summary,
    SummaryGrid,
    auc_from_summary,
    cindex_from_summary,
    pool_summaries,
    site_summary,
)

REFDATA = Path(__file__).resolve().parents[1] / "data"  # tests/data: public reference data, see its README
ASAH = REFDATA / "asah.csv"
GRID = SummaryGrid()


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
    # The federated form on a grid fine enough for s100b's 2-decimal values.
    fine = SummaryGrid(score_min=0.0, score_max=3.0, score_bins=3000, cindex_score_bins=10)
    half = y.size // 2
    parts = [
        site_summary(y[sl], s[sl], np.ones(sl.stop - sl.start), np.zeros(sl.stop - sl.start), fine)
        for sl in (slice(0, half), slice(half, y.size))
    ]
    fed = auc_from_summary(pool_summaries(parts))
    assert fed["auc"] == pytest.approx(auc, abs=1e-12)
    assert fed["se"] == pytest.approx(se, abs=1e-12)
    assert (fed["ci_lower"], fed["ci_upper"]) == pytest.approx((lo, hi), abs=1e-12)


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
def test_default_grid_and_sizes_do_not_depend_on_n() -> None:
    assert (GRID.score_bins, GRID.cindex_score_bins, GRID.time_bins) == (4000, 1000, 480)
    shapes = None
    for n in (0, 1, 900):
        rng = np.random.default_rng(n)
        summ = site_summary(rng.integers(-1, 2, n), rng.normal(size=n), rng.exponential(40, n),
                            rng.integers(0, 2, n), GRID)
        got = {k: (v.shape, v.dtype) for k, v in summ.items()}
        shapes = shapes or got
        assert got == shapes
    assert shapes["auc_pos"][0] == (4000,) and shapes["cidx_all"][0] == (480, 1000)
    assert summ["cidx_all"].nbytes <= 2_000_000 and summ["cidx_event"].nbytes <= 2_000_000


def test_bin_indices() -> None:
    assert GRID.score_bin_index([-50, -10, 0, 9.999, 10, 50]).tolist() == [0, 0, 2000, 3999, 3999, 3999]
    assert GRID.cindex_score_bin_index([-10, 0.01, 10]).tolist() == [0, 500, 999]
    assert GRID.time_bin_index([0, 0.24, 0.25, 119.9, 120, 500]).tolist() == [0, 0, 1, 479, 479, 479]
    centers = GRID.score_bin_centers()
    assert (GRID.score_bin_index(centers) == np.arange(4000)).all()
    with pytest.raises(ValueError, match=">= 0"):
        GRID.time_bin_index([-1.0])
    with pytest.raises(ValueError):
        SummaryGrid(score_min=1.0, score_max=0.0)


def test_summary_errors() -> None:
    with pytest.raises(ValueError, match="mismatched lengths"):
        site_summary([0, 1], [0.1, 0.2], [1.0], [0, 1])
    with pytest.raises(ValueError, match="-1"):
        site_summary([0, 2], [0.1, 0.2], [1.0, 2.0], [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        site_summary([0, 1], [0.1, np.nan], [1.0, 2.0], [0, 1])
    a = site_summary([0, 1], [0.1, 0.2], [1.0, 2.0], [0, 1])
    b = site_summary([0, 1], [0.1, 0.2], [1.0, 2.0], [0, 1], SummaryGrid(score_bins=100))
    with pytest.raises(ValueError, match="shape"):
        pool_summaries([a, b])
    with pytest.raises(ValueError, match="at least one"):
        pool_summaries([])
    one_class = site_summary([1, 1, -1], [0.1, 0.2, 0.3], [1.0, 2.0, 3.0], [0, 0, 0])
    with pytest.raises(ValueError, match="only one class"):
        auc_from_summary(one_class)
    with pytest.raises(ValueError, match="no comparable pairs"):
        cindex_from_summary(one_class)


def test_cindex_from_summary_is_fast() -> None:
    rng = np.random.default_rng(0)
    n = 3000
    summ = pool_summaries([site_summary(rng.integers(-1, 2, n), rng.normal(size=n),
                                        rng.exponential(40, n), rng.integers(0, 2, n))])
    start = time.perf_counter()
    cindex_from_summary(summ)
    auc_from_summary(summ)
    assert time.perf_counter() - start < 0.5


# --------------------------------------------- federated == pooled, property
def _make_data(rng: np.random.Generator, n: int, score_mode: str, time_mode: str, p_unknown: float):
    """Per-patient arrays; returns (labels with -1 = unknown, scores, times in months, events)."""
    y = (rng.random(n) < 0.4).astype(int)
    y[:4] = (0, 1, 0, 1)  # DeLong needs 2 of each class
    y[4:][rng.random(n - 4) < p_unknown] = -1
    e = (rng.random(n) < 0.5).astype(int)
    e[0] = 1
    risk = rng.normal(size=n) + 0.7 * (y == 1) + 0.5 * e
    if score_mode == "continuous":
        s = risk
    elif score_mode == "cindex_grid":  # C-index bin centres, hence on the AUC grid too
        s = GRID.score_bin_centers(cindex=True)[GRID.cindex_score_bin_index(risk)]
    else:  # a few values only: heavy ties, on the grid
        s = GRID.score_bin_centers(cindex=True)[rng.choice([100, 480, 500, 501, 777], n)]
    if time_mode == "continuous":
        t = rng.exponential(30, n) * np.where(e == 1, 0.7, 1.0)
    else:  # time-bin centres; "grid_unique": at most one patient per bin
        k = (rng.choice(GRID.time_bins, n, replace=False) if time_mode == "grid_unique"
             else rng.integers(0, 60, n))
        t = (k + 0.5) * GRID.time_bin_months
    return y, s, t, e


def _split(n: int, n_sites: int, rng: np.random.Generator) -> list[np.ndarray]:
    cuts = np.sort(rng.choice(np.arange(1, n), n_sites - 1, replace=False))
    return np.split(rng.permutation(n), cuts)


def _pairs(t: np.ndarray, e: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(comparable, contribution) n x n matrices with lifelines' rules; row i = the earlier one."""
    later = (t[:, None] < t[None, :]) | ((t[:, None] == t[None, :]) & (e[None, :] == 0))
    comparable = (e[:, None] == 1) & later
    contribution = (s[:, None] > s[None, :]) + 0.5 * (s[:, None] == s[None, :])
    return comparable, contribution


def _auc_bound(y: np.ndarray, s: np.ndarray) -> float:
    """Largest |federated - exact| AUC: pairs whose scores differ but share a bin, x 1/2, / pairs."""
    b = GRID.score_bin_index(s)
    pos, neg = y == 1, y == 0
    merged = (b[pos][:, None] == b[neg][None, :]) & (s[pos][:, None] != s[neg][None, :])
    return 0.5 * merged.sum() / merged.size


def _cindex_bound(t: np.ndarray, e: np.ndarray, s: np.ndarray) -> float:
    """Largest |federated - exact| C-index: D / min(pairs), D = pairs that binning changes.

    Adding, removing or re-scoring one pair moves a ratio of counts in [0, 1]
    by at most 1 / (its denominator), and every denominator on the path from
    the exact to the binned pair set is >= min(exact pairs, binned pairs).
    """
    ce, ve = _pairs(t, e, s)
    cf, vf = _pairs(GRID.time_bin_index(t), e, GRID.cindex_score_bin_index(s))
    changed = (ce != cf).sum() + (ce & cf & (ve != vf)).sum()
    return changed / min(ce.sum(), cf.sum())


@settings(max_examples=25, deadline=None, database=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(20, 600),
    n_sites=st.integers(2, 6),
    score_mode=st.sampled_from(["continuous", "cindex_grid", "few_values"]),
    time_mode=st.sampled_from(["continuous", "grid_unique", "grid_ties"]),
    p_unknown=st.sampled_from([0.0, 0.3]),
)
def test_federated_equals_pooled(seed, n, n_sites, score_mode, time_mode, p_unknown) -> None:
    rng = np.random.default_rng(seed)
    if time_mode == "grid_unique":
        n = min(n, GRID.time_bins)
    y, s, t, e = _make_data(rng, n, score_mode, time_mode, p_unknown)
    parts = [site_summary(y[i], s[i], t[i], e[i], GRID) for i in _split(n, n_sites, rng)]
    pooled = pool_summaries(parts)
    on_grid = score_mode != "continuous"

    # Pooling is order-independent and equals the summary of the pooled rows.
    whole = site_summary(y, s, t, e, GRID)
    for key, value in pool_summaries(parts[::-1]).items():
        assert np.array_equal(value, pooled[key]) and np.array_equal(whole[key], pooled[key])

    # AUC and DeLong SE (unknown labels left out): exact on the binned data,
    # exact when the scores lie on the grid, else within the tie bound.
    known = y >= 0
    auc, se, _, _ = delong_ci(y[known], s[known])
    fed = auc_from_summary(pooled)
    assert (fed["n_pos"], fed["n_neg"]) == (int((y == 1).sum()), int((y == 0).sum()))
    binned_auc, binned_se, _, _ = delong_ci(y[known], GRID.score_bin_index(s[known]))
    assert fed["auc"] == pytest.approx(binned_auc, abs=1e-12)
    assert fed["se"] == pytest.approx(binned_se, abs=1e-12)
    assert abs(fed["auc"] - auc) <= (1e-12 if on_grid else _auc_bound(y[known], s[known]) + 1e-12)
    assert abs(fed["se"] - se) <= (1e-12 if on_grid else 1e-3 if n >= 100 else 1e-2)

    # C-index (all patients, unknown labels included): lifelines on the binned
    # data exactly; lifelines on the raw data when scores and times are on the
    # grid; else within the changed-pairs bound (and the loose 0.01 for n >= 100).
    c_fed = cindex_from_summary(pooled)
    assert (c_fed["n"], c_fed["n_events"]) == (n, int(e.sum()))
    tb, sb = GRID.time_bin_index(t), GRID.cindex_score_bin_index(s)
    assert c_fed["c_index"] == pytest.approx(concordance_index(tb, -sb, e), abs=1e-12)
    c_err = abs(c_fed["c_index"] - concordance_index(t, -s, e))
    if on_grid and time_mode != "continuous":
        assert c_err <= 1e-12
    else:
        assert c_err <= _cindex_bound(t, e, s) + 1e-12
        assert n < 100 or c_err <= 0.01


@pytest.mark.parametrize("seed", range(3))
def test_continuous_scores_n600_default_grid(seed: int) -> None:
    """Continuous scores and times, n = 600 over 4 sites, default grid."""
    rng = np.random.default_rng(100 + seed)
    y, s, t, e = _make_data(rng, 600, "continuous", "continuous", 0.2)
    pooled = pool_summaries([site_summary(y[i], s[i], t[i], e[i]) for i in _split(600, 4, rng)])
    fed = auc_from_summary(pooled)
    known = y >= 0
    auc, se, lo, hi = delong_ci(y[known], s[known])
    assert abs(fed["auc"] - auc) <= 1e-3 and abs(fed["se"] - se) <= 1e-3
    assert abs(fed["ci_lower"] - lo) <= 2e-3 and abs(fed["ci_upper"] - hi) <= 2e-3
    assert abs(cindex_from_summary(pooled)["c_index"] - concordance_index(t, -s, e)) <= 0.01


@pytest.mark.parametrize("seed", range(3))
def test_continuous_scores_one_patient_per_time_bin(seed: int) -> None:
    """Times on the 0.25-month grid, one patient per bin, continuous scores: C within 1e-3."""
    rng = np.random.default_rng(200 + seed)
    y, s, t, e = _make_data(rng, GRID.time_bins, "continuous", "grid_unique", 0.2)
    pooled = pool_summaries([site_summary(y[i], s[i], t[i], e[i]) for i in _split(t.size, 3, rng)])
    assert abs(cindex_from_summary(pooled)["c_index"] - concordance_index(t, -s, e)) <= 1e-3


@pytest.mark.parametrize("seed", [0, 1])
def test_roc_curve_from_summary_matches_sklearn_on_binned_scores(seed: int) -> None:
    from sklearn.metrics import auc as trapezoid_area
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(seed)
    grid = SummaryGrid()
    labels = rng.integers(-1, 2, 300)
    scores = np.round(rng.normal(labels.clip(0), 1.5), 2)  # ties within and across classes
    pooled = pool_summaries([site_summary(labels[:120], scores[:120], np.ones(120), np.zeros(120), grid),
                             site_summary(labels[120:], scores[120:], np.ones(180), np.zeros(180), grid)])
    curve = roc_curve_from_summary(pooled, grid)
    known = labels >= 0
    fpr, tpr, _ = roc_curve(labels[known], grid.score_bin_index(scores[known]), drop_intermediate=False)
    np.testing.assert_allclose(curve["fpr"], fpr)
    np.testing.assert_allclose(curve["tpr"], tpr)
    assert trapezoid_area(curve["fpr"], curve["tpr"]) == pytest.approx(auc_from_summary(pooled)["auc"], abs=1e-12)
    assert np.all(np.diff(curve["threshold"][1:]) < 0)
    with pytest.raises(ValueError, match="only one class"):
        roc_curve_from_summary(pool_summaries([site_summary(np.ones(5), scores[:5], np.ones(5), np.zeros(5))]))
