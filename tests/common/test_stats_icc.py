"""ICC from additive per-site sums equals the two-way ANOVA ICC computed directly on pooled ratings."""

import numpy as np
import pytest

from hccfed.common.stats.icc import icc_contribution, icc_from_sums
from hccfed.common.stats.moments import add_contributions


def _reference(r: np.ndarray, kind: str) -> np.ndarray:
    """Shrout & Fleiss mean squares from residuals (the formulas pingouin uses), one feature at a time."""
    n, k, p = r.shape
    out = np.empty(p)
    for j in range(p):
        x = r[:, :, j]
        grand = x.mean()
        msr = k * ((x.mean(1) - grand) ** 2).sum() / (n - 1)
        msc = n * ((x.mean(0) - grand) ** 2).sum() / (k - 1)
        resid = x - x.mean(1, keepdims=True) - x.mean(0, keepdims=True) + grand
        mse = (resid ** 2).sum() / ((n - 1) * (k - 1))
        out[j] = ((msr - mse) / (msr + (k - 1) * mse) if kind == "icc3"
                  else (msr - mse) / (msr + (k - 1) * mse + k * (msc - mse) / n))
    return out


@pytest.mark.parametrize("kind", ["icc3", "icc2"])
def test_icc_from_site_sums_equals_pooled(kind):
    rng = np.random.default_rng(1)
    truth = rng.normal(0, 1, (53, 1, 4)) * np.array([1.0, 3.0, 0.2, 1e4])
    ratings = truth + rng.normal(0, 0.5, (53, 2, 4)) + np.array([0.0, 0.3])[None, :, None]
    ratings[..., 3] += 1e6  # large offset: needs the shift to keep digits
    shift = ratings.mean(axis=(0, 1))
    parts = [icc_contribution(ratings[s], shift) for s in (slice(0, 20), slice(20, 41), slice(41, None))]
    np.testing.assert_allclose(icc_from_sums(add_contributions(parts), kind), _reference(ratings, kind),
                               atol=1e-10)


def test_icc_is_one_for_identical_readers_and_rejects_bad_kind():
    x = np.random.default_rng(2).normal(size=(10, 1, 3))
    total = icc_contribution(np.concatenate([x, x], axis=1))
    np.testing.assert_allclose(icc_from_sums(total), 1.0)
    with pytest.raises(ValueError, match="kind"):
        icc_from_sums(total, "icc1")
