"""Pooled figures from the sites' summary tables equal the per-patient figures of the pooled rows.

For every score scale a coordinating centre cannot choose (probabilities
squeezed near 0 (median 0.004) or in a narrow band (sd 0.01), points 0 to
100, a +1000 offset, the exp of a linear predictor, negative scores, integer
scores with massive ties), split over 2 to 6 sites of unequal size, with
unknown labels and tied or continuous times: every figure computed from the
pooled tables must equal the reference computed on the pooled rows within
1e-4. References: sklearn (AUC, Brier, calibration curve), lifelines
(C-index with the score negated, Kaplan-Meier, log-rank), a direct O(n^2)
DeLong on the pooled rows (variance and paired test), and the per-patient
functions of this package that the published-value tests pin (time-dependent
AUC, calibration slope, Hosmer-Lemeshow, net benefit, thresholds).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lifelines import KaplanMeierFitter
from lifelines.statistics import multivariate_logrank_test
from lifelines.utils import concordance_index
from scipy.special import expit
from scipy.stats import norm
from sklearn.calibration import calibration_curve as sk_calibration_curve
from sklearn.metrics import brier_score_loss, roc_auc_score

from hccfed.common.metrics import calibration as CAL
from hccfed.common.metrics import clinical as C
from hccfed.common.metrics import federated_delong as FD
from hccfed.common.metrics import summary_calibration as SCAL
from hccfed.common.metrics import summary_discrimination as SD
from hccfed.common.metrics import summary_survival as SS
from hccfed.common.metrics.summaries import AUC_KEYS, model_summary, pool_summaries
from hccfed.common.metrics.survival_clinical import risk_groups, time_dependent_auc

TOL = 1e-4
KINDS = ("skewed_probability", "narrow_probability", "points_0_100", "offset_1000", "exp_linear_predictor",
         "negative", "integer_ties")


def scores_on_scale(kind: str, lp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(score, predicted probability) of a linear predictor on one of the scales above."""
    if kind == "skewed_probability":  # median expit(-5.5) = 0.004
        p = expit(1.6 * lp - 5.5)
        return p, p
    if kind == "narrow_probability":
        p = 0.3 + 0.01 * lp
        return p, p
    if kind == "points_0_100":
        s = np.round(100 * expit(lp), 1)
        return s, s / 100
    if kind == "offset_1000":
        return lp + 1000.0, expit(lp)
    if kind == "exp_linear_predictor":
        s = np.exp(2.0 * lp)
        return s, 1 - np.exp(-0.1 * s)
    if kind == "negative":
        s = 3.0 * lp - 50.0
        return s, expit(s + 50.0)
    s = np.clip(np.round(lp + 2.0), 0, 4)  # integer scores with massive ties
    return s, (s + 0.5) / 5


def cohort(kind: str, seed: int, n: int, p_unknown: float, tied_times: bool):
    rng = np.random.default_rng(seed)
    truth = rng.normal(size=n)
    y = (rng.random(n) < expit(truth)).astype(int)
    y[:4] = (0, 1, 0, 1)
    y[4:][rng.random(n - 4) < p_unknown] = -1
    s_a, prob = scores_on_scale(kind, truth + rng.normal(0, 0.8, n))
    s_b, _ = scores_on_scale(kind, truth + rng.normal(0, 1.5, n))
    t = rng.exponential(30, n) * np.exp(-0.4 * truth)
    t = np.round(t) if tied_times else t
    e = (rng.random(n) < 0.6).astype(int)
    e[0] = 1
    return y, s_a, s_b, prob, t, e


def unequal_sites(n: int, n_sites: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed + 7)
    cuts = np.sort(rng.choice(np.arange(1, n), n_sites - 1, replace=False))
    return np.split(rng.permutation(n), cuts)


def direct_delong(y: np.ndarray, scores: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(AUCs, covariance matrix) by the psi matrices of the pooled rows (DeLong et al. 1988)."""
    v10, v01 = [], []
    for s in scores:
        a, b = s[y == 1], s[y == 0]
        psi = (a[:, None] > b[None, :]) + 0.5 * (a[:, None] == b[None, :])
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
    v10, v01 = np.array(v10), np.array(v01)
    return v10.mean(axis=1), np.cov(v10) / v10.shape[1] + np.cov(v01) / v01.shape[1]


def outcome(f):
    """f(), or the ValueError class when it raises (both sides must agree)."""
    try:
        return f()
    except ValueError:
        return ValueError


def close(ref, got, what: str) -> None:
    if ref is ValueError or got is ValueError:
        assert ref is got, f"{what}: per patient {ref!r}, from the tables {got!r}"
        return
    if isinstance(ref, dict):
        for key in ref:
            if key in got:
                close(ref[key], got[key], f"{what}.{key}")
        return
    np.testing.assert_allclose(np.asarray(got, float), np.asarray(ref, float), atol=TOL, rtol=0, err_msg=what)


def pooled_tables(y, s_a, s_b, prob, t, e, parts):
    site_a = [model_summary(y[i], s_a[i], prob[i], t[i], e[i]) for i in parts]
    site_b = [model_summary(y[i], s_b[i], prob[i], t[i], e[i]) for i in parts]
    return pool_summaries(site_a), pool_summaries(site_b), site_a, site_b


def check_every_figure(y, s_a, s_b, prob, t, e, parts) -> None:
    m, m_b, site_a, site_b = pooled_tables(y, s_a, s_b, prob, t, e, parts)
    k = y >= 0
    yk, sk, pk = y[k], s_a[k], prob[k]

    # discrimination: sklearn, and DeLong's variance and paired test on the pooled rows
    auc = SD.auc_from_summary(m)
    aucs, cov = direct_delong(yk, [sk, s_b[k]])
    close(roc_auc_score(yk, sk), auc["auc"], "auc")
    close(np.sqrt(cov[0, 0]), auc["se"], "delong se")
    close(aucs[0] - norm.ppf(0.975) * np.sqrt(cov[0, 0]), auc["ci_lower"], "ci lower")
    request = {m_: {kk: v for kk, v in pooled.items() if kk in AUC_KEYS} for m_, pooled in (("a", m), ("b", m_b))}
    answers = [FD.placement_sums(y[i], {"a": s_a[i], "b": s_b[i]},
                                 FD.placement_request(request, {"a": sa, "b": sb}, f"site{j}"))
               for j, (i, sa, sb) in enumerate(zip(parts, site_a, site_b))]
    paired = FD.delong_paired_from_sums(FD.pool_placement_sums(answers), "a", "b")
    var_diff = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    z = (aucs[0] - aucs[1]) / np.sqrt(var_diff) if var_diff > 0 else 0.0
    close(z, paired["z"], "paired z")
    close(2 * norm.sf(abs(z)), paired["p_value"], "paired p")
    fpr_tpr = SD.roc_curve_from_summary(m)
    close(auc["auc"], np.trapezoid(fpr_tpr["tpr"], fpr_tpr["fpr"]), "roc area")

    # operating points: Youden over the distinct scores, metrics at a declared threshold
    close(outcome(lambda: C.youden_threshold(yk, sk)), outcome(lambda: SD.youden_threshold_from_summary(m)), "youden")
    declared = float(np.quantile(sk, 0.6))
    close(C.threshold_metrics(yk, sk, declared), SD.threshold_metrics_from_summary(m, declared), "threshold metrics")

    # survival: lifelines
    close(concordance_index(t, -s_a, e), SD.cindex_from_summary(m)["c_index"], "c-index")
    close(outcome(lambda: time_dependent_auc(t, e, s_a, 24.0)["auc"]),
          outcome(lambda: SS.time_dependent_auc_from_summary(m, 24.0)["auc"]), "td-auc")
    cut = SS.score_quantile_cutpoints(m, (0.5,))
    close(np.median(s_a), cut[0], "median cutpoint")
    groups = risk_groups(s_a, cut)
    for g, curve in enumerate(SS.kaplan_meier_by_group_from_summary(m, cut)):
        if curve["n"] > 0:
            km = KaplanMeierFitter().fit(t[groups == g], e[groups == g])
            close(km.survival_function_at_times(curve["times"]).to_numpy(), curve["survival"], f"km group {g}")
    if len(np.unique(groups)) > 1:
        close(multivariate_logrank_test(t, groups, e).test_statistic, SS.logrank_from_summary(m, cut)["chi2"],
              "logrank")

    # calibration: sklearn, and the per-patient functions pinned to blorr / sklearn
    close(brier_score_loss(yk, pk), SCAL.brier_from_summary(m), "brier")
    curve = SCAL.calibration_curve_from_summary(m, 10)
    prob_true, prob_pred = sk_calibration_curve(yk, pk, n_bins=10, strategy="uniform")
    occupied = curve["count"] > 0
    close(prob_true, curve["observed_rate"][occupied], "calibration curve observed")
    close(prob_pred, curve["mean_predicted"][occupied], "calibration curve predicted")
    close(outcome(lambda: CAL.calibration_intercept_slope(yk, pk)),
          outcome(lambda: SCAL.calibration_intercept_slope_from_summary(m)), "calibration slope")
    close(outcome(lambda: CAL.hosmer_lemeshow(yk, pk)), outcome(lambda: SCAL.hosmer_lemeshow_from_summary(m)),
          "hosmer-lemeshow")
    pts = np.array([0.001, 0.004, 0.01, 0.05, 0.2, 0.3, 0.5, 0.8])
    close(CAL.net_benefit(yk, pk, pts), SCAL.net_benefit_from_summary(m, pts), "net benefit")


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=6)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(30, 260), n_sites=st.integers(2, 6),
       p_unknown=st.sampled_from([0.0, 0.2]), tied_times=st.booleans())
def test_every_pooled_figure_equals_the_pooled_rows(kind, seed, n, n_sites, p_unknown, tied_times) -> None:
    y, s_a, s_b, prob, t, e = cohort(kind, seed, n, p_unknown, tied_times)
    check_every_figure(y, s_a, s_b, prob, t, e, unequal_sites(n, n_sites, seed))


@pytest.mark.parametrize("kind", ["skewed_probability", "integer_ties"])
def test_a_larger_cohort_over_six_unequal_sites(kind) -> None:
    """n = 1500: Hosmer-Lemeshow deciles of risks near 0 no longer collapse into a few bins."""
    y, s_a, s_b, prob, t, e = cohort(kind, 3, 1500, 0.1, False)
    check_every_figure(y, s_a, s_b, prob, t, e, unequal_sites(1500, 6, 3))


def test_pooling_is_the_table_of_the_pooled_rows_in_any_order() -> None:
    y, s_a, _, prob, t, e = cohort("integer_ties", 5, 200, 0.2, True)
    parts = unequal_sites(200, 4, 5)
    sites = [model_summary(y[i], s_a[i], prob[i], t[i], e[i]) for i in parts]
    whole = model_summary(y, s_a, prob, t, e)
    for order in (sites, sites[::-1]):
        pooled = pool_summaries(order)
        assert set(pooled) == set(whole)
        for key in whole:
            np.testing.assert_array_equal(pooled[key], whole[key], err_msg=key)


def test_a_rank_grouped_hosmer_lemeshow_that_the_tables_cannot_split_is_refused() -> None:
    """UtilStat's rank groups split tied risks by row order: with both outcomes tied at a border, refuse."""
    p = np.repeat([0.1, 0.2, 0.3, 0.4, 0.5], 6)  # 30 patients in 10 groups of 3: each tie straddles a border
    y = np.tile([0, 1, 0, 0, 1, 0], 5)
    m = model_summary(y, p, p, np.ones(30), np.zeros(30))
    with pytest.raises(ValueError, match=r"30 patients share 5 risk value\(s\) across a group border"):
        SCAL.hosmer_lemeshow_from_summary(m, 10, grouping="rank")
    # a border tie of one outcome only is split exactly: same as per patient
    y_pure = np.repeat([0, 1, 0, 1, 1], 6)
    m_pure = model_summary(y_pure, p, p, np.ones(30), np.zeros(30))
    close(CAL.hosmer_lemeshow(y_pure, p, grouping="rank"), SCAL.hosmer_lemeshow_from_summary(m_pure, 10, "rank"),
          "rank hl")
