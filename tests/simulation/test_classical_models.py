"""CR / R / RCR trained federated on three small synthetic sites: they find the signal and evaluate."""

import numpy as np
import pytest

from hccfed.client.site_data import split_indices
from hccfed.common.site_config import load_site_config
from hccfed.client.site import Site
from hccfed.simulation.classical_models import ClassicalSite, classical_model_results, run_classical_models


def _sites(seed=0):
    rng = np.random.default_rng(seed)
    names = ["ast_rel", "age_decades", "log2_diameter_30mm"]
    names += [f"{ph}_{rg}_original_firstorder_F{j}" for ph in ("arterial", "portal") for rg in ("tumour", "ring")
              for j in range(4)]
    sites = []
    for s, n in enumerate((160, 120, 90)):
        a = rng.normal(size=n)  # latent aggressiveness
        clinical = np.column_stack([0.6 * a + rng.normal(size=n), rng.normal(size=n), rng.normal(size=n)])
        rad = rng.normal(size=(n, 16))
        rad[:, 0] += 1.2 * a
        rad[:, 1] = rad[:, 0] + rng.normal(0, 0.1, n)  # redundant with feature 0
        rad[:, 5] += 0.8 * a
        t = np.round(rng.exponential(30 * np.exp(-0.8 * a)), 1) + 0.1
        e = (t < 60).astype(int)
        t = np.minimum(t, 60.0)
        labels = np.where(e.astype(bool) & (t <= 24), 1, np.where(t > 24, 0, -1))
        idx = rng.permutation(n)
        sites.append(ClassicalSite(f"site{s}", np.array([f"S{s}-{i}" for i in range(n)]), names,
                                   np.column_stack([clinical, rad]), labels, t, e,
                                   np.sort(idx[: int(0.65 * n)]), np.sort(idx[int(0.65 * n):])))
    return sites


def test_classical_models_select_signal_and_report_pooled_auc():
    sites = _sites()
    out = run_classical_models(sites, seed=0, n_folds=3)
    assert set(out) == {"CR", "R", "RCR"}
    assert "ast_rel" in out["CR"].get("model").features
    r_features = out["R"]["model"].features
    assert any(f.endswith("F0") or f.endswith("F1") for f in r_features)
    assert not {"arterial_tumour_original_firstorder_F0", "arterial_tumour_original_firstorder_F1"} <= set(r_features)
    for key, result in out.items():
        assert set(result["site_scores"]) == {"site0", "site1", "site2"}
        assert all(len(v) == len(s.test) for v, s in zip(result["site_scores"].values(), sites))
        auc = result["figures"]["auc"]
        assert auc["auc"] > 0.6, (key, auc)


def test_icc_filter_drops_an_unreproducible_feature():
    sites = _sites(1)
    rng = np.random.default_rng(5)
    for s in sites:
        s.second_reader = s.features + rng.normal(0, 0.05, s.features.shape)
        s.second_reader[:, 3] = rng.normal(size=len(s.features))  # feature F0 (the strongest) is pure reader noise
    out = run_classical_models(sites, seed=0, n_folds=3)
    assert "arterial_tumour_original_firstorder_F0" not in out["R"]["model"].features
    selection = out["R"]["selection"]
    assert selection["steps"][:2] == ["candidates", "ICC(3,1) > 0.9"]
    assert "arterial_tumour_original_firstorder_F0" in selection["survivors"]["candidates"]
    assert "arterial_tumour_original_firstorder_F0" not in selection["survivors"]["ICC(3,1) > 0.9"]
    assert selection["groups"]["arterial tumour"][:2] == [4, 3]  # F0 of the 4 arterial tumour features fails
    for counts in selection["groups"].values():
        assert counts == sorted(counts, reverse=True)  # each step only removes
    assert sorted(selection["survivors"]["LASSO (federated CV)"]) == sorted(out["R"]["model"].features)
    assert sum(c[0] for c in selection["groups"].values()) == 16


def test_harmonize_removes_a_scanner_shift_keeps_the_callers_rows_and_the_signal():
    sites = _sites(2)
    for k, s in enumerate(sites):  # each site's scanner shifts and scales its radiomics
        s.features[:, 3:] = s.features[:, 3:] * (1 + 0.5 * k) + 3.0 * k
    before = [s.features.copy() for s in sites]
    plain = run_classical_models(sites, seed=0, n_folds=3)
    harmonized = run_classical_models(sites, seed=0, n_folds=3, harmonize=True)
    assert all(np.array_equal(b, s.features) for b, s in zip(before, sites))
    assert harmonized["R"]["sites"]["harmonized_columns"] == list(range(3, 19))
    assert plain["R"]["sites"]["harmonized_columns"] == []
    assert harmonized["CR"]["model"].features == plain["CR"]["model"].features  # clinical columns untouched
    assert harmonized["RCR"]["figures"]["auc"]["auc"] > 0.6
    assert plain["R"]["figures"]["auc"]["auc"] != harmonized["R"]["figures"]["auc"]["auc"]


def test_sites_with_different_feature_lists_are_named():
    sites = _sites()
    sites[2].names = sites[2].names[:-1] + ["portal_ring_original_firstorder_Other"]
    with pytest.raises(ValueError, match="site site2: its feature list differs from site site0's"):
        run_classical_models(sites, seed=0, n_folds=3)


@pytest.mark.slow  # radiomics of the tiny cohort's 34 patients, two readers (about 40 s on 2 cores)
def test_classical_model_results_gives_the_report_rows(tiny_cohort):
    _, yamls = tiny_cohort
    sites = [Site(load_site_config(p), 0, workers=2) for p in yamls]
    rows = classical_model_results(sites, harmonize=True)
    assert list(rows) == ["CR (federated)", "R (federated)", "RCR (federated)"]
    splits = [split_indices(site.prepared, 0) for site in sites]
    n_train = sum(len(s["train"]) for s in splits)  # the training split only, as the deep models
    n_test = sum(len(s["test"]) for s in splits)
    for name, row in rows.items():
        assert {"auc", "auc_ci_lower", "auc_ci_upper", "c_index", "n_patients", "n_positive",
                "n_negative"} <= set(row["test"]), name
        assert row["train_patients"] == n_train and row["test"]["n_patients"] == n_test, name
        assert row["harmonized"] and "auc" in row["figures"] and row["features"], name
    assert rows["RCR (federated)"]["features"][0] == "R_score"
    selection = rows["R (federated)"]["selection"]  # the second reader is on by default: ICC first
    assert selection["steps"][1] == "ICC(3,1) > 0.9" and set(selection["groups"]) == {
        f"{phase} {region}" for phase in ("pre", "arterial", "portal", "delayed") for region in ("tumour", "ring")}
    assert rows["R (federated)"]["protected_covariates"] == ["age_decades", "male"]
