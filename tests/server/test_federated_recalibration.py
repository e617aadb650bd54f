"""The server's recalibrated test figures (server/federated_eval.py) from the tables the sites send.

Three unequal sites evaluate an overconfident model with the site's own functions
(client/evaluation.py): validation score tables and test clinical summaries. The recalibration is fitted
on the pooled validation tables only, and the recalibrated figures are the per-patient figures
(common/metrics/calibration.py) of the recalibrated test rows; what cannot be fitted is an error entry.
"""

import json

import numpy as np
import pytest
from scipy.special import expit

from hccfed.client.evaluation import clinical_summary, evaluation_summary
from hccfed.common.metrics import calibration as rows_cal
from hccfed.common.metrics.recalibration import Recalibration, fit_recalibration
from hccfed.common.metrics.summaries import class_table
from hccfed.server.federated_eval import pooled_clinical_figures, pooled_score_table, recalibrated_clinical_figures, \
    score_table_arrays

SIZES = {"validation": (5, 30, 120), "test": (9, 45, 200)}


def _site(rng, n):
    true = rng.standard_t(4, n) - 0.5
    logits = np.round(2.2 * true, 3)  # overconfident, with ties
    labels = (rng.random(n) < expit(true)).astype(float)
    labels[rng.random(n) < 0.1] = -1  # censored before 24 months: no binary label
    times = rng.exponential(24, n).round(1)
    events = (rng.random(n) < 0.5).astype(float)
    return labels, logits, np.round(logits / 3, 2), times, events


def _sites(seed):
    rng = np.random.default_rng(seed)
    return {split: [_site(rng, n) for n in sizes] for split, sizes in SIZES.items()}


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_recalibrated_figures_are_fitted_on_validation_and_are_those_of_the_recalibrated_test_rows(method):
    sites = _sites(5)
    validation = [evaluation_summary(logit, risk, y, t, e) for y, logit, risk, t, e in sites["validation"]]
    test = [clinical_summary(logit, risk, y, t, e) for y, logit, risk, t, e in sites["test"]]
    out = recalibrated_clinical_figures(test, validation, method=method, threshold=0.25,
                                        threshold_source="validation (Youden)")
    assert "error" not in out and out["method"] == method
    y_val = np.concatenate([s[0] for s in sites["validation"]])
    s_val = np.concatenate([s[1] for s in sites["validation"]])
    known = y_val >= 0
    assert out["fitted_on"] == {"n_patients": int(known.sum()), "n_positive": int((y_val == 1).sum()),
                                "n_negative": int((y_val == 0).sum())}
    expected = fit_recalibration(*class_table(y_val, s_val), method=method)  # the validation rows, never the test
    assert Recalibration.from_json(json.dumps(out["params"])) == expected
    assert out["description"] == expected.describe()

    y = np.concatenate([s[0] for s in sites["test"]])
    logits = np.concatenate([s[1] for s in sites["test"]])
    keep = y >= 0
    y, probs = y[keep], expected.apply(logits[keep])
    figures = out["figures"]
    assert figures["brier"] == pytest.approx(rows_cal.brier_score(y, probs), abs=1e-12)
    rows = rows_cal.calibration_intercept_slope(y, probs)
    for key in ("intercept", "slope", "citl"):
        assert figures["calibration"][key] == pytest.approx(rows[key], rel=1e-7, abs=1e-7), key
    raw = pooled_clinical_figures(test, threshold=0.25, threshold_source="validation (Youden)")
    assert raw["calibration"]["slope"] < 0.7
    if method == "platt":  # the overconfident model comes closer to calibrated on new patients (isotonic risks of
        # exactly 0 or 1 at the ends make a logistic slope, on logits clipped at 1e-12, say little)
        assert abs(figures["calibration"]["slope"] - 1) < abs(raw["calibration"]["slope"] - 1) / 3
    for key in ("auc", "c_index", "threshold", "risk_groups"):  # the scores are unchanged, so is what they give
        assert figures[key] == raw[key], key
    assert figures["threshold"]["threshold"] == 0.25


def test_a_pooled_validation_table_as_lists_gives_the_same_recalibration():
    sites = _sites(6)
    validation = [evaluation_summary(logit, risk, y, t, e) for y, logit, risk, t, e in sites["validation"]]
    test = [clinical_summary(logit, risk, y, t, e) for y, logit, risk, t, e in sites["test"]]
    table = json.loads(json.dumps(pooled_score_table(validation)))  # what a checkpoint keeps
    assert recalibrated_clinical_figures(test, [score_table_arrays(table)]) == recalibrated_clinical_figures(
        test, validation)


def test_what_cannot_be_fitted_is_an_error_entry_not_an_exception():
    sites = _sites(7)
    test = [clinical_summary(logit, risk, y, t, e) for y, logit, risk, t, e in sites["test"]]
    negatives_only = [evaluation_summary(logit, risk, np.zeros_like(y), t, e)
                      for y, logit, risk, t, e in sites["validation"]]
    out = recalibrated_clinical_figures(test, negatives_only)
    assert set(out) == {"method", "error"} and "both classes" in out["error"]
    y, logit, risk, t, e = sites["validation"][2]
    separated = [evaluation_summary(logit, risk, (logit > np.median(logit)).astype(float), t, e)]
    out = recalibrated_clinical_figures(test, separated, method="platt")
    assert "separate the classes" in out["error"]
    assert "error" not in recalibrated_clinical_figures(test, separated, method="isotonic")
    with pytest.raises(ValueError, match="must be one of"):  # a caller's mistake, not the data's
        recalibrated_clinical_figures(test, separated, method="beta")
