"""Recalibration fitted on score tables (common/metrics/recalibration.py) against the pooled rows.

Three unequal sites (7, 40 and 300 patients) with heavy-tailed scores at scales 1e-3 to 1e4, many ties
and integer scores: the Platt fit on the pooled table is the MLE of the pooled rows (sklearn's Newton
solver, and the score equations on the rows), the isotonic fit is sklearn's IsotonicRegression on the
rows (breakpoints and predictions), and a recalibrated probability table gives the per-patient
figures (common/metrics/calibration.py) of the recalibrated rows.
"""

import json
import warnings

import numpy as np
import pytest
from scipy.special import expit
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression

from hccfed.common.metrics import calibration as rows_cal
from hccfed.common.metrics import summary_calibration as table_cal
from hccfed.common.metrics.recalibration import (
    Recalibration,
    fit_isotonic_from_table,
    fit_platt_from_table,
    fit_recalibration,
    logit_of_prob,
    recalibrate_prob_table,
)
from hccfed.common.metrics.summaries import AUC_KEYS, check_summary, class_table, model_summary, pool_summaries

SITE_SIZES = (7, 40, 300)
SCALES = (1e-3, 1.0, 1e4)


def _sites(seed: int, scale: float, integer: bool = False, true_slope: float = 0.6):
    """(labels, scores) of three unequal sites: Student-t scores (df 2, heavy tails), each site shifted, rounded
    to a grid (ties of both outcomes) or to integers; outcomes drawn from a logistic model of the score."""
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(SITE_SIZES):
        z = rng.standard_t(2, n) + 0.3 * i
        z = np.round(z) if integer else np.round(z, 1)
        y = (rng.random(n) < expit(-0.4 + true_slope * z)).astype(float)
        out.append((y, z * (1.0 if integer else scale)))
    return out


def _pooled_table(sites):
    tables = [dict(zip(AUC_KEYS, class_table(y, s))) for y, s in sites]
    pooled = pool_summaries(tables)
    return pooled["auc_value"], pooled["auc_pos"], pooled["auc_neg"]


def _rows(sites):
    return np.concatenate([y for y, _ in sites]), np.concatenate([s for _, s in sites])


def _sklearn_logistic(y, s):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter of a solver already at machine precision
        fit = LogisticRegression(C=np.inf, solver="newton-cholesky", tol=1e-14, max_iter=1000).fit(s[:, None], y)
    return float(fit.intercept_[0]), float(fit.coef_[0, 0])


CASES = [pytest.param(scale, False, id=f"scale-{scale:g}") for scale in SCALES] + [
    pytest.param(1.0, True, id="integer-scores")]


@pytest.mark.parametrize("scale, integer", CASES)
def test_platt_on_the_pooled_table_is_the_mle_of_the_pooled_rows(scale, integer):
    sites = _sites(11, scale, integer)
    y, s = _rows(sites)
    assert np.unique(s).size < s.size / 3  # many ties
    fit = fit_platt_from_table(*_pooled_table(sites))
    assert fit == fit_platt_from_table(*class_table(y, s))  # pooled table == table of the pooled rows
    assert (fit["n_positive"], fit["n_negative"]) == (int(y.sum()), int((1 - y).sum()))
    a, b = _sklearn_logistic(y, s)
    assert fit["intercept"] == pytest.approx(a, rel=1e-8, abs=1e-8)
    assert fit["slope"] == pytest.approx(b, rel=1e-8)
    # The score equations of the pooled rows' likelihood hold (scaled by the score's spread).
    residual = y - expit(fit["intercept"] + fit["slope"] * s)
    assert abs(residual.sum()) < 1e-8 * y.size
    assert abs(np.dot(residual, s / np.std(s))) < 1e-8 * y.size


@pytest.mark.parametrize("scale, integer", CASES)
def test_isotonic_on_the_pooled_table_is_sklearns_on_the_pooled_rows(scale, integer):
    sites = _sites(12, scale, integer)
    y, s = _rows(sites)
    fit = fit_isotonic_from_table(*_pooled_table(sites))
    reference = IsotonicRegression(out_of_bounds="clip", increasing=True).fit(s, y)
    np.testing.assert_array_equal(fit["thresholds"], reference.X_thresholds_)
    np.testing.assert_allclose(fit["probabilities"], reference.y_thresholds_, rtol=0, atol=1e-15)
    assert len(fit["thresholds"]) < np.unique(s).size  # pooling merged violators and the trim dropped points
    distinct = np.unique(s)
    step = np.diff(distinct).min()
    queries = np.concatenate([s, (distinct[:-1] + distinct[1:]) / 2,  # between the fitted scores
                              distinct[:-1] + 0.3 * np.diff(distinct),
                              [distinct[0] - 5 * step, distinct[0] - 1e3 * scale, distinct[-1] + 1e3 * scale]])
    recal = Recalibration(**fit)
    np.testing.assert_allclose(recal.apply(queries), reference.predict(queries), rtol=0, atol=1e-14)
    np.testing.assert_array_equal(recal.apply([-np.inf, np.inf]), reference.predict([distinct[0], distinct[-1]]))


def _clinical_site(seed: int, n: int, overconfidence: float = 2.5):
    """One site's rows: labels, logits of an overconfident model (true logit x ``overconfidence``), times,
    events; logits within +-15, where sigmoid keeps the logit to 1e-9 (see logit_of_prob)."""
    rng = np.random.default_rng(seed)
    true = rng.standard_t(3, n) * 1.2 - 0.3
    logits = np.clip(np.round(overconfidence * true, 2), -15, 15)  # ties; the clip only bounds the test's range
    y = (rng.random(n) < expit(true)).astype(float)
    times = rng.exponential(20, n).round(1)
    events = (rng.random(n) < 0.6).astype(float)
    return y, logits, times, events


def _clinical_sites(seed: int):
    return [_clinical_site(seed + i, n) for i, n in enumerate(SITE_SIZES)]


def _summaries(sites):
    return [model_summary(y, logit, expit(logit), t, e) for y, logit, t, e in sites]


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_a_recalibrated_prob_table_gives_the_figures_of_the_recalibrated_rows(method):
    validation, test = _clinical_sites(40), _clinical_sites(50)
    y_val, s_val = np.concatenate([v[0] for v in validation]), np.concatenate([v[1] for v in validation])
    recal = fit_recalibration(*class_table(y_val, s_val), method=method)
    pooled = pool_summaries(_summaries(test))
    recalibrated = recalibrate_prob_table(pooled, recal)
    check_summary(recalibrated)
    assert recalibrated["prob_pos"].dtype == np.int64 and recalibrated["prob_neg"].dtype == np.int64
    for key in pooled:
        if not key.startswith("prob_"):
            np.testing.assert_array_equal(recalibrated[key], pooled[key], err_msg=key)
    y, logits = np.concatenate([t[0] for t in test]), np.concatenate([t[1] for t in test])
    # The table of the recalibrated rows (the risk's logit recovered as the table does), to the bit...
    table = class_table(y, recal.apply(logit_of_prob(expit(logits))))
    for key, expected in zip(("prob_value", "prob_pos", "prob_neg"), table):
        np.testing.assert_array_equal(recalibrated[key], expected, err_msg=key)
    # ...and the per-patient figures of the rows recalibrated from their logits.
    probs = recal.apply(logits)
    assert table_cal.brier_from_summary(recalibrated) == pytest.approx(rows_cal.brier_score(y, probs), abs=1e-12)
    got = table_cal.calibration_intercept_slope_from_summary(recalibrated)
    expected = rows_cal.calibration_intercept_slope(y, probs)
    for key in ("intercept", "slope", "citl"):
        assert got[key] == pytest.approx(expected[key], rel=1e-7, abs=1e-7), key
    # Recalibrating the sites' tables one by one and pooling them is recalibrating the pooled table.
    by_site = pool_summaries([recalibrate_prob_table(m, recal) for m in _summaries(test)])
    for key in ("prob_value", "prob_pos", "prob_neg"):
        np.testing.assert_array_equal(by_site[key], recalibrated[key], err_msg=key)


def test_platt_fitted_and_evaluated_on_the_same_patients_is_calibrated_in_slope_and_intercept():
    sites = _clinical_sites(60)
    pooled = pool_summaries(_summaries(sites))
    before = table_cal.calibration_intercept_slope_from_summary(pooled)
    assert before["slope"] < 0.6  # the overconfident model: the property below is not met by chance
    recal = fit_recalibration(pooled["auc_value"], pooled["auc_pos"], pooled["auc_neg"], "platt")
    after = table_cal.calibration_intercept_slope_from_summary(recalibrate_prob_table(pooled, recal))
    assert after["slope"] == pytest.approx(1.0, abs=1e-6)
    assert after["intercept"] == pytest.approx(0.0, abs=1e-6)
    assert after["citl"] == pytest.approx(0.0, abs=1e-6)


def test_probabilities_of_exactly_0_and_1_follow_the_infinite_scores():
    summary = {"prob_value": np.array([0.0, 0.25, 0.5, 1.0]), "prob_pos": np.array([0, 1, 2, 3]),
               "prob_neg": np.array([4, 3, 1, 1]),
               "auc_value": np.array([-3.0, 1.0]), "auc_pos": np.array([2, 4]), "auc_neg": np.array([5, 4])}
    rising = recalibrate_prob_table(summary, Recalibration("platt", intercept=0.5, slope=2.0))
    np.testing.assert_array_equal(rising["prob_value"][[0, -1]], [0.0, 1.0])
    np.testing.assert_allclose(rising["prob_value"][1:-1], expit(0.5 + 2.0 * logit_of_prob([0.25, 0.5])))
    falling = recalibrate_prob_table(summary, Recalibration("platt", intercept=0.5, slope=-2.0))
    np.testing.assert_array_equal(falling["prob_value"][[0, -1]], [0.0, 1.0])  # p = 1 became risk 0: re-sorted
    np.testing.assert_array_equal(falling["prob_pos"], [3, 2, 1, 0])
    np.testing.assert_array_equal(falling["prob_neg"], [1, 1, 3, 4])
    flat = recalibrate_prob_table(summary, Recalibration("isotonic", thresholds=[-1.0, 0.5], probabilities=[0.2, 0.7]))
    np.testing.assert_array_equal(flat["prob_value"], [0.2, np.interp(0.0, [-1.0, 0.5], [0.2, 0.7]), 0.7])
    np.testing.assert_array_equal(flat["prob_pos"], [1, 2, 3])  # 0 and 0.25 (logit -1.1) share the first risk
    np.testing.assert_array_equal(flat["prob_neg"], [7, 1, 1])
    for out in (rising, falling, flat):
        assert out["auc_value"] is summary["auc_value"] and check_summary(out) == ["auc", "prob"]


def test_recalibrating_a_summary_without_a_probability_table_is_refused():
    with pytest.raises(ValueError, match="probability table"):
        recalibrate_prob_table({k: np.array([0, 1]) for k in AUC_KEYS}, Recalibration("platt", 0.0, 1.0))


@pytest.mark.parametrize("fit", [fit_platt_from_table, fit_isotonic_from_table])
def test_one_class_is_refused_by_name(fit):
    with pytest.raises(ValueError, match=r"both classes: the score table holds 0 positive\(s\) and 9"):
        fit([0.1, 0.2, 0.5], [0, 0, 0], [3, 2, 4])


@pytest.mark.parametrize("value, pos, neg", [
    pytest.param([-2.0, -1.0, 3.0, 4.0], [0, 0, 2, 1], [3, 1, 0, 0], id="complete"),
    pytest.param([-2.0, -1.0, 3.0, 4.0], [0, 1, 2, 1], [3, 1, 0, 0], id="quasi-complete (a tie at the border)"),
    pytest.param([-2.0, -1.0, 3.0, 4.0], [3, 1, 0, 0], [0, 0, 2, 1], id="reversed"),
])
def test_separated_scores_have_no_platt_estimate_and_say_so(value, pos, neg):
    with pytest.raises(ValueError, match="no maximum-likelihood estimate: the scores separate the classes"):
        fit_platt_from_table(value, pos, neg)
    assert Recalibration(**fit_isotonic_from_table(value, pos, neg)).method == "isotonic"  # isotonic still fits


def test_a_single_distinct_score_has_no_platt_slope():
    with pytest.raises(ValueError, match="at least two distinct scores"):
        fit_platt_from_table([0.7], [3], [4])


def test_a_table_that_is_not_a_table_is_refused():
    with pytest.raises(ValueError, match="strictly ascending"):
        fit_platt_from_table([0.3, 0.1], [1, 1], [1, 1])
    with pytest.raises(ValueError, match="recalibration method must be one of"):
        fit_recalibration([0.1, 0.3], [1, 1], [1, 1], method="beta")


def test_a_recalibration_travels_as_plain_json_and_describes_itself():
    sites = _sites(13, 1.0)
    for method in ("platt", "isotonic"):
        recal = fit_recalibration(*_pooled_table(sites), method=method)
        text = recal.to_json()
        raw = json.loads(text)
        assert raw["method"] == method and raw["n_positive"] + raw["n_negative"] == sum(SITE_SIZES)
        back = Recalibration.from_json(text)
        assert back == recal
        scores = np.linspace(-20, 20, 101)
        np.testing.assert_array_equal(back.apply(scores), recal.apply(scores))
        assert recal.describe().startswith({"platt": "Platt scaling", "isotonic": "isotonic regression"}[method])
        assert f"fitted on {sum(SITE_SIZES)} patients" in recal.describe()
    with pytest.raises(ValueError, match="no keys"):
        Recalibration.from_json(json.dumps({"method": "platt", "intercept": 0.0, "slope": 1.0, "scale": 2}))
    with pytest.raises(ValueError, match="non-decreasing"):
        Recalibration("isotonic", thresholds=[0.0, 1.0], probabilities=[0.6, 0.4])
    with pytest.raises(ValueError, match="finite intercept and slope"):
        Recalibration("platt", intercept=0.0, slope=float("inf"))
    with pytest.raises(ValueError, match="NaN"):
        Recalibration("platt", intercept=0.0, slope=1.0).apply([0.0, np.nan])
