"""Per-patient clinical metrics against published values and reference libraries.

References: pROC (aSAH), blorr and UtilStat (Hosmer-Lemeshow), sklearn
(Brier, calibration curve, logistic recalibration), lifelines (Kaplan-Meier,
log-rank), statsmodels (DerSimonian-Laird, numbers pinned below), R's
p.adjust (Holm), and slow obvious implementations (time-dependent AUC, net
benefit). The published figures are also reached through the site summary
tables split over sites (the last section), not only per patient.
Sign convention: higher score = higher risk.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from lifelines import KaplanMeierFitter
from lifelines.statistics import logrank_test as lifelines_logrank
from lifelines.statistics import multivariate_logrank_test
from sklearn.calibration import calibration_curve as sk_calibration_curve
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss

from hccfed.common.metrics import federated_delong as FD
from hccfed.common.metrics.calibration import (
    brier_score,
    calibration_curve,
    calibration_intercept_slope,
    hosmer_lemeshow,
    net_benefit,
)
from hccfed.common.metrics.clinical import delong_paired_test, logit, threshold_metrics, youden_threshold
from hccfed.common.metrics.discrimination import delong_ci
from hccfed.common.metrics.meta_analysis import dersimonian_laird
from hccfed.common.metrics.multiple_testing import holm_adjust
from hccfed.common.metrics.summaries import AUC_KEYS, model_summary, pool_summaries
from hccfed.common.metrics.summary_calibration import hosmer_lemeshow_from_summary
from hccfed.common.metrics.summary_discrimination import auc_from_summary
from hccfed.common.metrics.survival_clinical import (
    kaplan_meier,
    logrank_test,
    risk_groups,
    survival_at,
    time_dependent_auc,
)

REFDATA = Path(__file__).resolve().parents[1] / "data"  # tests/data: public reference data, see its README


def _binary(seed: int, n: int = 300) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    s = np.round(rng.normal(size=n), 1)  # ties
    y = (rng.random(n) < 1 / (1 + np.exp(-(0.3 + 1.2 * s)))).astype(int)
    return y, s, 1 / (1 + np.exp(-s))


def _survival(seed: int, n: int = 200) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Whole-month times with ties, events, tied scores; the last time is censored."""
    rng = np.random.default_rng(seed)
    e = rng.integers(0, 2, n)
    t = np.where(e == 1, rng.integers(1, 30, n), rng.integers(1, 40, n)).astype(float)
    t[0], e[0] = 45.0, 0
    s = np.round(rng.normal(size=n) + 0.7 * e * (t <= 24), 1)
    return t, e, s


def _sites(n: int, k: int) -> list[np.ndarray]:
    """k sites of unequal size over n patients (rows dealt out of order)."""
    order = np.random.default_rng(k).permutation(n)
    return np.split(order, np.sort(np.random.default_rng(k + 1).choice(np.arange(1, n), k - 1, replace=False)))


def _tables(y, score, prob, parts) -> list[dict]:
    n = len(y)
    return [model_summary(np.asarray(y)[i], np.asarray(score)[i], np.asarray(prob)[i], np.ones(n)[i],
                          np.zeros(n)[i]) for i in parts]


# ----------------------------------------------------------------- paired DeLong
def test_paired_delong_matches_published_proc_roc_test_on_asah() -> None:
    """pROC: roc.test(roc(outcome, s100b), roc(outcome, wfns)): Z = -2.209, p = 0.02718."""
    d = pd.read_csv(REFDATA / "asah.csv")
    r = delong_paired_test(d["outcome_poor"], d["s100b"], d["wfns"])
    assert r["auc_a"] == pytest.approx(0.7314, abs=5e-5)
    assert r["auc_b"] == pytest.approx(0.8237, abs=5e-5)
    assert r["z"] == pytest.approx(-2.209, abs=5e-4)
    assert r["p_value"] == pytest.approx(0.02718, abs=5e-6)
    # var_a is delong_ci's variance: pROC ci.auc(s100b) = 0.7314 (0.6301-0.8326)
    auc, se, lo, hi = delong_ci(d["outcome_poor"], d["s100b"])
    assert r["var_a"] == pytest.approx(se**2, rel=1e-12)
    assert (round(lo, 4), round(hi, 4)) == (0.6301, 0.8326)


def test_paired_delong_against_slow_psi_matrices() -> None:
    y, s, _ = _binary(3, 120)
    s2 = np.round(s + np.random.default_rng(4).normal(size=s.size), 1)
    x = np.stack([s, s2])

    def psi(v):
        a, b = v[y == 1], v[y == 0]
        return (a[:, None] > b[None, :]) + 0.5 * (a[:, None] == b[None, :])

    v10 = np.stack([psi(v).mean(axis=1) for v in x])
    v01 = np.stack([psi(v).mean(axis=0) for v in x])
    cov = np.cov(v10) / v10.shape[1] + np.cov(v01) / v01.shape[1]
    z = (v10[0].mean() - v10[1].mean()) / np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    assert delong_paired_test(y, s, s2)["z"] == pytest.approx(z, rel=1e-10)
    same = delong_paired_test(y, s, s)
    assert (same["z"], same["p_value"]) == (0.0, 1.0)


# ----------------------------------------------------------------- thresholds
def test_threshold_metrics_by_hand_and_youden_applied_unchanged() -> None:
    y = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    s = np.array([0.9, 0.7, 0.3, 0.7, 0.2, 0.1, 0.4, 0.5])
    m = threshold_metrics(y, s, 0.5)  # positive iff s >= 0.5: tp 3, fp 1
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (3, 1, 3, 1)
    assert m["sensitivity"] == 0.75 and m["specificity"] == 0.75 and m["ppv"] == 0.75
    assert m["accuracy"] == 0.75 and m["npv"] == 0.75
    # J over all candidate thresholds by brute force
    best = max(np.unique(s), key=lambda c: (threshold_metrics(y, s, c)["sensitivity"]
                                           + threshold_metrics(y, s, c)["specificity"], c))
    assert youden_threshold(y, s) == best == 0.5
    y2, s2, _ = _binary(8)
    t = youden_threshold(*_binary(7)[:2])  # chosen on one set ...
    assert threshold_metrics(y2, s2, t)["tp"] == int(((s2 >= t) & (y2 == 1)).sum())  # ... applied unchanged
    assert np.isnan(threshold_metrics(y, s, 5.0)["ppv"])  # nobody predicted positive
    # a score one ulp below the threshold (a bin mean recomputed from sums) is still positive
    assert threshold_metrics([1, 0], [np.nextafter(0.3, 0), 0.1], 0.3)["tp"] == 1
    assert threshold_metrics([1, 0], [0.2999, 0.1], 0.3)["tp"] == 0


# ----------------------------------------------------------------- calibration
def test_brier_and_calibration_curve_match_sklearn() -> None:
    y, _, p = _binary(0)
    assert brier_score(y, p) == pytest.approx(brier_score_loss(y, p), rel=1e-12)
    curve = calibration_curve(y, p, n_bins=10)
    prob_true, prob_pred = sk_calibration_curve(y, p, n_bins=10, strategy="uniform")
    occupied = curve["count"] > 0
    np.testing.assert_allclose(curve["observed_rate"][occupied], prob_true, rtol=1e-12)
    np.testing.assert_allclose(curve["mean_predicted"][occupied], prob_pred, rtol=1e-12)
    assert curve["count"].sum() == y.size


def test_calibration_slope_matches_unpenalized_sklearn_logistic_regression() -> None:
    rng = np.random.default_rng(5)
    p = rng.uniform(0.02, 0.98, 400)
    y = (rng.random(400) < 1 / (1 + np.exp(-0.6 * logit(p) - 0.3))).astype(int)
    got = calibration_intercept_slope(y, p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn 1.8 deprecates penalty=None in favour of C=inf
        lr = LogisticRegression(penalty=None, tol=1e-12, max_iter=10_000).fit(logit(p)[:, None], y)
    assert got["slope"] == pytest.approx(lr.coef_[0, 0], abs=1e-6)
    assert got["intercept"] == pytest.approx(lr.intercept_[0], abs=1e-6)
    # calibration-in-the-large: the offset model's score equation sum(y - sigmoid(a + logit p)) = 0
    assert np.sum(y - 1 / (1 + np.exp(-(got["citl"] + logit(p))))) == pytest.approx(0.0, abs=1e-8)
    # perfectly calibrated risks drawn from themselves: slope near 1, intercept near 0
    y_cal = (rng.random(400) < p).astype(int)
    assert abs(calibration_intercept_slope(y_cal, p)["slope"] - 1) < 0.35


@pytest.mark.parametrize("through", ["rows", "summaries of four sites"])
def test_hosmer_lemeshow_matches_blorr_published_table(through: str) -> None:
    """blorr snapshot (hsb2, honcomp ~ female + read + science): chi2 5.8839, df 8, p 0.6602."""
    d = pd.read_csv(REFDATA / "hl_hsb2_fitted.csv")
    if through == "rows":
        r = hosmer_lemeshow(d["honcomp"], d["fitted_prob"])
    else:
        r = hosmer_lemeshow_from_summary(pool_summaries(_tables(d["honcomp"], d["fitted_prob"], d["fitted_prob"],
                                                                _sites(len(d), 4))))
    assert round(r["chi2"], 4) == 5.8839 and r["df"] == 8 and round(r["p_value"], 4) == 0.6602
    assert r["n"].tolist() == [20, 21, 19, 22, 18, 20, 20, 21, 19, 20]
    assert r["observed"].tolist() == [0, 1, 0, 2, 2, 4, 9, 9, 13, 13]
    np.testing.assert_allclose(np.round(r["expected"], 2),
                               [0.29, 0.74, 1.05, 2.04, 2.93, 4.47, 6.17, 8.93, 11.16, 15.22])


def test_hosmer_lemeshow_matches_utilstat_and_a_direct_computation() -> None:
    """UtilStat's test: hosmerLemeshowTest(occurred, pred): chi2 28.48646, p 0.0003900657 (rank groups)."""
    d = pd.read_csv(REFDATA / "hl_utilstat_recruitment.csv")
    r = hosmer_lemeshow(d["occurred"], d["pred"], grouping="rank")
    assert r["chi2"] == pytest.approx(28.48646, abs=1e-5)
    assert r["p_value"] == pytest.approx(0.0003900657, rel=1e-5)
    # direct: sort, ten equal groups, sum (O-E)^2 / (n pbar (1 - pbar))
    order = np.argsort(d["pred"].to_numpy(), kind="stable")
    p, y = d["pred"].to_numpy()[order], d["occurred"].to_numpy()[order]
    stat = 0.0
    for chunk in np.array_split(np.arange(p.size), 10):
        n, pbar = chunk.size, p[chunk].mean()
        stat += (y[chunk].sum() - n * pbar) ** 2 / (n * pbar * (1 - pbar))
    assert r["chi2"] == pytest.approx(stat, rel=2e-3)  # array_split differs from ceil() at group borders
    with pytest.raises(ValueError, match="grouping"):
        hosmer_lemeshow(d["occurred"], d["pred"], grouping="deciles")


def test_net_benefit_against_a_loop() -> None:
    y, _, p = _binary(2)
    thresholds = np.array([0.05, 0.1, 0.3, 0.5, 0.8])
    nb = net_benefit(y, p, thresholds)
    for k, pt in enumerate(thresholds):
        tp = sum(1 for yi, pi in zip(y, p) if pi >= pt and yi == 1)
        fp = sum(1 for yi, pi in zip(y, p) if pi >= pt and yi == 0)
        assert nb["model"][k] == pytest.approx(tp / y.size - fp / y.size * pt / (1 - pt), rel=1e-12)
        assert nb["treat_all"][k] == pytest.approx(y.mean() - (1 - y.mean()) * pt / (1 - pt), rel=1e-12)
    assert (nb["treat_none"] == 0).all()
    low = net_benefit(y, p, [1e-9])  # everybody treated: model == treat all
    assert low["model"][0] == pytest.approx(low["treat_all"][0])
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        net_benefit(y, p, [0.0, 0.5])


# ----------------------------------------------------------------- survival
@pytest.mark.parametrize("seed", [0, 1])
def test_kaplan_meier_matches_lifelines(seed: int) -> None:
    t, e, _ = _survival(seed)
    km = kaplan_meier(t, e)
    ref = KaplanMeierFitter().fit(t, e)
    np.testing.assert_allclose(km["survival"], ref.survival_function_at_times(km["times"]).to_numpy(), atol=1e-12)
    table = ref.event_table.loc[km["times"]]
    np.testing.assert_array_equal(km["n_at_risk"], table["at_risk"].to_numpy())
    np.testing.assert_array_equal(km["n_events"], table["observed"].to_numpy())
    assert survival_at(km, [-1.0, 1e6]).tolist() == [1.0, km["survival"][-1]]


@pytest.mark.parametrize("seed", [0, 1])
def test_logrank_matches_lifelines_two_and_three_groups(seed: int) -> None:
    t, e, s = _survival(seed)
    two = risk_groups(s, [0.0])
    ref2 = lifelines_logrank(t[two == 0], t[two == 1], e[two == 0], e[two == 1])
    got2 = logrank_test(t, e, two)
    assert got2["chi2"] == pytest.approx(ref2.test_statistic, rel=1e-10)
    assert got2["p_value"] == pytest.approx(ref2.p_value, rel=1e-8)
    three = risk_groups(s, [-0.5, 0.5])
    ref3 = multivariate_logrank_test(t, three, e)
    got3 = logrank_test(t, e, three)
    assert (got3["chi2"], got3["df"]) == (pytest.approx(ref3.test_statistic, rel=1e-10), 2)


def _slow_td_auc(t, e, s, horizon):
    """Obvious O(n^2) cumulative/dynamic AUC; G by a loop over distinct times (events first)."""
    def g_at(x):
        g = 1.0
        for u in np.unique(t[t <= x]):
            at_risk = np.sum(t >= u) - np.sum((t == u) & (e == 1))
            cens = np.sum((t == u) & (e == 0))
            if at_risk > 0:
                g *= 1 - cens / at_risk
        return g

    num = den = 0.0
    for i in np.flatnonzero((t <= horizon) & (e == 1)):
        w = 1 / g_at(t[i])
        for j in np.flatnonzero(t > horizon):
            num += w * ((s[i] > s[j]) + 0.5 * (s[i] == s[j]))
            den += w
    return num / den


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_time_dependent_auc_matches_slow_implementation(seed: int) -> None:
    # also checked once by hand against sksurv 0.28 cumulative_dynamic_auc (equal to 1e-15)
    t, e, s = _survival(seed, 120)
    assert time_dependent_auc(t, e, s, 24.0)["auc"] == pytest.approx(_slow_td_auc(t, e, s, 24.0), rel=1e-12)


def test_survival_invariances_and_edge_cases() -> None:
    t, e, s = _survival(4)
    base = time_dependent_auc(t, e, s, 24.0)["auc"]
    assert time_dependent_auc(t, e, s * 3 + 1, 24.0)["auc"] == pytest.approx(base)  # monotone score change
    km = kaplan_meier(t, np.zeros_like(e))  # all censored: survival stays 1
    assert (km["survival"] == 1).all()
    with pytest.raises(ValueError, match="cases and controls"):
        time_dependent_auc(t, np.zeros_like(e), s, 24.0)
    with pytest.raises(ValueError, match="two non-empty groups"):
        logrank_test(t, e, np.zeros_like(e))
    with pytest.raises(ValueError, match=">= 0"):
        kaplan_meier(-t, e)


# ----------------------------------------------------------------- edge cases
def test_one_class_and_bad_input_raise_clear_errors() -> None:
    y1 = np.ones(6, int)
    s = np.arange(6.0)
    p = np.linspace(0.1, 0.9, 6)
    for call in (lambda: delong_paired_test(y1, s, s), lambda: youden_threshold(y1, s),
                 lambda: calibration_intercept_slope(y1, p)):
        with pytest.raises(ValueError, match="only one class"):
            call()
    with pytest.raises(ValueError, match="only 0 and 1"):
        brier_score([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        brier_score([0, 1], [0.1, 1.2])
    with pytest.raises(ValueError, match="mismatched"):
        threshold_metrics([0, 1], [0.1, 0.2, 0.3], 0.2)
    with pytest.raises(ValueError, match="perfectly separated"):
        calibration_intercept_slope([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])


def test_dersimonian_laird_matches_statsmodels_combine_effects() -> None:
    """Pinned from statsmodels 0.15 combine_effects(y, v, method_re="dl")."""
    y = np.array([0.71, 0.78, 0.66, 0.82, 0.74])
    v = np.array([0.0025, 0.0016, 0.0036, 0.0012, 0.002])
    r = dersimonian_laird(y, v)
    assert r["estimate"] == pytest.approx(0.753341, abs=1e-6)
    assert r["se"] == pytest.approx(0.026800, abs=1e-6)
    assert (r["ci_lower"], r["ci_upper"]) == (pytest.approx(0.700814, abs=1e-6), pytest.approx(0.805867, abs=1e-6))
    assert r["tau2"] == pytest.approx(0.0015783365, rel=1e-7)
    assert r["i2"] == pytest.approx(0.4459311, rel=1e-6)
    assert r["q"] == pytest.approx(7.2193186, rel=1e-7)
    assert r["fixed_estimate"] == pytest.approx(0.761791, abs=1e-6)
    homogeneous = dersimonian_laird([0.7, 0.7, 0.7], [0.01, 0.02, 0.03])
    assert homogeneous["tau2"] == 0 and homogeneous["i2"] == 0
    with pytest.raises(ValueError, match="at least 2"):
        dersimonian_laird([0.7], [0.01])


def test_holm_matches_r_p_adjust() -> None:
    """R: p.adjust(c(0.01, 0.04, 0.03, 0.005, 0.5), "holm") = 0.04 0.09 0.09 0.025 0.5."""
    np.testing.assert_allclose(holm_adjust([0.01, 0.04, 0.03, 0.005, 0.5]), [0.04, 0.09, 0.09, 0.025, 0.5])
    adjusted = holm_adjust([0.2, np.nan, 0.01])  # a test not computed does not count
    assert np.isnan(adjusted[1]) and adjusted.tolist()[::2] == [0.2, 0.02]


# ----------------------------------------------------------------- the published figures through the summaries
def test_proc_asah_auc_ci_and_roc_test_through_three_sites() -> None:
    """pROC: AUC 0.7314 (0.6301-0.8326) for s100b; roc.test(s100b, wfns): Z = -2.209, p = 0.02718."""
    d = pd.read_csv(REFDATA / "asah.csv")
    y, parts = d["outcome_poor"].to_numpy(), _sites(len(d), 3)
    sites = {m: _tables(y, d[m], np.full(len(d), 0.5), parts) for m in ("s100b", "wfns")}
    pooled = {m: pool_summaries(t) for m, t in sites.items()}
    auc = auc_from_summary(pooled["s100b"])
    assert round(auc["auc"], 4) == 0.7314 and (round(auc["ci_lower"], 4), round(auc["ci_upper"], 4)) == (0.6301, 0.8326)
    scores = {m: {k: v for k, v in pooled[m].items() if k in AUC_KEYS} for m in pooled}
    answers = [FD.placement_sums(y[i], {m: d[m].to_numpy()[i] for m in scores},
                                 FD.placement_request(scores, {m: sites[m][j] for m in scores}, f"site {j}"))
               for j, i in enumerate(parts)]
    r = FD.delong_paired_from_sums(FD.pool_placement_sums(answers), "s100b", "wfns")
    assert r["z"] == pytest.approx(-2.209, abs=5e-4) and r["p_value"] == pytest.approx(0.02718, abs=5e-6)


def test_utilstat_hosmer_lemeshow_of_risks_near_zero_through_three_sites() -> None:
    """UtilStat: chi2 28.48646 (rank groups) on 26 248 risks with median 0.004, where fixed bins collapsed."""
    d = pd.read_csv(REFDATA / "hl_utilstat_recruitment.csv")
    pooled = pool_summaries(_tables(d["occurred"], d["pred"], d["pred"], _sites(len(d), 3)))
    r = hosmer_lemeshow_from_summary(pooled, 10, grouping="rank")
    assert r["chi2"] == pytest.approx(28.48646, abs=1e-5)
    assert r["p_value"] == pytest.approx(0.0003900657, rel=1e-5)
    per_patient = hosmer_lemeshow(d["occurred"], d["pred"])  # quantile groups: the default figure
    assert hosmer_lemeshow_from_summary(pooled)["chi2"] == pytest.approx(per_patient["chi2"], abs=1e-9)
