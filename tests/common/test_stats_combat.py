"""ComBat from per-site sums removes most of the site signal a classifier can find."""

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

from hccfed.client.stats_site import StatsSite, local_send
from hccfed.server.federated_stats import federated_combat


def _sites(rng):
    sites, truth = [], []
    for s, n in enumerate((90, 70, 50)):
        biology = rng.normal(0, 1, (n, 12))
        loc = rng.normal(0, 0.8, 12)  # scanner offsets per feature
        scale = np.exp(rng.normal(0, 0.3, 12))
        y = (biology[:, 0] + rng.normal(0, 1, n) > 0).astype(int)
        x = biology * scale + loc + 0.7 * y[:, None] * (np.arange(12) < 3)
        sites.append(StatsSite(f"site{s}", x, [f"f{j}" for j in range(12)], y, np.ones(n), np.zeros(n),
                               covariates=y[:, None].astype(float)))
        truth.append(y)
    return sites


def _site_accuracy(sites):
    x = np.concatenate([s.features for s in sites])
    site = np.concatenate([np.full(len(s.features), i) for i, s in enumerate(sites)])
    return cross_val_score(LogisticRegression(max_iter=2000), x, site, cv=5).mean(), np.bincount(site).max() / len(site)


def test_combat_halves_the_site_classifier_margin_and_keeps_the_label_effect():
    sites = _sites(np.random.default_rng(4))
    before, chance = _site_accuracy(sites)
    label_gap_before = np.mean([s.features[s.labels == 1, 0].mean() - s.features[s.labels == 0, 0].mean()
                                for s in sites])
    result = federated_combat(local_send(sites))
    after, _ = _site_accuracy(sites)
    assert before - chance > 0.3
    assert after - chance <= 0.5 * (before - chance)
    label_gap_after = np.mean([s.features[s.labels == 1, 0].mean() - s.features[s.labels == 0, 0].mean()
                               for s in sites])
    assert label_gap_after > 0.5 * label_gap_before  # the covariate (label) effect is preserved
    assert set(result["site_params"]) == {"site0", "site1", "site2"}
