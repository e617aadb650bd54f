"""Pure regression math: edge cases and invariances of the logistic and Cox pieces."""

import numpy as np
import pytest

from hccfed.common.stats import cox, regression
from hccfed.common.stats.moments import add_contributions


def _cox_fit(x, t, e, ties, width=0.1):
    grid = np.flatnonzero(cox.event_histogram(t, e, width, 200.0))
    beta = np.zeros(x.shape[1])
    for _ in range(30):
        total = add_contributions([cox.cox_contribution(x[s], t[s], e[s], beta, grid, width)
                                   for s in (slice(0, 30), slice(30, None))])
        _, grad, hess = cox.partial_likelihood(total, beta, ties)
        beta = beta + np.linalg.solve(hess, grad)
    return beta


def test_penalised_step_without_penalty_is_the_newton_step():
    rng = np.random.default_rng(0)
    xd = np.column_stack([np.ones(50), rng.normal(size=(50, 3))])
    y = (rng.random(50) < 0.4).astype(float)
    beta = np.array([0.1, -0.2, 0.3, 0.0])
    total = regression.logistic_contribution(xd, y, beta)
    np.testing.assert_allclose(regression.penalised_quadratic_step(total, beta, 0.0, 1.0),
                               regression.newton_step(total, beta), atol=1e-10)
    assert regression.penalised_quadratic_step(total, beta, 10.0, 1.0)[1:].tolist() == [0.0, 0.0, 0.0]


def test_cox_ties_agree_without_ties_and_shifting_times_changes_nothing():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 2))
    t = np.round(rng.permutation(600)[:60] / 10 + 0.1, 1)  # distinct times on the 0.1 grid
    e = (rng.random(60) < 0.7).astype(int)
    efron, breslow = _cox_fit(x, t, e, "efron"), _cox_fit(x, t, e, "breslow")
    np.testing.assert_allclose(efron, breslow, atol=1e-10)
    np.testing.assert_allclose(_cox_fit(x, t + 5.0, e, "efron"), efron, atol=1e-10)


def test_event_outside_grid_and_bad_ties_are_rejected():
    with pytest.raises(ValueError, match="max_months"):
        cox.event_histogram([300.0], [1], 0.1, 240.0)
    total = cox.cox_contribution(np.zeros((2, 1)), [1.0, 2.0], [1, 0], [0.0], [10], 0.1)
    with pytest.raises(ValueError, match="ties"):
        cox.partial_likelihood(total, np.zeros(1), "exact")
