"""The in-process references under cross-validation: the same rule as the federated run.

The centralized model picks its step on the pooled out-of-fold AUC of K trainings on the sites' pooled
folds, then trains that many steps on every development patient; its recalibration and operating point
come from the out-of-fold tables of that step, not from patients it trained on.
"""

from dataclasses import replace

import numpy as np

from hccfed.client.site import Site
from hccfed.client.site_data import split_rows
from hccfed.common.run_config import RunConfig
from hccfed.common.site_config import load_site_config
from hccfed.common.splits import DEV
from hccfed.simulation.evaluation import EvaluationSets
from hccfed.simulation.references import clinical_logistic_regression, train_reference


def test_the_centralized_reference_is_cross_validated_like_the_federated_run(tiny_cohort):
    sites = [Site(load_site_config(p), 3) for p in tiny_cohort[1]]
    sets = EvaluationSets([(s.site_id, s.split("test")) for s in sites], [(s.site_id, s.split("val")) for s in sites])
    run = RunConfig(num_server_rounds=3, batch_size=4, encoder_width=4, seed=3, cv_folds=2)
    out = train_reference("centralized", sites, sets, run, "cnn")
    aucs = out["cross_validation"]["auc_per_round"]
    assert out["cross_validation"]["folds"] == 2 and len(aucs) == 3
    assert out["selected_round"] == int(np.nanargmax(aucs)) + 1
    dev = sum(len(split_rows(s.rows, DEV, 3)) for s in sites)
    assert out["train_patients"] == dev > sum(len(s.split_indices["train"]) for s in sites)
    assert "error" not in out["recalibrated"]

    plain = train_reference("centralized", sites, sets, replace(run, cv_folds=0), "cnn")
    assert "cross_validation" not in plain and plain["train_patients"] == sum(len(s.split_indices["train"])
                                                                              for s in sites)
    # beside cross-validated models the clinical logistic regression learns from the same patients
    known = sum(int((s.split(DEV).labels.numpy() >= 0).sum()) for s in sites)
    lr = clinical_logistic_regression(sites, sets, split=DEV)
    assert lr["train_patients"] == known
    assert "recalibrated" not in lr  # its validation patients are training patients now: nothing to fit on
