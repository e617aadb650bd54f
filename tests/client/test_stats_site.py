"""The site side of federated statistics: input errors name the site and feature; folds are local and stable."""

import numpy as np
import pytest

from hccfed.client.stats_site import StatsSite, assign_folds


def test_non_finite_feature_is_named_and_unknown_op_rejected():
    x = np.ones((5, 2))
    x[3, 1] = np.nan
    with pytest.raises(ValueError, match="site h1: feature 'b' of row 3"):
        StatsSite("h1", x, ["a", "b"], np.zeros(5), np.ones(5), np.zeros(5))
    site = StatsSite("h1", np.ones((5, 2)), ["a", "b"], np.zeros(5), np.ones(5), np.zeros(5))
    with pytest.raises(ValueError, match="unknown statistics request op 'rows'"):
        site.handle({"op": "rows"})


def test_folds_are_stratified_seeded_and_skip_unlabelled():
    labels = np.array([1] * 10 + [0] * 15 + [-1] * 3)
    folds = assign_folds(labels, 5, seed=3, site_id="h1")
    np.testing.assert_array_equal(folds, assign_folds(labels, 5, seed=3, site_id="h1"))
    assert (folds[labels == -1] == -1).all()
    assert all(np.sum((folds == f) & (labels == 1)) == 2 for f in range(5))
