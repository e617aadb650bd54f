"""The site's endpoint for the classical models: it scores its own test rows and sends only a
fixed-size clinical summary, answers over a model's score column, and over its rows harmonised by
the ComBat estimate a request carries."""

import numpy as np
import pytest

from hccfed.client.classical_site import ClassicalSite, ClassicalStatsSite, score_model
from hccfed.client.stats_site import local_send
from hccfed.server import federated_stats as fs

NAMES = ["age_decades", "arterial_tumour_original_firstorder_Mean", "portal_ring_original_glcm_Contrast"]


def _site(site_id: str, n: int, shift: float, seed: int) -> ClassicalSite:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    x[:, 1:] = x[:, 1:] * (1 + shift) + 5 * shift  # a scanner effect on the radiomics columns
    times = rng.exponential(30, n) + 0.1
    events = rng.integers(0, 2, n)
    labels = np.where(events.astype(bool) & (times <= 24), 1, np.where(times > 24, 0, -1))
    rows = rng.permutation(n)
    return ClassicalSite(site_id, np.array([f"{site_id}-{i}" for i in range(n)]), NAMES, x, labels, times, events,
                         np.sort(rows[: n * 2 // 3]), np.sort(rows[n * 2 // 3:]))


MODEL = {"name": "RCR", "features": ["R_score", "age_decades"], "intercept": 0.5, "coef": np.array([2.0, -1.0]),
         "inputs": {"R_score": {"name": "R", "features": [NAMES[1]], "intercept": -1.0, "coef": np.array([0.5]),
                                "inputs": {}}}}


def test_clinical_summary_has_no_patient_axis_and_matches_the_rows():
    small, large = ClassicalStatsSite(_site("h1", 60, 0.0, 1)), ClassicalStatsSite(_site("h1", 150, 0.0, 2))
    a, b = small.handle({"op": "clinical_summary", "model": MODEL}), large.handle(
        {"op": "clinical_summary", "model": MODEL})
    assert a["site_id"] == "h1" and set(a) == set(b)
    assert all(a[k].ndim == 1 for k in a if k != "site_id")  # tables of distinct scores with their counts
    s = small.site
    assert a["auc_pos"].sum() == np.sum(s.labels[s.test] == 1) and a["auc_neg"].sum() == np.sum(s.labels[s.test] == 0)
    expected = 0.5 + 2.0 * (-1.0 + 0.5 * s.features[s.test, 1]) - s.features[s.test, 0]
    np.testing.assert_allclose(score_model(MODEL, NAMES, s.features[s.test]), expected)


def test_score_input_prepends_the_model_score_and_unknown_feature_is_named():
    endpoint = ClassicalStatsSite(_site("h1", 60, 0.0, 1))
    reply = endpoint.handle({"op": "moments", "columns": [0], "score_input": MODEL["inputs"]["R_score"]})
    s = endpoint.site
    np.testing.assert_allclose(reply["all"]["sum"], [np.sum(-1.0 + 0.5 * s.features[s.train, 1])])
    with pytest.raises(ValueError, match="model 'X': feature 'ldh' is not among this site's features"):
        endpoint.handle({"op": "clinical_summary", "model": {**MODEL, "name": "X", "features": ["ldh"]}})


def test_combat_estimate_in_a_request_harmonises_train_and_test_rows_of_its_columns_only():
    sites = [_site("h1", 120, 0.0, 1), _site("h2", 90, 0.8, 2), _site("h3", 80, -0.4, 3)]
    endpoints = [ClassicalStatsSite(s) for s in sites]
    send = local_send(endpoints)
    estimate = {**fs.estimate_combat(send, [1, 2]), "columns": [1, 2]}
    harmonised = [e.rows(estimate) for e in endpoints]
    for site, rows in zip(sites, harmonised):
        np.testing.assert_array_equal(rows.features[:, 0], site.features[:, 0])  # clinical column kept
        assert not np.allclose(rows.features[:, 1:], site.features[:, 1:])
    assert all(e.rows() is s for e, s in zip(endpoints, sites))  # the original rows are never changed
    for part in ("train", "test"):
        means = [r.features[getattr(r, part), 1:].mean(axis=0) for r in harmonised]
        raw = [s.features[getattr(s, part), 1:].mean(axis=0) for s in sites]
        assert np.ptp(means, axis=0).max() < 0.5 < np.ptp(raw, axis=0).min(), part
    replies = send({"op": "moments", "columns": [1], "combat": estimate})
    for reply, rows in zip(replies, harmonised):
        np.testing.assert_allclose(reply["all"]["sum"], [rows.features[rows.train, 1].sum()])
    with pytest.raises(ValueError, match="site h1: rows are not changed in place"):
        endpoints[0].handle({"op": "combat_apply", **estimate})
    with pytest.raises(ValueError, match="site h1: the request's ComBat estimate has no parameters for this site"):
        endpoints[0].handle({"op": "moments", "combat": {**estimate, "site_params": {}}})


def test_beside_cross_validated_models_the_classical_rows_are_fitted_on_train_and_validation():
    from types import SimpleNamespace

    from hccfed.client.classical_site import join_site
    from hccfed.client.site_data import split_indices

    rng = np.random.default_rng(2)
    n = 40
    rows = SimpleNamespace(site_id="hospital_x", patient_ids=np.array([f"P{i:03d}" for i in range(n)]),
                           clinical_names=["age"], clinical=rng.normal(size=(n, 1)),
                           labels=rng.choice([0, 1, -1], size=n), times=rng.uniform(1, 40, n),
                           events=rng.integers(0, 2, n))
    splits = split_indices(rows, 5)
    plain, dev = join_site(rows, None, 5), join_site(rows, None, 5, fit_on="dev")
    np.testing.assert_array_equal(plain.train, splits["train"])
    np.testing.assert_array_equal(dev.train, np.sort(np.concatenate([splits["train"], splits["val"]])))
    np.testing.assert_array_equal(plain.test, dev.test)  # the test split is never fitted on
    with pytest.raises(ValueError, match="fit_on"):
        join_site(rows, None, 5, fit_on="test")
