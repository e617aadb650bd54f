"""Federated clinical figures equal the pooled per-patient ones.

Data on the grid (scores and risks with one distinct value per bin, whole
months), split at random into 2 to 6 sites, ties and unknown labels
included: every federated figure must equal the pooled one within 1e-3.
Off the grid (continuous values) the error is bounded by the bin widths.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hccfed.common.metrics import clinical as C
from hccfed.common.metrics import federated_clinical as F
from hccfed.common.metrics import federated_delong as FD
from hccfed.common.metrics import federated_survival as FS
from hccfed.common.metrics import survival_clinical as SC
from hccfed.common.metrics.discrimination import delong_ci, harrell_c_index

GRID = F.ClinicalGrid()
TOL = 1e-3
# 31 score levels 0.2 apart, off the bin edges; their sigmoids are >= 0.009
# apart, so each score bin and each probability bin holds one distinct value.
LEVELS = np.round(np.arange(-3.0, 3.01, 0.2), 2) + 0.01


def _cohort(seed: int, n: int, p_unknown: float):
    rng = np.random.default_rng(seed)
    s_a = rng.choice(LEVELS, n)
    s_b = rng.choice(LEVELS, n)
    prob = 1 / (1 + np.exp(-s_a))
    y = (rng.random(n) < prob).astype(int)
    y[rng.random(n) < p_unknown] = -1
    e = rng.integers(0, 2, n)
    t = rng.integers(0, 40, n).astype(float)  # whole months, 0 included
    return y, s_a, s_b, prob, t, e


def _outcome(f):
    """The value of f(), or the ValueError class when it raises (both sides must agree)."""
    try:
        return f()
    except ValueError:
        return ValueError


def _close(a, b, what: str) -> None:
    if a is ValueError or b is ValueError:
        assert a is b, f"{what}: pooled {a!r} vs federated {b!r}"
        return
    if isinstance(a, dict):
        for key in a:
            if key in b:
                _close(a[key], b[key], f"{what}.{key}")
        return
    np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), atol=TOL, rtol=0, err_msg=what)


def _split(n: int, n_sites: int, seed: int) -> list[np.ndarray]:
    site = np.random.default_rng(seed + 1000).integers(0, n_sites, n)
    return [np.flatnonzero(site == k) for k in range(n_sites)]


def _check_everything(y, s_a, s_b, prob, t, e, parts) -> None:
    sites = [F.model_site_summary(y[i], s_a[i], prob[i], t[i], e[i], GRID) for i in parts]
    m = F.pool_model_summaries(sites)
    k = y >= 0
    yk, sk, pk = y[k], s_a[k], prob[k]

    _close(_outcome(lambda: delong_ci(yk, sk)[:2]),
           _outcome(lambda: tuple(F.auc_ci_from_model_summary(m)[x] for x in ("auc", "se"))), "auc")
    _close(_outcome(lambda: harrell_c_index(t, e, s_a)),
           _outcome(lambda: F.cindex_from_model_summary(m)["c_index"]), "c_index")
    thr = _outcome(lambda: C.youden_threshold(yk, sk))
    _close(thr, _outcome(lambda: F.youden_threshold_from_summary(m, GRID)), "youden")
    for cut in ([0.41] if thr is ValueError else [thr, 0.41]):
        _close(_outcome(lambda: C.threshold_metrics(yk, sk, cut)),
               _outcome(lambda: F.threshold_metrics_from_summary(m, cut, GRID)), "threshold_metrics")
    _close(_outcome(lambda: C.brier_score(yk, pk)), _outcome(lambda: F.brier_from_summary(m)), "brier")
    _close(_outcome(lambda: C.calibration_curve(yk, pk)),
           _outcome(lambda: F.calibration_curve_from_summary(m, 10, GRID)), "calibration_curve")
    _close(_outcome(lambda: C.calibration_intercept_slope(yk, pk)),
           _outcome(lambda: F.calibration_intercept_slope_from_summary(m)), "calibration")
    _close(_outcome(lambda: C.hosmer_lemeshow(yk, pk)),
           _outcome(lambda: F.hosmer_lemeshow_from_summary(m, 10, GRID)), "hosmer_lemeshow")
    pts = np.arange(0.05, 0.96, 0.05)
    _close(_outcome(lambda: C.net_benefit(yk, pk, pts)),
           _outcome(lambda: F.net_benefit_from_summary(m, pts, GRID)), "net_benefit")

    cut = FS.score_quantile_cutpoints(m, (0.5,), GRID)
    groups = SC.risk_groups(s_a, cut)
    _close(_outcome(lambda: SC.logrank_test(t, e, groups)),
           _outcome(lambda: FS.logrank_from_summary(m, cut, GRID)), "logrank")
    for g, curve in enumerate(FS.kaplan_meier_by_group_from_summary(m, cut, GRID)):
        if curve["n"] > 0:
            ref = SC.kaplan_meier(t[groups == g], e[groups == g])
            _close(SC.survival_at(ref, curve["times"]), curve["survival"], f"km group {g}")
    _close(_outcome(lambda: SC.time_dependent_auc(t, e, s_a, 24.0)),
           _outcome(lambda: FS.time_dependent_auc_from_summary(m, 24.0, GRID)), "td_auc")

    # paired DeLong: round 2 against the pooled histograms of both models
    pooled = {"a": m, "b": F.pool_model_summaries(
        [F.model_site_summary(y[i], s_b[i], prob[i], t[i], e[i], GRID) for i in parts])}
    answers = [FD.placement_sums(y[i], {"a": s_a[i], "b": s_b[i]}, pooled, GRID.base) for i in parts]
    _close(_outcome(lambda: C.delong_paired_test(yk, sk, s_b[k])),
           _outcome(lambda: FD.delong_paired_from_sums(FD.pool_placement_sums(answers), "a", "b")), "paired")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), n=st.integers(12, 90), n_sites=st.integers(2, 6),
       p_unknown=st.sampled_from([0.0, 0.2]))
def test_every_federated_figure_equals_the_pooled_one(seed, n, n_sites, p_unknown) -> None:
    y, s_a, s_b, prob, t, e = _cohort(seed, n, p_unknown)
    _check_everything(y, s_a, s_b, prob, t, e, _split(n, n_sites, seed))


def test_larger_cohort_on_the_grid() -> None:
    y, s_a, s_b, prob, t, e = _cohort(11, 600, 0.1)
    _check_everything(y, s_a, s_b, prob, t, e, _split(600, 4, 11))


def test_continuous_values_stay_within_bin_error() -> None:
    """Off the grid: scores, risks and times continuous (n = 800, 3 sites)."""
    rng = np.random.default_rng(3)
    n = 800
    s = rng.normal(size=n)
    prob = 1 / (1 + np.exp(-s))
    y = (rng.random(n) < prob).astype(int)
    t = rng.exponential(30, n)
    e = rng.integers(0, 2, n)
    m = F.pool_model_summaries([F.model_site_summary(y[i], s[i], prob[i], t[i], e[i], GRID)
                                for i in np.array_split(np.arange(n), 3)])
    assert F.auc_ci_from_model_summary(m)["auc"] == pytest.approx(delong_ci(y, s)[0], abs=1e-3)
    assert F.brier_from_summary(m) == pytest.approx(C.brier_score(y, prob), abs=1e-12)  # exact from sums
    got, ref = F.calibration_intercept_slope_from_summary(m), C.calibration_intercept_slope(y, prob)
    assert got["slope"] == pytest.approx(ref["slope"], abs=1e-4)
    assert got["intercept"] == pytest.approx(ref["intercept"], abs=1e-4)
    assert F.hosmer_lemeshow_from_summary(m, 10, GRID)["chi2"] == pytest.approx(C.hosmer_lemeshow(y, prob)["chi2"], abs=0.2)
    assert FS.time_dependent_auc_from_summary(m, 24.0, GRID)["auc"] == pytest.approx(
        SC.time_dependent_auc(t, e, s, 24.0)["auc"], abs=5e-3)


def test_laplace_noise_is_seeded_and_its_error_is_measured() -> None:
    """Measured on n = 2000, epsilon = 1, 5 seeds (see add_laplace_noise for why a coarse grid).

    Default grid: AUC error up to ~0.32 (4000 mostly empty score bins, each
    clipped at 0, pull the AUC towards 0.5). Coarse grid (100 bins): AUC
    ~0.04, C-index ~0.03, Brier ~0.02, calibration slope ~0.006.
    """
    from hccfed.common.metrics.summaries import SummaryGrid

    coarse = F.ClinicalGrid(SummaryGrid(score_bins=100, cindex_score_bins=100, time_bin_months=1.0,
                                        time_max_months=60.0), prob_bins=100)
    y, s_a, _, prob, t, e = _cohort(5, 2000, 0.0)
    m = F.model_site_summary(y, s_a, prob, t, e, coarse)
    a = F.add_laplace_noise(m, 1.0, 42)
    b = F.add_laplace_noise(m, 1.0, np.random.default_rng(42))
    assert all(np.array_equal(a[k], b[k]) for k in F.COUNT_KEYS)
    assert all(np.array_equal(a[k], m[k]) for k in F.SUM_KEYS)  # sums untouched
    assert all((a[k] >= 0).all() and np.issubdtype(a[k].dtype, np.integer) for k in F.COUNT_KEYS)
    assert (a["cidx_event"] <= a["cidx_all"]).all()
    exact_auc = F.auc_ci_from_model_summary(m)["auc"]
    exact_c = F.cindex_from_model_summary(m)["c_index"]
    noisy = [F.add_laplace_noise(m, 1.0, seed) for seed in range(5)]
    assert max(abs(F.auc_ci_from_model_summary(x)["auc"] - exact_auc) for x in noisy) < 0.06
    assert max(abs(F.cindex_from_model_summary(x)["c_index"] - exact_c) for x in noisy) < 0.05
    with pytest.raises(ValueError, match="epsilon"):
        F.add_laplace_noise(m, 0.0, 1)


def test_round_two_refuses_other_histograms_and_bad_summaries() -> None:
    y, s_a, s_b, prob, t, e = _cohort(2, 60, 0.0)
    m = F.model_site_summary(y, s_a, prob, t, e, GRID)
    m2 = F.model_site_summary(y, s_b, prob, t, e, GRID)
    one = FD.placement_sums(y, {"a": s_a, "b": s_b}, {"a": m, "b": m2}, GRID.base)
    other = FD.placement_sums(y, {"a": s_a, "b": s_b}, {"a": m2, "b": m}, GRID.base)
    with pytest.raises(ValueError, match="different pooled histograms"):
        FD.pool_placement_sums([one, other])
    with pytest.raises(ValueError, match="shape"):
        small = F.model_site_summary(y, s_a, prob, t, e, F.ClinicalGrid(prob_bins=100))
        F.pool_model_summaries([m, small])
    with pytest.raises(ValueError, match="missing key"):
        F.pool_model_summaries([{k: v for k, v in m.items() if k != "p_sum_pos"}])
    with pytest.raises(ValueError, match="labels must be"):
        F.model_site_summary(np.full(3, 2), s_a[:3], prob[:3], t[:3], e[:3], GRID)
    assert F.ClinicalGrid.from_dict(GRID.to_dict()) == GRID


def test_summary_size_does_not_depend_on_n() -> None:
    small = F.model_site_summary(*(_cohort(1, 10, 0.0)[i] for i in (0, 1, 3, 4, 5)), GRID)
    large = F.model_site_summary(*(_cohort(1, 500, 0.0)[i] for i in (0, 1, 3, 4, 5)), GRID)
    assert {k: v.shape for k, v in small.items()} == {k: v.shape for k, v in large.items()}


def test_youden_threshold_chosen_on_one_federation_applies_to_another() -> None:
    y1, s1, _, p1, t1, e1 = _cohort(30, 300, 0.1)
    y2, s2, _, p2, t2, e2 = _cohort(31, 300, 0.1)
    dev = F.pool_model_summaries([F.model_site_summary(y1[i], s1[i], p1[i], t1[i], e1[i], GRID)
                                  for i in _split(300, 3, 30)])
    val = F.pool_model_summaries([F.model_site_summary(y2[i], s2[i], p2[i], t2[i], e2[i], GRID)
                                  for i in _split(300, 2, 31)])
    thr = F.youden_threshold_from_summary(dev, GRID)
    assert thr == pytest.approx(C.youden_threshold(y1[y1 >= 0], s1[y1 >= 0]), abs=1e-12)
    k = y2 >= 0
    _close(C.threshold_metrics(y2[k], s2[k], thr), F.threshold_metrics_from_summary(val, thr, GRID), "validation")
