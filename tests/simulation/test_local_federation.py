"""The notebook API: one DataFrame per site in, the pooled statistics out (no Flower)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from combat_reference import pooled_combat
from hccfed.common.schema import early_recurrence_label
from hccfed.simulation.cohort import DEFAULT_SITES, generate_tabular
from hccfed.simulation.local_federation import LocalFederation

COLUMNS = ["age", "log_afp", "tumour_diameter_mm", "male"]


@pytest.fixture(scope="module")
def frames():
    out = {}
    for profile in DEFAULT_SITES:
        frame = generate_tabular(profile, seed=5)[["age", "sex", "afp", "tumour_diameter_mm", "child_pugh",
                                                  "time_months", "event"]].copy()
        frame["log_afp"] = np.log(frame["afp"] + 1.0)
        frame["male"] = (frame["sex"] == "M").astype(float)
        label = early_recurrence_label(frame["time_months"].to_numpy(), frame["event"].to_numpy())
        frame["early"] = np.where(label >= 0, label, np.nan)  # censored before 24 months: no label
        out[profile.site_id] = frame
    return out


@pytest.fixture(scope="module")
def pooled(frames):
    return pd.concat(frames.values(), ignore_index=True)


def test_logistic_is_the_pooled_fit_on_the_original_scale_with_odds_ratios(frames, pooled):
    from sklearn.linear_model import LogisticRegression

    table = LocalFederation(frames, label="early").logistic(COLUMNS)
    labelled = pooled.dropna(subset=["early"])
    ref = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10_000).fit(labelled[COLUMNS], labelled["early"])
    np.testing.assert_allclose(table.loc[COLUMNS, "coef"], ref.coef_[0], rtol=1e-4)
    np.testing.assert_allclose(table["odds_ratio"], np.exp(table["coef"]))
    assert list(table.index) == ["(intercept)", *COLUMNS]
    assert table.attrs["n"] == len(labelled) and table.attrs["n_unlabelled"] == pooled["early"].isna().sum() > 0
    assert {"se", "z", "p", "or_lower", "or_upper"} <= set(table.columns)


def test_cox_and_ttest_equal_lifelines_and_scipy_on_the_pooled_rows(frames, pooled):
    from lifelines import CoxPHFitter

    fed = LocalFederation(frames, label="early", time="time_months", event="event")
    table = fed.cox(COLUMNS)
    ref = CoxPHFitter().fit(pooled[COLUMNS + ["time_months", "event"]], "time_months", "event").summary
    np.testing.assert_allclose(table["coef"], ref.loc[COLUMNS, "coef"], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(table["hr"], ref.loc[COLUMNS, "exp(coef)"], rtol=1e-4)
    np.testing.assert_allclose(table["p"], ref.loc[COLUMNS, "p"], rtol=1e-3, atol=1e-10)
    tests = fed.ttest(["age", "log_afp"])
    labelled = pooled.dropna(subset=["early"])
    welch = stats.ttest_ind(labelled.loc[labelled.early == 1, ["age", "log_afp"]],
                            labelled.loc[labelled.early == 0, ["age", "log_afp"]], equal_var=False)
    np.testing.assert_allclose(tests["p"], welch.pvalue, rtol=1e-8)
    np.testing.assert_allclose(tests["mean_pos"], labelled.loc[labelled.early == 1, ["age", "log_afp"]].mean(),
                               rtol=1e-12)
    np.testing.assert_allclose(fed.mean_sd(["age"])["sd"], pooled["age"].std(), rtol=1e-12)
    np.testing.assert_allclose(fed.correlation(["age", "log_afp"]).to_numpy(),
                               np.corrcoef(pooled[["age", "log_afp"]].T), atol=1e-12)


def test_combat_with_a_categorical_covariate_and_a_reference_site_equals_pooled_combat(frames, pooled):
    features = ["log_afp", "tumour_diameter_mm"]
    fed = LocalFederation(frames)
    result = fed.combat(features, covariates=["age", "sex", "child_pugh"], reference="hospital_b")
    covariates = np.column_stack([pooled["age"], pooled["sex"] == "M", pooled["child_pugh"] == "B",
                                  pooled["child_pugh"] == "C"]).astype(float)
    site = np.concatenate([[s] * len(f) for s, f in frames.items()])
    expected = pooled_combat(pooled[features].to_numpy(float), site, covariates, reference="hospital_b",
                             order=list(frames))
    harmonised = pd.concat(result.frames.values(), ignore_index=True)
    np.testing.assert_allclose(harmonised[features].to_numpy(), expected, rtol=0, atol=1e-10)
    pd.testing.assert_frame_equal(result.frames["hospital_b"], frames["hospital_b"])
    assert frames["hospital_a"]["log_afp"].equals(pooled.loc[site == "hospital_a", "log_afp"].reset_index(drop=True))


def test_lasso_selects_by_federated_cv(frames):
    table = LocalFederation(frames, label="early", n_folds=3).lasso(COLUMNS, n_lambdas=5)
    assert table["selected"].any() and (table.loc[~table["selected"], "coef"] == 0).all()


def test_bad_cells_stop_with_the_site_column_and_row(frames):
    broken = {k: v.copy() for k, v in frames.items()}
    broken["hospital_c"].loc[3, "age"] = np.nan
    with pytest.raises(ValueError, match=r"site hospital_c: column 'age' has a missing or non-numeric value "
                                         r"in row 3 \(nan\)"):
        LocalFederation(broken, label="early").logistic(["age"])
    broken = {k: v.copy() for k, v in frames.items()}
    broken["hospital_a"].loc[0, "early"] = 2
    with pytest.raises(ValueError, match="site hospital_a: label 'early' must be 1, 0 or empty, got 2.0 in row 0"):
        LocalFederation(broken, label="early").logistic(["age"])
    with pytest.raises(ValueError, match="cox needs the time and event"):
        LocalFederation(frames).cox(["age"])
    with pytest.raises(ValueError, match="site hospital_a: no column 'survival'"):
        LocalFederation(frames, time="survival")
