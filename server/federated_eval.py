"""Pooled evaluation figures from site summaries (histograms), never from rows."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from hccfed.common.metrics.federated_clinical import ClinicalGrid, pool_model_summaries
from hccfed.common.metrics.summaries import auc_from_summary, cindex_from_summary, pool_summaries
from hccfed.server.pool_summaries import jsonable, model_figures

SUMMARY_KEYS = ("auc_pos", "auc_neg", "cidx_event", "cidx_all")


def pooled_figures(summaries: list[Mapping[str, np.ndarray]], alpha: float = 0.05) -> dict[str, float]:
    """AUC with DeLong CI and Harrell's C-index over all sites' patients together."""
    if not summaries:
        raise ValueError("no site summaries to pool")
    pooled = pool_summaries([{k: np.asarray(s[k]) for k in SUMMARY_KEYS} for s in summaries])
    figures: dict[str, float] = {}
    try:
        auc = auc_from_summary(pooled, alpha=alpha)
        figures.update({"auc": auc["auc"], "auc_se": auc["se"], "auc_ci_lower": auc["ci_lower"],
                        "auc_ci_upper": auc["ci_upper"], "n_positive": auc["n_pos"], "n_negative": auc["n_neg"]})
    except ValueError:  # one class only: AUC undefined
        figures.update({"auc": float("nan"), "auc_ci_lower": float("nan"), "auc_ci_upper": float("nan")})
    try:
        cidx = cindex_from_summary(pooled)
        figures.update({"c_index": cidx["c_index"], "comparable_pairs": cidx["comparable_pairs"],
                        "n_patients": cidx["n"], "n_events": cidx["n_events"]})
    except ValueError:  # no comparable pair
        figures.update({"c_index": float("nan")})
    return {k: float(v) for k, v in figures.items()}


def pooled_clinical_figures(summaries: list[Mapping[str, np.ndarray]]) -> dict:
    """Every clinical figure of one model over all sites' patients, from their clinical summaries.

    ``summaries``: one :func:`client.evaluation.clinical_summary`-shaped dict
    per site. Returns what :func:`server.pool_summaries.model_figures` gives
    (JSON-ready; a figure undefined on the data is {"error": ...}).
    """
    pooled = pool_model_summaries([dict(s) for s in summaries])
    return jsonable(model_figures(pooled, ClinicalGrid()))
