"""Pooled evaluation figures from the sites' summary tables, never from rows.

Used by the Flower training run (each round's validation and the final test
evaluation), by the federated classical models and by the simulation. The
tables are exact (:mod:`common.metrics.summaries`), so the pooled figures are
those of the pooled rows. No minimum cell size is applied unless one is
given: the training run's sites decide what they send; `hccfed
pool-summaries` applies one by default.
"""

from __future__ import annotations

import json
from typing import Mapping

import numpy as np

from hccfed.common.metrics.recalibration import METHODS, fit_recalibration, recalibrate_prob_table
from hccfed.common.metrics.summaries import AUC_KEYS, EVALUATION_KEYS, MODEL_KEYS, pool_summaries
from hccfed.common.metrics.summary_checks import MinimumCells, check_minimum
from hccfed.common.metrics.summary_discrimination import auc_from_summary, cindex_from_summary, \
    youden_threshold_from_summary
from hccfed.server.pooled_figures import jsonable, model_figures

#: The arrays of an evaluate reply's "summary" record: the score table (logits) and the survival table (risks).
SUMMARY_KEYS = EVALUATION_KEYS


def _pool(summaries: list[Mapping[str, np.ndarray]], keys: tuple[str, ...], names: list[str] | None,
          minimum: MinimumCells | None) -> dict:
    if not summaries:
        raise ValueError("no site summaries to pool")
    names = names or [f"site summary {i}" for i in range(len(summaries))]
    tables = [{k: np.asarray(s[k]) for k in keys if k in s} for s in summaries]
    if minimum is not None:
        for name, table in zip(names, tables):
            check_minimum(table, minimum, name)
    return pool_summaries(tables, names)


def pooled_figures(summaries: list[Mapping[str, np.ndarray]], alpha: float = 0.05, names: list[str] | None = None,
                   minimum: MinimumCells | None = None) -> dict[str, float]:
    """AUC with DeLong CI and Harrell's C-index over all sites' patients together (NaN when undefined).

    ``summaries``: one :func:`client.evaluation.evaluation_summary` per site
    (keys :data:`SUMMARY_KEYS`); ``names`` name them in errors.
    """
    pooled = _pool(summaries, SUMMARY_KEYS, names, minimum)
    figures: dict[str, float] = {}
    try:
        auc = auc_from_summary(pooled, alpha=alpha)
        figures.update({"auc": auc["auc"], "auc_se": auc["se"], "auc_ci_lower": auc["ci_lower"],
                        "auc_ci_upper": auc["ci_upper"], "n_positive": auc["n_pos"], "n_negative": auc["n_neg"]})
    except ValueError:  # one class only, or fewer than 2 per class: AUC or its CI undefined
        figures.update({"auc": float("nan"), "auc_ci_lower": float("nan"), "auc_ci_upper": float("nan")})
    try:
        cidx = cindex_from_summary(pooled)
        figures.update({"c_index": cidx["c_index"], "comparable_pairs": cidx["comparable_pairs"],
                        "n_patients": cidx["n"], "n_events": cidx["n_events"]})
    except ValueError:  # no comparable pair
        figures.update({"c_index": float("nan")})
    return {k: float(v) for k, v in figures.items()}


def validation_threshold(summaries: list[Mapping[str, np.ndarray]], names: list[str] | None = None) -> float:
    """Youden's threshold of the pooled score tables of the sites' validation patients (score units).

    The operating point to pass to :func:`pooled_clinical_figures` of the
    test patients. Raises ValueError when the validation patients hold one class only.
    """
    return youden_threshold_from_summary(_pool(summaries, AUC_KEYS, names, None))


def pooled_clinical_figures(summaries: list[Mapping[str, np.ndarray]], threshold: float | None = None,
                            threshold_source: str | None = None, names: list[str] | None = None,
                            minimum: MinimumCells | None = None) -> dict:
    """Every clinical figure of one model over all sites' patients, from their clinical summaries.

    ``summaries``: one :func:`client.evaluation.clinical_summary` per site.
    ``threshold`` (e.g. :func:`validation_threshold` of the validation
    summaries) gives the sensitivity / specificity / PPV / NPV block; without
    it that block says how to get one. Returns what
    :func:`server.pooled_figures.model_figures` gives, JSON-ready.
    """
    pooled = _pool(summaries, MODEL_KEYS, names, minimum)
    return jsonable(model_figures(pooled, threshold, threshold_source))


def pooled_score_table(summaries: list[Mapping[str, np.ndarray]], names: list[str] | None = None) -> dict[str, list]:
    """The pooled score table (:data:`AUC_KEYS`) of the sites' summaries as plain lists (JSON- and checkpoint-safe);
    :func:`score_table_arrays` turns it back into arrays."""
    return {k: v.tolist() for k, v in _pool(summaries, AUC_KEYS, names, None).items()}


def score_table_arrays(table: Mapping[str, list]) -> dict[str, np.ndarray]:
    """A score table of lists (:func:`pooled_score_table`) as arrays: float64 scores, int64 counts."""
    return {k: np.asarray(table[k], dtype=np.float64 if k == "auc_value" else np.int64) for k in AUC_KEYS}


def recalibrated_clinical_figures(clinical_summaries: list[Mapping[str, np.ndarray]],
                                  validation_score_summaries: list[Mapping[str, np.ndarray]], method: str = "platt",
                                  threshold: float | None = None, threshold_source: str | None = None,
                                  names: list[str] | None = None, minimum: MinimumCells | None = None) -> dict:
    """The clinical figures of the test patients after recalibrating the model on the validation patients.

    ``method`` ("platt" or "isotonic", :mod:`common.metrics.recalibration`)
    is fitted on the POOLED score tables (logits) of
    ``validation_score_summaries`` (each site's validation summary, or one
    already pooled table), then applied to the probability table of each of
    ``clinical_summaries`` (the test sites' :func:`client.evaluation.clinical_summary`).
    The score and survival tables are unchanged, so are AUC, C-index and the
    operating point at ``threshold`` (score units, as in
    :func:`pooled_clinical_figures`); Brier, calibration, Hosmer-Lemeshow and
    net benefit are those of the recalibrated risks.

    Returns {"method", "fitted_on": validation patients (n_patients,
    n_positive, n_negative), "params", "description", "figures"}, or
    {"method", "error": why} when no recalibration can be fitted (one class,
    separated scores...) or the tables cannot be pooled: never raises for the data.
    """
    if method not in METHODS:
        raise ValueError(f"recalibration method must be one of {list(METHODS)}, got {method!r}")
    try:
        pooled = _pool(validation_score_summaries, AUC_KEYS, None, None)
        recalibration = fit_recalibration(pooled["auc_value"], pooled["auc_pos"], pooled["auc_neg"], method)
        recalibrated = [recalibrate_prob_table(dict(s), recalibration) for s in clinical_summaries]
        figures = pooled_clinical_figures(recalibrated, threshold, threshold_source, names, minimum)
    except ValueError as err:
        return {"method": method, "error": f"no {method} recalibration on the validation patients: {err}"}
    return {"method": method,
            "fitted_on": {"n_patients": recalibration.n_positive + recalibration.n_negative,
                          "n_positive": recalibration.n_positive, "n_negative": recalibration.n_negative},
            "params": json.loads(recalibration.to_json()), "description": recalibration.describe(),
            "figures": figures}
