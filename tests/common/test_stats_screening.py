"""Moments, t tests and correlation from per-site sums equal their pooled versions."""

import numpy as np
import pytest
from scipy import stats

from hccfed.common.stats.moments import add_contributions, correlation, mean_var, moment_contribution
from hccfed.common.stats.screening import correlation_filter, two_sample_tests


def _split(x, cuts=(17, 40)):
    return np.split(x, cuts)


@pytest.mark.parametrize("equal_var", [True, False])
def test_ttests_from_site_sums_equal_scipy(equal_var):
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (70, 5)) * [1, 10, 1e-3, 1, 1e5] + [0, 0, 0, 1e7, 0]  # large offsets on purpose
    y = (rng.random(70) < 0.4).astype(int)
    x[y == 1, 0] += 0.8
    shift = x.mean(0)
    pos = add_contributions([moment_contribution(p[q == 1], shift) for p, q in zip(_split(x), _split(y))])
    neg = add_contributions([moment_contribution(p[q == 0], shift) for p, q in zip(_split(x), _split(y))])
    res = two_sample_tests(pos, neg, equal_var)
    ref = stats.ttest_ind(x[y == 1], x[y == 0], equal_var=equal_var)
    np.testing.assert_allclose(res["t"], ref.statistic, atol=1e-8)
    np.testing.assert_allclose(res["p"], ref.pvalue, atol=1e-8)


def test_mean_var_and_correlation_equal_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 4))
    x[:, 3] = x[:, 0] * 2 + rng.normal(0, 0.1, 40)
    total = add_contributions([moment_contribution(p, cross=True) for p in _split(x, (10, 25))])
    mean, var = mean_var(total)
    np.testing.assert_allclose(mean, x.mean(0), atol=1e-12)
    np.testing.assert_allclose(var, x.var(0, ddof=1), atol=1e-12)
    corr = correlation(total)
    np.testing.assert_allclose(corr, np.corrcoef(x.T), atol=1e-12)
    # feature 3 duplicates feature 0 (r > 0.99): walking 3 first drops 0
    assert list(correlation_filter(corr, [3, 0, 1, 2], 0.8)) == [1, 2, 3]


def test_non_finite_rows_are_rejected():
    with pytest.raises(ValueError, match="NaN"):
        moment_contribution(np.array([[1.0, np.nan]]))
