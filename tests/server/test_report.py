"""The run report: every model's row, embedded plots, run config and software versions."""

import base64
import json
import re

import numpy as np

from client.evaluation import evaluation_summary
from server.federated_eval import pooled_curves, pooled_figures
from server.report import package_versions, write_report


def _entry(rng, strength):
    labels = rng.integers(0, 2, 80)
    scores = strength * labels + rng.normal(size=80)
    summary = evaluation_summary(scores, scores, labels, rng.exponential(30, 80), rng.integers(0, 2, 80))
    return {"test": pooled_figures([summary]), "curves": pooled_curves([summary]), "train_patients": 40}


def test_report_embeds_plots_config_and_versions(tmp_path):
    rng = np.random.default_rng(0)
    metrics = {"run_id": "r1", "oracle": _entry(rng, 3.0), "sites": {},
               "models": {"federated": {**_entry(rng, 1.5), "run_config": {"num-server-rounds": 3}},
                          "centralized": _entry(rng, 1.6)}}
    metrics["models"]["federated"]["test_per_site"] = {}
    out = write_report(json.loads(json.dumps(metrics)), tmp_path)
    page = out.read_text()
    for name in ("oracle", "federated", "centralized", "ROC curves", "num-server-rounds", "flwr", "torch"):
        assert name in page
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 1 and base64.b64decode(images[0]).startswith(b"\x89PNG")
    assert "| federated |" in (tmp_path / "report.md").read_text()


def test_pooled_roc_curve_is_monotone_and_absent_for_one_class():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 50)
    summary = evaluation_summary(labels + rng.normal(size=50), rng.normal(size=50), labels,
                                 rng.exponential(30, 50), rng.integers(0, 2, 50))
    roc = pooled_curves([summary, summary])["roc"]
    assert roc["fpr"][0] == 0 and roc["tpr"][-1] == 1 and np.all(np.diff(roc["fpr"]) >= 0)
    one_class = evaluation_summary(np.zeros(5), np.zeros(5), np.ones(5), np.ones(5), np.ones(5))
    assert "roc" not in pooled_curves([one_class])


def test_versions_name_the_main_packages():
    versions = package_versions()
    assert versions["flwr"] != "not installed" and versions["python"].count(".") == 2
