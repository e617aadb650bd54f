"""The run report: every model's row, clinical tables, embedded plots, run config and software versions."""

import base64
import json
import re

import numpy as np
import pytest

from hccfed.client.evaluation import clinical_summary, evaluation_summary
from hccfed.server.federated_eval import pooled_clinical_figures, pooled_figures, recalibrated_clinical_figures
from hccfed.server.report import package_versions, write_report


def _sites(rng, strength, n=(80, 60)):
    out = []
    for size in n:
        labels = rng.integers(0, 2, size)
        logits = strength * (labels - 0.5) + rng.normal(size=size)
        times = np.where(labels == 1, rng.uniform(1, 24, size), rng.uniform(25, 60, size)).round()
        out.append((logits, logits + rng.normal(0, 0.3, size), labels, times, (labels == 1).astype(int)))
    return out


def _entry(rng, strength):
    sites = _sites(rng, strength)
    validation = [evaluation_summary(*s) for s in _sites(rng, strength, n=(30, 20))]
    clinical = [clinical_summary(*s) for s in sites]
    return {"test": pooled_figures([evaluation_summary(*s) for s in sites]),
            "figures": pooled_clinical_figures(clinical), "train_patients": 40,
            "recalibrated": recalibrated_clinical_figures(clinical, validation)}


def test_report_embeds_clinical_tables_plots_config_and_versions(tmp_path):
    rng = np.random.default_rng(0)
    metrics = {"run_id": "r1", "oracle": _entry(rng, 3.0), "sites": {},
               "models": {"federated": {**_entry(rng, 1.5), "run_config": {"num-server-rounds": 3},
                                        "test_per_site": {}},
                          "centralized": _entry(rng, 1.6)}}
    out = write_report(json.loads(json.dumps(metrics)), tmp_path)
    page = out.read_text()
    for text in ("oracle", "federated", "centralized", "ROC curves", "Calibration", "Decision curves",
                 "Kaplan-Meier: federated", "Hosmer-Lemeshow", "Youden", "num-server-rounds", "flwr", "torch"):
        assert text in page, text
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 3 + 3  # ROC, calibration, decision + one Kaplan-Meier plot per row
    assert all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert "| federated |" in (tmp_path / "report.md").read_text()
    slope = metrics["models"]["federated"]["recalibrated"]["figures"]["calibration"]["slope"]
    assert f"{slope:.2f} / " in page and "(platt, 50 patients)" in page  # the risks recalibrated on validation


def test_clinical_summary_pools_to_the_per_patient_figures():
    from sklearn.metrics import roc_auc_score
    from lifelines.utils import concordance_index

    rng = np.random.default_rng(1)
    sites = _sites(rng, 1.0, n=(50, 70, 40))
    figures = pooled_clinical_figures([clinical_summary(*s) for s in sites])
    logits, risks, labels, times, events = (np.concatenate(parts) for parts in zip(*sites))
    assert figures["auc"]["auc"] == pytest.approx(roc_auc_score(labels, logits), abs=1e-3)
    # the C-index comes from the Cox head, not from the logits
    assert figures["c_index"]["c_index"] == pytest.approx(concordance_index(times, -risks, events), abs=1e-3)
    probs = 1 / (1 + np.exp(-logits))
    assert figures["brier"] == pytest.approx(np.mean((probs - labels) ** 2), abs=1e-9)
    assert [g["group"] for g in figures["risk_groups"]["kaplan_meier"]] == ["low", "high"]


def test_versions_name_the_main_packages():
    versions = package_versions()
    assert versions["flwr"] != "not installed" and versions["python"].count(".") == 2


def test_report_lists_the_features_surviving_each_selection_step(tmp_path):
    rng = np.random.default_rng(2)
    selection = {"steps": ["candidates", "ICC(3,1) > 0.9", "LASSO (federated CV)"],
                 "groups": {"arterial tumour": [3, 2, 1], "portal ring": [2, 1, 0]},
                 "survivors": {"candidates": ["arterial_tumour_a", "arterial_tumour_b", "arterial_tumour_c",
                                              "portal_ring_a", "portal_ring_b"],
                               "ICC(3,1) > 0.9": ["arterial_tumour_a", "arterial_tumour_b", "portal_ring_b"],
                               "LASSO (federated CV)": ["arterial_tumour_b"]}, "notes": []}
    metrics = {"run_id": "r2", "oracle": _entry(rng, 3.0), "sites": {},
               "models": {"R (federated)": {**_entry(rng, 1.0), "selection": selection,
                                            "protected_covariates": ["age_decades", "male"]}}}
    write_report(json.loads(json.dumps(metrics)), tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "## Radiomics selection: R (federated)" in md
    assert "| arterial tumour | 3 | 2 | 1 |" in md and "| all | 5 | 3 | 1 |" in md
    assert "- LASSO (federated CV) (1): arterial_tumour_b" in md
    assert "ComBat kept the effects of: age_decades, male." in md
    assert "Radiomics selection: R (federated)" in (tmp_path / "report.html").read_text()
