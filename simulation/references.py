"""The references a federation is judged against, trained in this process on the same code path.

The centralized model on the pooled training data, each hospital alone, clinical-only and
image-only models (same fusion network and training loop as the sites, same budget and
model-selection rule as the federated run), and the seeds' clinical logistic regression.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from hccfed.client.evaluation import evaluation_summary
from hccfed.client.site import Site
from hccfed.client.site_data import SplitData, pooled_split
from hccfed.client.training import TrainSettings, predict, train_local
from hccfed.common.models.fusion import model_from_run_config
from hccfed.common.models.pretrain import load_pretrained_encoder
from hccfed.common.run_config import RunConfig
from hccfed.common.splits import DEV, cv_split_name
from hccfed.common.schema import IMAGE_CHANNELS, clinical_feature_names
from hccfed.server.federated_eval import pooled_figures
from hccfed.simulation.evaluation import EvaluationSets, TestPredictions, evaluate_on_test, evaluate_scores

log = logging.getLogger("hccfed.simulate")


def _steps(model: torch.nn.Module, data, run: RunConfig, steps: int, after_step=None) -> None:
    """``steps`` steps of ``local_epochs`` epochs on ``data`` (a fresh optimizer each, as a site gets each
    round); ``after_step(step)`` after each."""
    torch.manual_seed(run.seed)
    for step in range(1, steps + 1):
        train_local(model, data, TrainSettings(epochs=run.local_epochs, learning_rate=run.learning_rate,
                                               batch_size=run.batch_size, seed=run.seed * 1000 + step,
                                               augment=run.augment))
        if after_step is not None:
            after_step(step)


def _summaries(model: torch.nn.Module, parts: list[SplitData]) -> list[dict[str, np.ndarray]]:
    out = []
    for data in parts:
        logits, risks = predict(model, data)
        out.append(evaluation_summary(logits, risks, data.labels.numpy(), data.times.numpy(), data.events.numpy()))
    return out


def train_reference(name: str, sites_for_training: list[Site], sets: EvaluationSets,
                    run: RunConfig, encoder: str,
                    book: TestPredictions | None = None, clinical: bool = True,
                    radiomics: bool = True) -> dict[str, Any]:
    """Train one in-process reference model and test it.

    The same budget and rule as the federated model: ``rounds`` steps of
    ``local_epochs`` epochs (a fresh optimizer each step, as a site gets each
    round), keeping the step with the best validation AUC on the training
    sites' own validation splits (all a hospital alone would have). With ``cv-folds``, as the federated
    run: the step chosen by the pooled out-of-fold AUC of K trainings on the sites' pooled folds, then a
    model trained that many steps on every development patient, recalibrated on the out-of-fold tables.
    """
    started = time.time()
    n_clinical = len(clinical_feature_names()) if clinical else 0  # 0: the image-only model ignores the labs
    features = run.radiomics_features if radiomics else ()

    def new_model() -> torch.nn.Module:
        model = model_from_run_config(replace(run, encoder=encoder, radiomics_features=features),
                                      len(IMAGE_CHANNELS), n_clinical)
        if run.pretrained_encoder and model.encoder is not None:  # as the federated run starts from it
            load_pretrained_encoder(model, run.pretrained_encoder)
        return model

    extra: dict[str, Any] = {}
    validation_summaries = None
    if run.cv_folds:
        folds, rounds = run.cv_folds, run.num_server_rounds
        tables: list[list[dict[str, np.ndarray]]] = [[] for _ in range(rounds)]  # per step: every fold's sites
        for fold in range(1, folds + 1):
            model = new_model()
            held = [site.split(cv_split_name(fold, folds, "val")) for site in sites_for_training]
            _steps(model, pooled_split([site.split(cv_split_name(fold, folds, "train"))
                                        for site in sites_for_training]), run, rounds,
                   lambda step: tables[step - 1].extend(_summaries(model, held)))
        aucs = np.array([pooled_figures(t).get("auc", np.nan) for t in tables], dtype=float)
        if not np.isfinite(aucs).any():
            raise ValueError(f"{name}: no step has a pooled out-of-fold AUC")
        best_step = int(np.nanargmax(aucs)) + 1
        model = new_model()
        data = pooled_split([site.split(DEV) for site in sites_for_training])
        _steps(model, data, run, best_step)
        validation_summaries = tables[best_step - 1]
        extra["cross_validation"] = {"folds": folds, "auc_per_round": aucs.tolist()}
    else:
        model = new_model()
        data = pooled_split([site.split("train") for site in sites_for_training])
        validation = [site.split("val") for site in sites_for_training]
        best = {"auc": -np.inf, "step": 0, "state": None}

        def keep_best(step: int) -> None:
            auc = pooled_figures(_summaries(model, validation)).get("auc", float("nan"))
            if best["state"] is None or auc > best["auc"]:
                best.update(auc=auc if np.isfinite(auc) else best["auc"], step=step,
                            state={k: v.detach().clone() for k, v in model.state_dict().items()})

        _steps(model, data, run, run.num_server_rounds, keep_best)
        model.load_state_dict(best["state"])
        best_step = best["step"]
    result = evaluate_on_test(model, sets, name, book, run.recalibration, validation_summaries)
    result["selected_round"] = best_step
    result["seconds"] = time.time() - started
    result["train_patients"] = len(data)
    result.update(extra)
    log.info("%s: test AUC %.3f, C-index %.3f (%.0f s)", name, result["test"]["auc"], result["test"]["c_index"],
             result["seconds"])
    return result


def clinical_logistic_regression(sites: list[Site], sets: EvaluationSets,
                                 book: TestPredictions | None = None,
                                 name: str = "clinical logistic regression (centralized)",
                                 split: str = "train") -> dict[str, Any]:
    """The seeds' clinical model: logistic regression on the harmonized clinical vector, pooled.

    A reference that does not depend on any choice made for the neural models.
    The Cox figure uses the same linear score. ``split``: the patients it is fitted on ("dev" beside
    cross-validated models, which train on the validation split too).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train = pooled_split([site.split(split) for site in sites])
    known = train.labels.numpy() >= 0
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    model.fit(train.clinical.numpy()[known], train.labels.numpy()[known])
    rows = []
    for site_id, data in sets:
        score = model.decision_function(data.clinical.numpy())
        rows.append((site_id, data, score, score))
        if book is not None:
            book.add(name, site_id, data, score)
    # Fitted on the validation split too ("dev"), it has no unseen patients for a threshold or a recalibration.
    validation = [] if split == DEV else [(site_id, data, *(2 * [model.decision_function(data.clinical.numpy())]))
                                          for site_id, data in getattr(sets, "validation", [])]
    return {**evaluate_scores(rows, validation), "train_patients": int(known.sum())}


