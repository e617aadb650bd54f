"""The folds of federated cross-validation, as each site draws them at home.

Every development patient (training + validation split) is in exactly one fold, no test patient in any;
each label is dealt evenly; the folds follow the run's seed and the site's id; the split names the server
sends are parsed back, and anything else is refused.
"""

from types import SimpleNamespace

import numpy as np
import pytest

from hccfed.client.site_data import cv_folds, split_indices, split_rows
from hccfed.common.splits import DEV, cv_split_name, fitted_split, parse_cv_split


def _site(n: int, site_id: str = "hospital_x", seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.choice([1, 0, -1], size=n, p=[0.35, 0.5, 0.15])
    return SimpleNamespace(site_id=site_id, labels=labels, patient_ids=np.array([f"P{i:04d}" for i in range(n)]))


@pytest.mark.parametrize("n, folds", [(7, 2), (40, 3), (151, 5), (23, 10)])
def test_the_folds_partition_the_development_patients_and_deal_each_label_evenly(n, folds):
    site = _site(n, seed=n)
    splits = split_indices(site, seed=4)
    dev = np.sort(np.concatenate([splits["train"], splits["val"]]))
    parts = cv_folds(site, 4, folds)
    assert len(parts) == folds
    together = np.sort(np.concatenate(parts))
    np.testing.assert_array_equal(together, dev)  # each development patient once
    assert not set(together) & set(splits["test"])
    np.testing.assert_array_equal(split_rows(site, DEV, 4), dev)
    for label in (1, 0, -1):
        counts = [int((site.labels[p] == label).sum()) for p in parts]
        assert max(counts) - min(counts) <= 1, (label, counts)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    for k in range(1, folds + 1):
        held = split_rows(site, cv_split_name(k, folds, "val"), 4)
        trained = split_rows(site, cv_split_name(k, folds, "train"), 4)
        np.testing.assert_array_equal(held, parts[k - 1])
        assert not set(held) & set(trained)
        np.testing.assert_array_equal(np.sort(np.concatenate([held, trained])), dev)


def test_the_folds_follow_the_seed_and_the_site():
    site = _site(60)
    same = cv_folds(site, 1, 4)
    assert all(np.array_equal(a, b) for a, b in zip(same, cv_folds(site, 1, 4)))
    other_seed = cv_folds(site, 2, 4)
    other_site = cv_folds(SimpleNamespace(**{**vars(site), "site_id": "hospital_y"}), 1, 4)
    assert not all(np.array_equal(a, b) for a, b in zip(same, other_seed))
    assert not all(np.array_equal(a, b) for a, b in zip(same, other_site))


def test_split_names_round_trip_and_anything_else_is_refused():
    assert parse_cv_split(cv_split_name(3, 5, "val")) == (3, 5, "val")
    assert parse_cv_split(cv_split_name(1, 2, "train")) == (1, 2, "train")
    for name in ("train", "dev", "cv-0-of-5-val", "cv-6-of-5-val", "cv-1-of-1-val", "cv-1-of-5-test", "cv-a-of-5-val"):
        assert parse_cv_split(name) is None, name
    with pytest.raises(ValueError, match="cv-<k>-of-<K>"):
        split_rows(_site(10), "cv-6-of-5-val", 0)
    with pytest.raises(ValueError):
        cv_split_name(0, 5, "val")
    with pytest.raises(ValueError, match="at least 2"):
        cv_folds(_site(10), 0, 1)
    assert fitted_split(0) == "train" and fitted_split(5) == DEV
