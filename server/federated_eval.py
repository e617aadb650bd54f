"""Pooled evaluation figures from the sites' summary tables, never from rows.

Used by the Flower training run (each round's validation and the final test
evaluation), by the federated classical models and by the simulation. The
tables are exact (:mod:`common.metrics.summaries`), so the pooled figures are
those of the pooled rows. No minimum cell size is applied unless one is
given: the training run's sites decide what they send; `hccfed
pool-summaries` applies one by default.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from hccfed.common.metrics.summaries import EVALUATION_KEYS, MODEL_KEYS, pool_summaries
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
    return youden_threshold_from_summary(_pool(summaries, ("auc_value", "auc_pos", "auc_neg"), names, None))


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
