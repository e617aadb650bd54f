"""Federated ComBat equals pooled ComBat (neuroCombat's algorithm) in every variant, keeps the protected
covariates' effects, leaves a reference site untouched, and removes the site signal a classifier finds."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

from combat_reference import pooled_combat
from hccfed.client.stats_site import StatsSite, local_send
from hccfed.common.stats import combat
from hccfed.server.federated_stats import estimate_combat, federated_combat

SIZES = {"north": 130, "east": 47, "south": 76, "west": 11}  # unequal, one small site
P = 7
#: Feature scales unlike the demo's: tiny, unit, radiomics-energy-like, and integer counts (ties).
SCALES = np.array([1e-3, 1.0, 5.0, 40.0, 1e4, 2e6, 1.0])


def _cohort(seed: int = 0, age_confounded: bool = True):
    """Per site: features (n, P) and covariates (n, 4): age (years), male (0/1), grade B, grade C
    (one-hot of a 3-level category without its first level). Site effects on location and scale,
    skewed (log-normal) noise, an age and sex effect, and one integer-valued feature."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, (sid, n) in enumerate(SIZES.items()):
        age = rng.normal(50 + (8 * k if age_confounded else 0), 9, n)
        male = (rng.random(n) < 0.3 + 0.15 * k).astype(float)
        grade = rng.integers(0, 3, n)
        cov = np.column_stack([age, male, grade == 1, grade == 2]).astype(float)
        noise = rng.lognormal(0, 0.5, (n, P)) - np.exp(0.125)  # right-skewed, mean 0
        biology = 0.06 * (age - 55)[:, None] * np.linspace(1, 0.2, P) + 0.7 * male[:, None] - 0.4 * cov[:, 3:4]
        location, scale = rng.normal(0, 1.2, P), np.exp(rng.normal(0, 0.4, P))
        x = (biology + location + scale * noise) * SCALES + 3 * SCALES
        x[:, -1] = np.round(x[:, -1] * 2)  # counts: many ties
        out[sid] = (x, cov)
    return out


def _sites(cohort, with_covariates: bool = True) -> list[StatsSite]:
    sites = []
    for sid, (x, cov) in cohort.items():
        rows = np.column_stack([x, cov]) if with_covariates else x
        names = [f"f{j}" for j in range(P)] + (["age", "male", "grade_b", "grade_c"] if with_covariates else [])
        sites.append(StatsSite(sid, rows, names, np.zeros(len(x)), np.ones(len(x)), np.zeros(len(x))))
    return sites


COVARIATES = list(range(P, P + 4))
VARIANTS = [  # (parametric, mean_only, eb, reference, covariates)
    (True, False, True, None, True),
    (True, False, True, None, False),
    (False, False, True, None, True),
    (True, True, True, None, True),
    (False, True, True, None, True),
    (True, False, False, None, True),
    (True, False, True, "east", True),
    (False, False, True, "south", True),
    (True, True, True, "north", False),
]


@pytest.mark.parametrize("parametric, mean_only, eb, reference, with_covariates", VARIANTS)
def test_federated_combat_equals_pooled_combat(parametric, mean_only, eb, reference, with_covariates):
    cohort = _cohort()
    sites = _sites(cohort)
    estimate = federated_combat(local_send(sites), list(range(P)), COVARIATES if with_covariates else None,
                                parametric, mean_only, eb, reference)
    y = np.concatenate([x for x, _ in cohort.values()])
    cov = np.concatenate([c for _, c in cohort.values()]) if with_covariates else None
    labels = np.concatenate([[sid] * len(x) for sid, (x, _) in cohort.items()])
    expected = pooled_combat(y, labels, cov, parametric, mean_only, eb, reference, order=list(SIZES))
    harmonised = np.concatenate([s.features[:, :P] for s in sites])
    error = np.abs(harmonised - expected).max(axis=0) / y.std(axis=0)
    assert error.max() < 1e-11, error  # measured: below 1e-13 in every variant
    assert not np.allclose(harmonised, y)  # it did something
    assert estimate["method"] == {"parametric": parametric, "mean_only": mean_only, "eb": eb}
    if reference is not None:
        np.testing.assert_array_equal(sites[list(SIZES).index(reference)].features[:, :P], cohort[reference][0])
    for site in sites:  # the covariates themselves are never changed
        np.testing.assert_array_equal(site.features[:, P:], cohort[site.site_id][1])


def _pooled_age_slope(sites_rows) -> float:
    """OLS slope of feature 0 on age over all rows (the between-site part of the age effect included)."""
    x = np.concatenate([r[:, 0] for r in sites_rows])
    age = np.concatenate([r[:, P] for r in sites_rows])
    return float(np.polyfit(age, x, 1)[0])


def test_protected_covariates_keep_the_age_effect_that_plain_combat_removes():
    """Sites differ in age (8 years apart); feature 0 rises with age. ComBat with age protected keeps
    the pooled age slope; without it the between-site age difference is taken for a site effect."""
    cohort = _cohort(1)
    protected, plain = _sites(cohort), _sites(cohort)
    federated_combat(local_send(protected), list(range(P)), COVARIATES)
    federated_combat(local_send(plain), list(range(P)))
    kept = _pooled_age_slope([s.features for s in protected])
    lost = _pooled_age_slope([s.features for s in plain])
    true_slope = 0.06 * SCALES[0]
    assert abs(kept - true_slope) < 0.15 * true_slope
    assert lost < 0.7 * true_slope


def test_site_signal_falls_and_nothing_else_is_needed_from_a_site():
    cohort = _cohort(2, age_confounded=False)
    sites = _sites(cohort)

    def site_accuracy():
        x = np.concatenate([s.features[:, :P] for s in sites])
        x = (x - x.mean(0)) / x.std(0)
        label = np.concatenate([np.full(len(s.features), i) for i, s in enumerate(sites)])
        accuracy = cross_val_score(LogisticRegression(max_iter=5000), x, label, cv=5).mean()
        return accuracy, np.bincount(label).max() / len(label)

    before, chance = site_accuracy()
    federated_combat(local_send(sites), list(range(P)), COVARIATES)
    after, _ = site_accuracy()
    assert before - chance > 0.3
    assert after - chance <= 0.5 * (before - chance)


def test_non_parametric_stays_finite_where_the_direct_likelihood_underflows():
    """A site of 3000 rows: (2 pi d)^(-n/2) underflows to 0 in neuroCombat's direct product (0 / 0);
    the log-likelihood weights here stay finite and harmonise the site means."""
    rng = np.random.default_rng(3)
    scales = rng.uniform(0.5, 2, 12)
    sites = [StatsSite(sid, rng.normal(shift, 1.0, (n, 12)) * scales, [f"f{j}" for j in range(12)],
                       np.zeros(n), np.ones(n), np.zeros(n)) for sid, n, shift in (("a", 3000, 0.0), ("b", 400, 1.5))]
    with np.errstate(all="ignore"):
        direct = pooled_combat(np.concatenate([s.features for s in sites]), np.repeat(["a", "b"], [3000, 400]),
                               parametric=False)
    assert not np.isfinite(direct).all()
    federated_combat(local_send(sites), parametric=False)
    assert np.isfinite(sites[0].features).all() and np.isfinite(sites[1].features).all()
    gap = np.abs(sites[0].features.mean(0) - sites[1].features.mean(0)) / sites[0].features.std(0)
    assert gap.max() < 0.1


def test_errors_name_what_is_wrong():
    cohort = _cohort(4)
    with pytest.raises(ValueError, match="reference site 'nowhere' is not among the sites"):
        estimate_combat(local_send(_sites(cohort)), list(range(P)), reference="nowhere")
    flat = _sites(cohort)
    for site in flat:
        site.features[:, 2] = 7.25
    with pytest.raises(ValueError, match=r"feature column\(s\) \[2\] have no residual variance"):
        estimate_combat(local_send(flat), list(range(P)))
    with pytest.raises(ValueError, match=r"column\(s\) \[7\] are both harmonised and protected"):
        estimate_combat(local_send(_sites(cohort)), list(range(P + 1)), COVARIATES)
    assert estimate_combat(local_send(_sites(cohort)), covariates=COVARIATES)["columns"] == list(range(P))
    with pytest.raises(ValueError, match="at least 2 rows per site"):
        combat.site_adjustment(1.0, np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="needs at least 2"):
        combat.site_adjustment(10.0, np.zeros(1), np.ones(1))
