"""The test patients every model of a simulation is judged on, and their figures through the sites' summaries.

Every model, federated or reference, is tested on the same patients (each hospital's test
split, or with ``external`` every patient of a held-out hospital) through the same summary
path as a federated run: each site's histograms, pooled by the server's code. The paired
DeLong tests between models use the two-round summary protocol. ``oracle_figures`` is the
one function that reads the generator's true risk (the oracle): only the report shows it.
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
from hccfed.common.metrics.federated_delong import delong_paired_from_sums, placement_sums, pool_placement_sums
from hccfed.common.metrics.summaries import SummaryGrid, site_summary
from hccfed.server.federated_eval import pooled_clinical_figures, pooled_figures
from hccfed.simulation.cohort import oracle_path


EvaluationSets = list[tuple[str, SplitData]]


def evaluation_sets(sites: list[Site], external: str | None = None) -> EvaluationSets:
    """The patients every model is tested on: each hospital's test split (internal validation), or
    every patient of the held-out hospital ``external`` (external validation, leave-one-site-out)."""
    if external is None:
        return [(site.site_id, site.split("test")) for site in sites]
    held = [site for site in sites if site.site_id == external]
    if not held:
        raise ValueError(f"--external {external!r}: no such site (sites: {', '.join(s.site_id for s in sites)})")
    return [(external, held[0].split(ALL))]


class TestPredictions:
    """Every model's test scores, kept where they were computed (each test site's side).

    They never enter metrics.json; they are the sites' input to round 2 of the
    paired DeLong test (:func:`paired_delong_tests`).
    """

    __test__ = False  # not a pytest class

    def __init__(self) -> None:
        self.rows: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.scores: dict[str, dict[str, np.ndarray]] = {}

    def add(self, model: str, site_id: str, data: SplitData, scores: np.ndarray) -> None:
        self.rows.setdefault(site_id, (data.labels.numpy(), data.times.numpy(), data.events.numpy()))
        self.scores.setdefault(site_id, {})[model] = np.asarray(scores, dtype=float)

    def models(self) -> list[str]:
        """The models every site has scores of."""
        sets = [set(s) for s in self.scores.values()]
        return sorted(set.intersection(*sets)) if sets else []


def evaluate_scores(rows: list[tuple[str, SplitData, np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Pooled and per-site figures from (site, data, logits, log-risks), through the sites' histograms."""
    summaries, clinical = {}, []
    for site_id, data, logits, risks in rows:
        values = (logits, risks, data.labels.numpy(), data.times.numpy(), data.events.numpy())
        summaries[site_id] = evaluation_summary(*values)
        clinical.append(clinical_summary(*values))
    return {"test": pooled_figures(list(summaries.values())),
            "test_per_site": {s: pooled_figures([summary]) for s, summary in summaries.items()},
            "figures": pooled_clinical_figures(clinical)}


def evaluate_on_test(model: torch.nn.Module, sets: EvaluationSets, name: str | None = None,
                     book: TestPredictions | None = None) -> dict[str, Any]:
    """Test figures of ``model`` on ``sets`` through the same histogram path as a federated run;
    its scores go into ``book`` (under ``name``) for the paired DeLong tests."""
    rows = []
    for site_id, data in sets:
        logits, risks = predict(model, data)
        rows.append((site_id, data, logits, risks))
        if book is not None and name is not None:
            book.add(name, site_id, data, logits)
    return evaluate_scores(rows)


def paired_delong_tests(book: TestPredictions, reference: str | None = "federated") -> dict[str, Any]:
    """Paired DeLong tests between the models in ``book``, by the two-round summary protocol.

    Round 1: each site's per-class histograms of every model's scores, pooled.
    Round 2: each site's placement sums against the pooled histograms
    (:func:`common.metrics.federated_delong.placement_sums`), pooled; the test
    follows from those sums only. ``reference`` is compared with every other
    model (all pairs when it is absent). Same format as `pool-summaries`.
    """
    models = book.models()
    if len(models) < 2:
        return {"status": "one model only: no paired test"}
    grid = SummaryGrid()
    pooled = {}
    for m in models:
        per_site = [site_summary(book.rows[s][0], book.scores[s][m], book.rows[s][1], book.rows[s][2], grid)
                    for s in book.scores]
        pooled[m] = {k: np.sum([p[k] for p in per_site], axis=0) for k in ("auc_pos", "auc_neg")}
    answers = [placement_sums(book.rows[s][0], {m: book.scores[s][m] for m in models}, pooled, grid)
               for s in book.scores]
    total = pool_placement_sums(answers)
    pairs = ([(reference, m) for m in models if m != reference] if reference in models
             else list(itertools.combinations(models, 2)))
    tests = []
    for a, b in pairs:
        try:
            tests.append({"model_a": a, "model_b": b, **delong_paired_from_sums(total, a, b)})
        except ValueError as err:
            tests.append({"model_a": a, "model_b": b, "error": str(err)})
    return {"status": "computed", "tests": tests}


def oracle_figures(data_dir: Path, sets: EvaluationSets) -> dict[str, Any]:
    """The generator's true risk on the same test patients: the best any model can do."""
    oracle = pd.read_csv(oracle_path(data_dir)).set_index(["site_id", "patient_id"])
    rows = []
    for site_id, data in sets:
        truth = oracle.loc[[(site_id, pid) for pid in data.patient_ids]]
        risk = np.clip(truth["true_risk_24m"].to_numpy(dtype=float), 1e-6, 1 - 1e-6)
        rows.append((site_id, data, np.log(risk / (1 - risk)), truth["linear_predictor"].to_numpy(dtype=float)))
    figures = evaluate_scores(rows)
    return {"test": figures["test"], "figures": figures["figures"]}


def describe_evaluation(sets: EvaluationSets, external: str | None) -> dict[str, Any]:
    n = sum(len(data) for _, data in sets)
    if external is None:
        return {"kind": "internal", "sites": [s for s, _ in sets], "patients": n,
                "description": f"each hospital's held-back test split ({n} patients in all)"}
    return {"kind": "external", "sites": [external], "patients": n,
            "description": f"external validation: every patient of {external} ({n}), a hospital no model "
                           f"was trained or tuned on (leave-one-site-out)"}


