"""Federated statistics over three in-process sites equal the pooled computations,
and no request or reply carries a patient row or id."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from hccfed.client.stats_site import StatsSite, local_send
from hccfed.common.schema import early_recurrence_label
from hccfed.server import federated_stats as fs
from hccfed.simulation.cohort import DEFAULT_SITES, generate_tabular

NAMES = ["age", "log_afp", "log_diameter", "extra_tumours", "child_pugh", "male"]


def _covariates(table) -> np.ndarray:
    return np.column_stack([
        table["age"].to_numpy(float), np.log(table["afp"].to_numpy(float) + 1.0),
        np.log(table["tumour_diameter_mm"].to_numpy(float)), table["tumour_number"].to_numpy(float) - 1,
        table["child_pugh"].map({"A": 0.0, "B": 1.0, "C": 2.0}).to_numpy(float),
        (table["sex"] == "M").to_numpy(float)])


@pytest.fixture(scope="module")
def cohort():
    """The default synthetic cohort's tabular part (200 / 120 / 80 patients), clinical columns only."""
    out = []
    for profile in DEFAULT_SITES:
        table = generate_tabular(profile, seed=3)
        out.append((profile.site_id, table["patient_id"].to_numpy(), _covariates(table),
                    table["time_months"].to_numpy(float), table["event"].to_numpy(int)))
    return out


def _sites(cohort, **kwargs) -> list[StatsSite]:
    return [StatsSite(sid, x, NAMES, early_recurrence_label(t, e), t, e, **kwargs) for sid, _, x, t, e in cohort]


def _pooled(cohort):
    x = np.concatenate([c[2] for c in cohort])
    t = np.concatenate([c[3] for c in cohort])
    e = np.concatenate([c[4] for c in cohort])
    return x, t, e, early_recurrence_label(t, e)


class Spy:
    """Wraps ``send`` and records every request and reply."""

    def __init__(self, send):
        self.send, self.log = send, []

    def __call__(self, request):
        replies = self.send(request)
        self.log.append((request, replies))
        return replies


def _arrays(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _arrays(v)
    elif isinstance(obj, (list, tuple)):
        arr = np.asarray(obj) if all(np.isscalar(v) for v in obj) else None
        if arr is not None:
            yield arr
        else:
            for v in obj:
                yield from _arrays(v)
    else:
        yield np.asarray(obj)


def _assert_no_rows(log, cohort):
    sizes = {len(c[1]) for c in cohort}
    ids = {str(p) for c in cohort for p in c[1]}
    assert log
    for request, replies in log:
        for message in [request, *replies]:
            for arr in _arrays(message):
                assert not (arr.ndim >= 1 and arr.shape[0] in sizes), f"row-shaped array {arr.shape} in {message}"
                if arr.dtype.kind in "US":
                    assert not ids & {str(v) for v in arr.ravel()}, "a patient id left a site"


def test_logistic_equals_sklearn_and_sends_no_rows(cohort):
    from sklearn.linear_model import LogisticRegression

    spy = Spy(local_send(_sites(cohort)))
    fit = fs.federated_logistic(spy)
    x, _, _, y = _pooled(cohort)
    ref = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10_000).fit(x[y >= 0], y[y >= 0])
    probs = 1 / (1 + np.exp(-(fit["intercept"] + x[y >= 0] @ fit["coef"])))
    assert np.max(np.abs(fit["coef"] - ref.coef_[0])) < 1e-4
    assert abs(fit["intercept"] - ref.intercept_[0]) < 1e-4
    assert np.max(np.abs(probs - ref.predict_proba(x[y >= 0])[:, 1])) < 1e-5  # lbfgs stops near, not at, the optimum
    _assert_no_rows(spy.log, cohort)


def test_logistic_table_on_the_original_scale_equals_the_pooled_fisher_information(cohort):
    """SEs from the inverse Fisher information of the raw design (intercept, raw features) at
    scikit-learn's own fit; Wald p values and odds ratios per unit of each raw feature."""
    from sklearn.linear_model import LogisticRegression

    fit = fs.federated_logistic(local_send(_sites(cohort)), names=NAMES)
    x, _, _, y = _pooled(cohort)
    x, y = x[y >= 0], y[y >= 0]
    ref = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10_000).fit(x, y)
    design = np.column_stack([np.ones(len(x)), x])
    prob = ref.predict_proba(x)[:, 1]
    cov = np.linalg.inv((design * (prob * (1 - prob))[:, None]).T @ design)
    np.testing.assert_allclose(fit["se"], np.sqrt(np.diag(cov)), rtol=1e-4)
    table = fit["table"]
    assert [row["feature"] for row in table] == ["(intercept)", *NAMES] and fit["n"] == len(y)
    for row, b, s in zip(table, np.concatenate([ref.intercept_, ref.coef_[0]]), np.sqrt(np.diag(cov))):
        assert row["coef"] == pytest.approx(b, rel=1e-4, abs=1e-6)
        assert row["odds_ratio"] == pytest.approx(np.exp(b), rel=1e-4)
        assert row["or_lower"] == pytest.approx(np.exp(b - 1.959963984540054 * s), rel=1e-4)
        assert row["p"] == pytest.approx(2 * stats.norm.sf(abs(b / s)), rel=1e-3, abs=1e-12)


def test_cox_equals_lifelines_with_hazard_ratio_table(cohort):
    import pandas as pd
    from lifelines import CoxPHFitter

    spy = Spy(local_send(_sites(cohort)))
    fit = fs.federated_cox(spy, names=NAMES)
    x, t, e, _ = _pooled(cohort)
    frame = pd.DataFrame(x, columns=NAMES).assign(T=t, E=e)
    ref = CoxPHFitter().fit(frame, "T", "E")
    assert np.max(np.abs(fit["coef"] - ref.params_[NAMES].to_numpy())) < 1e-4
    assert np.max(np.abs(fit["se"] - ref.standard_errors_[NAMES].to_numpy())) < 1e-4
    assert abs(fit["loglik"] - ref.log_likelihood_) < 1e-6
    row = fit["table"][2]
    ref_row = ref.summary.loc[NAMES[2]]
    assert row["hr"] == pytest.approx(ref_row["exp(coef)"], rel=1e-4)
    assert row["hr_lower"] == pytest.approx(ref_row["exp(coef) lower 95%"], rel=1e-4)
    assert row["hr_upper"] == pytest.approx(ref_row["exp(coef) upper 95%"], rel=1e-4)
    _assert_no_rows(spy.log, cohort)


def test_cox_breslow_equals_direct_pooled_fit(cohort):
    """Breslow ties against a direct pooled Newton fit on rows (slow obvious reference)."""
    from scipy.optimize import minimize

    fit = fs.federated_cox(local_send(_sites(cohort)), ties="breslow")
    x, t, e, _ = _pooled(cohort)
    xs = (x - x.mean(0)) / x.std(0, ddof=1)

    def negloglik(b):
        eta = xs @ b
        return -sum(eta[i] - np.log(np.exp(eta[t >= t[i]]).sum()) for i in np.flatnonzero(e))

    ref = minimize(negloglik, np.zeros(x.shape[1]), method="BFGS", options={"gtol": 1e-9}).x / x.std(0, ddof=1)
    assert np.max(np.abs(fit["coef"] - ref)) < 1e-4


def test_ttests_and_correlation_equal_pooled(cohort):
    spy = Spy(local_send(_sites(cohort)))
    x, _, _, y = _pooled(cohort)
    for equal_var in (True, False):
        res = fs.federated_ttests(spy, equal_var=equal_var)
        ref = stats.ttest_ind(x[y == 1], x[y == 0], equal_var=equal_var)
        np.testing.assert_allclose(res["t"], ref.statistic, rtol=0, atol=1e-8)
        np.testing.assert_allclose(res["p"], ref.pvalue, rtol=0, atol=1e-8)
    corr = fs.federated_correlation(spy, labelled=True)
    np.testing.assert_allclose(corr, np.corrcoef(x[y >= 0].T), atol=1e-10)
    kept = fs.federated_correlation_filter(spy, [0, 1, 2, 3], order=[0, 1, 2, 3], threshold=0.8)
    assert list(kept) == [0, 1, 2, 3]  # clinical covariates are not collinear
    _assert_no_rows(spy.log, cohort)


def test_elastic_net_cv_matches_sklearn_at_chosen_penalty(cohort):
    from sklearn.linear_model import LogisticRegression

    spy = Spy(local_send(_sites(cohort, n_folds=3)))
    res = fs.federated_elastic_net_cv(spy, l1_ratio=1.0, n_lambdas=6, n_folds=3)
    x, _, _, y = _pooled(cohort)
    xs = (x[y >= 0] - res["mean"]) / res["scale"]
    n = len(xs)
    ref = LogisticRegression(l1_ratio=1.0, solver="saga", C=1.0 / (n * res["lam"]), tol=1e-12,
                             max_iter=200_000).fit(xs, y[y >= 0])
    assert np.all(np.diff(res["lambdas"]) < 0) and np.isfinite(res["cv_deviance"]).all()
    # saga stops at its own tolerance: the coefficients agree to ~1e-5, zeros exactly
    np.testing.assert_allclose(res["beta_std"][1:], ref.coef_[0], atol=1e-4)
    assert set(np.flatnonzero(np.abs(ref.coef_[0]) > 1e-8)) == set(res["selected"])
    _assert_no_rows(spy.log, cohort)


def test_icc_and_combat_send_no_rows(cohort):
    rng = np.random.default_rng(0)
    sites = _sites(cohort)
    for site in sites:
        site.second_reader = site.features + rng.normal(0, 0.1, site.features.shape)
    spy = Spy(local_send(sites))
    res = fs.federated_icc(spy)
    assert res["icc"].shape == (len(NAMES),) and np.all(res["icc"] <= 1)
    fs.federated_combat(spy, [1, 2, 3], covariates=[0, 5], reference="hospital_b")
    fs.federated_combat(spy, [1, 2], covariates=[0], parametric=False, mean_only=True)
    _assert_no_rows(spy.log, cohort)


def _icc31(ratings: np.ndarray) -> np.ndarray:
    """ICC(3,1) of (n, k) ratings per feature (n, k, p), by the two-way ANOVA written out."""
    n, k, _ = ratings.shape
    grand = ratings.mean(axis=(0, 1))
    rows = ratings.mean(axis=1)
    cols = ratings.mean(axis=0)
    ss_rows = k * ((rows - grand) ** 2).sum(axis=0)
    ss_cols = n * ((cols - grand) ** 2).sum(axis=0)
    ss_err = ((ratings - grand) ** 2).sum(axis=(0, 1)) - ss_rows - ss_cols
    msr, mse = ss_rows / (n - 1), ss_err / ((n - 1) * (k - 1))
    return (msr - mse) / (msr + (k - 1) * mse)


def test_icc_over_a_random_subset_of_re_read_patients_equals_the_pooled_subset(cohort):
    """The second reader reads some patients only (NaN rows for the others): the federated ICC is the
    ICC of the pooled re-read patients, however unequal the sites' subsets."""
    rng = np.random.default_rng(1)
    sites = _sites(cohort)
    pooled = []
    for site, read in zip(sites, (30, 7, 55)):
        second = site.features + rng.normal(0, 0.3, site.features.shape) * site.features.std(axis=0)
        chosen = rng.choice(len(site.features), read, replace=False)
        site.second_reader = np.full_like(second, np.nan)
        site.second_reader[chosen] = second[chosen]
        pooled.append(np.stack([site.features[chosen], second[chosen]], axis=1))
    res = fs.federated_icc(local_send(sites))
    np.testing.assert_allclose(res["icc"], _icc31(np.concatenate(pooled)), atol=1e-10)
