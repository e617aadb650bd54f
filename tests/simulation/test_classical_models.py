"""CR / R / RCR trained federated on three small synthetic sites: they find the signal and evaluate."""

import numpy as np

from simulation.classical_models import ClassicalSite, run_classical_models


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
