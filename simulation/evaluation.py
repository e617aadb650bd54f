"""The test patients every model of a simulation is judged on, and their figures through the sites' summaries.

Every model, federated or reference, is tested on the same patients (each hospital's test
split, or with ``external`` every patient of a held-out hospital) through the same summary
path as a federated run: each site's exact tables, pooled by the server's code. The
operating point (sensitivity, specificity, PPV, NPV) is taken at Youden's threshold of the
training hospitals' validation splits, through the same tables, never of the test patients.
The paired DeLong tests between models use the two-round summary protocol, with
Holm-adjusted p-values. ``oracle_figures`` is the one function that reads the generator's
true risk (the oracle): only the report shows it.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from hccfed.client.evaluation import clinical_summary, evaluation_summary
from hccfed.client.site import Site
from hccfed.client.site_data import ALL, SplitData
from hccfed.client.training import predict
from hccfed.common.metrics.federated_delong import (delong_paired_from_sums, placement_request, placement_sums,
                                                     pool_placement_sums)
from hccfed.common.metrics.summaries import AUC_KEYS, pool_summaries, site_summary
from hccfed.server.federated_eval import (pooled_clinical_figures, pooled_figures, recalibrated_clinical_figures,
                                          validation_threshold)
from hccfed.server.pooling import with_holm
from hccfed.simulation.cohort import oracle_path

THRESHOLD_SOURCE = "Youden's threshold of the training hospitals' validation splits"


class EvaluationSets(list):
    """The test sets, a list of (site id, SplitData), with ``validation``: the (site id, SplitData)
    of the training hospitals' validation splits, where operating points are chosen."""

    def __init__(self, tests, validation=()):
        super().__init__(tests)
        self.validation = list(validation)


def evaluation_sets(sites: list[Site], external: str | None = None) -> EvaluationSets:
    """The patients every model is tested on: each hospital's test split (internal validation), or
    every patient of the held-out hospital ``external`` (external validation, leave-one-site-out);
    and the validation splits of the other hospitals."""
    validation = [(site.site_id, site.split("val")) for site in sites if site.site_id != external]
    if external is None:
        return EvaluationSets([(site.site_id, site.split("test")) for site in sites], validation)
    held = [site for site in sites if site.site_id == external]
    if not held:
        raise ValueError(f"--external {external!r}: no such site (sites: {', '.join(s.site_id for s in sites)})")
    return EvaluationSets([(external, held[0].split(ALL))], validation)


class TestPredictions:
    """Every model's test scores, kept where they were computed (each test site's side).

    They never enter metrics.json; they are the sites' input to round 2 of the
    paired DeLong test (:func:`paired_delong_tests`).
    """

    __test__ = False  # not a pytest class

    def __init__(self) -> None:
        self.rows: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.patients: dict[str, list[str]] = {}
        self.scores: dict[str, dict[str, np.ndarray]] = {}

    def add(self, model: str, site_id: str, data: SplitData, scores: np.ndarray) -> None:
        """``model``'s scores of ``data``'s patients at ``site_id``, in ``data``'s order: the same patients
        in the same order as every other model's at that site, or refused (a paired test or a late fusion
        of misaligned scores would pair one patient's score with another's outcome)."""
        scores = np.asarray(scores, dtype=float)
        ids = [str(p) for p in data.patient_ids]
        if scores.shape != (len(ids),):
            raise ValueError(f"{model} at {site_id}: {scores.shape} scores for {len(ids)} patients")
        known = self.patients.setdefault(site_id, ids)
        if known != ids:
            raise ValueError(f"{model} at {site_id}: its patients are not those (or not in the order) of the "
                             f"models already recorded there ({len(ids)} against {len(known)})")
        self.rows.setdefault(site_id, (data.labels.numpy(), data.times.numpy(), data.events.numpy()))
        self.scores.setdefault(site_id, {})[model] = scores

    def models(self) -> list[str]:
        """The models every site has scores of."""
        sets = [set(s) for s in self.scores.values()]
        return sorted(set.intersection(*sets)) if sets else []


def _validation_summaries(rows: list[tuple[str, SplitData, np.ndarray, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    return [evaluation_summary(logits, risks, data.labels.numpy(), data.times.numpy(), data.events.numpy())
            for _, data, logits, risks in rows]


def operating_threshold(summaries: list[dict[str, np.ndarray]]) -> float | None:
    """Youden's threshold of the pooled score tables of the validation summaries; None without
    validation patients of both classes (the operating point is then not reported)."""
    try:
        return validation_threshold(summaries) if summaries else None
    except ValueError:
        return None


def evaluate_scores(rows: list[tuple[str, SplitData, np.ndarray, np.ndarray]],
                    validation: list[tuple[str, SplitData, np.ndarray, np.ndarray]] = (),
                    recalibration: str = "platt",
                    validation_summaries: list[dict[str, np.ndarray]] | None = None) -> dict[str, Any]:
    """Pooled and per-site figures from (site, data, logits, log-risks) of the test patients, through the
    sites' tables; the operating point at the threshold chosen on ``validation`` (same form), and the
    calibration figures after ``recalibration`` ("platt", "isotonic"; "none": not) fitted on
    ``validation``'s pooled score tables, as a federated run's server does (``recalibrated``).
    ``validation_summaries``: the validation tables themselves instead of ``validation`` (cross-validation:
    the out-of-fold tables of the selected round, which the final model cannot give)."""
    summaries, clinical = {}, []
    for site_id, data, logits, risks in rows:
        values = (logits, risks, data.labels.numpy(), data.times.numpy(), data.events.numpy())
        summaries[site_id] = evaluation_summary(*values)
        clinical.append(clinical_summary(*values))
    if validation_summaries is None:
        validation_summaries = _validation_summaries(list(validation))
    threshold = operating_threshold(validation_summaries)
    out = {"test": pooled_figures(list(summaries.values())),
           "test_per_site": {s: pooled_figures([summary]) for s, summary in summaries.items()},
           "figures": pooled_clinical_figures(clinical, threshold, THRESHOLD_SOURCE)}
    if validation_summaries and recalibration != "none":
        out["recalibrated"] = recalibrated_clinical_figures(clinical, validation_summaries, recalibration, threshold,
                                                            THRESHOLD_SOURCE)
    return out


def evaluate_on_test(model: torch.nn.Module, sets: EvaluationSets, name: str | None = None,
                     book: TestPredictions | None = None, recalibration: str = "platt",
                     validation_summaries: list[dict[str, np.ndarray]] | None = None) -> dict[str, Any]:
    """Test figures of ``model`` on ``sets`` through the same summary path as a federated run (its
    operating point from ``sets.validation``, or from ``validation_summaries`` when given: a cross-validated
    model, whose validation patients it trained on); its test scores go into ``book`` (under ``name``)
    for the paired DeLong tests."""
    rows = []
    for site_id, data in sets:
        logits, risks = predict(model, data)
        rows.append((site_id, data, logits, risks))
        if book is not None and name is not None:
            book.add(name, site_id, data, logits)
    if validation_summaries is not None:
        return evaluate_scores(rows, (), recalibration, validation_summaries)
    validation = [(site_id, data, *predict(model, data)) for site_id, data in getattr(sets, "validation", [])]
    return evaluate_scores(rows, validation, recalibration)


def late_fusion(book: TestPredictions, sets: EvaluationSets, members: list[str], name: str) -> dict[str, Any]:
    """A late fusion of models already in ``book``: each test patient's mean of their logits (equal weights,
    nothing fitted, so no patient chooses them), scored at each site from the scores the site holds, and
    recorded in ``book`` under ``name``. Seed 002's DLRCR combines the deep, radiomics and clinical scores
    at this level. The members' logits must be on the log-odds scale (the neural models' raw logits, the
    classical models' linear predictors). No operating point or recalibration: both would need the
    members' out-of-fold scores at the same patients, which no site holds for every member."""
    if len(members) < 2:
        raise ValueError(f"{name}: a late fusion needs two models or more, got {members}")
    rows = []
    for site_id, data in sets:
        held = book.scores.get(site_id, {})
        missing = [m for m in members if m not in held]
        if missing:
            raise ValueError(f"{name}: no scores of {', '.join(missing)} at {site_id}")
        logits = np.mean([held[m] for m in members], axis=0)
        book.add(name, site_id, data, logits)
        rows.append((site_id, data, logits, logits))
    return {**evaluate_scores(rows, recalibration="none"), "members": list(members)}


def paired_delong_tests(book: TestPredictions, reference: str | None = "federated",
                        against: list[str] | None = None) -> dict[str, Any]:
    """Paired DeLong tests between the models in ``book``, by the two-round summary protocol.

    Round 1: each site's score table of every model, pooled. Round 2: each
    site's placement sums against its request
    (:func:`common.metrics.federated_delong.placement_request` /
    :func:`~common.metrics.federated_delong.placement_sums`), pooled; the test
    follows from those sums only. ``reference`` is compared with every other
    model, or with those of ``against`` (all pairs when it is absent); p-values
    Holm-adjusted over the tests made. Same format as `pool-summaries`.
    """
    models = book.models()
    if against is not None and reference not in models:
        return {"status": f"{reference} has no scores at every site: no paired test against it"}
    if len(models) < 2:
        return {"status": "one model only: no paired test"}
    tables = {s: {m: site_summary(book.rows[s][0], book.scores[s][m], book.rows[s][1], book.rows[s][2])
                  for m in models} for s in book.scores}
    pooled = {m: pool_summaries([{k: tables[s][m][k] for k in AUC_KEYS} for s in tables]) for m in models}
    answers = [placement_sums(book.rows[s][0], {m: book.scores[s][m] for m in models},
                              placement_request(pooled, tables[s], s)) for s in book.scores]
    total = pool_placement_sums(answers)
    pairs = ([(reference, m) for m in models if m != reference and (against is None or m in against)]
             if reference in models else list(itertools.combinations(models, 2)))
    tests = []
    for a, b in pairs:
        try:
            tests.append({"model_a": a, "model_b": b, **delong_paired_from_sums(total, a, b)})
        except ValueError as err:
            tests.append({"model_a": a, "model_b": b, "error": str(err)})
    tests += [{"model_a": reference, "model_b": m, "error": "no scores at every site"}
              for m in (against or ()) if m != reference and m not in models]
    return {"status": "computed", "tests": with_holm(tests)}


def oracle_figures(data_dir: Path | list[Path], sets: EvaluationSets) -> dict[str, Any]:
    """The generator's true risk on the same test patients: the best any model can do (its operating
    point chosen on the validation patients' true risks). ``data_dir``: the cohort folder, or several
    (a cohort and its held-out cohorts)."""
    folders = data_dir if isinstance(data_dir, (list, tuple)) else [data_dir]
    oracle = pd.concat([pd.read_csv(oracle_path(d)) for d in folders]).set_index(["site_id", "patient_id"])

    def rows(pairs):
        out = []
        for site_id, data in pairs:
            truth = oracle.loc[[(site_id, pid) for pid in data.patient_ids]]
            risk = np.clip(truth["true_risk_24m"].to_numpy(dtype=float), 1e-6, 1 - 1e-6)
            out.append((site_id, data, np.log(risk / (1 - risk)), truth["linear_predictor"].to_numpy(dtype=float)))
        return out

    figures = evaluate_scores(rows(sets), rows(getattr(sets, "validation", [])))
    return {"test": figures["test"], "figures": figures["figures"]}


def describe_evaluation(sets: EvaluationSets, external: str | None) -> dict[str, Any]:
    n = sum(len(data) for _, data in sets)
    if external is None:
        return {"kind": "internal", "sites": [s for s, _ in sets], "patients": n,
                "description": f"each hospital's held-back test split ({n} patients in all)"}
    return {"kind": "external", "sites": [external], "patients": n,
            "description": f"external validation: every patient of {external} ({n}), a hospital no model "
                           f"was trained or tuned on (leave-one-site-out)"}


