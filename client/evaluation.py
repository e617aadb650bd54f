"""What a site sends after evaluating a model: fixed-size histograms, never rows.

The early-recurrence logits go into per-class score histograms (for the pooled
AUC and its DeLong CI); the Cox log-risks into (time bin x score bin)
histograms of events and of all patients (for the pooled C-index). The array
shapes depend only on the grid, not on the number of patients.
"""

from __future__ import annotations

import numpy as np

from hccfed.common.metrics.federated_clinical import ClinicalGrid, model_site_summary
from hccfed.common.metrics.summaries import SummaryGrid, site_summary

AUC_KEYS = ("auc_pos", "auc_neg")
#: Prefix of the clinical-summary arrays in an evaluate reply (the final test evaluation only).
CLINICAL_PREFIX = "clinical/"
CINDEX_KEYS = ("cidx_event", "cidx_all")


def evaluation_summary(logits: np.ndarray, log_risk: np.ndarray, labels: np.ndarray,
                       times: np.ndarray, events: np.ndarray,
                       grid: SummaryGrid | None = None) -> dict[str, np.ndarray]:
    """Histograms of one site's predictions: AUC arrays from the logits, C-index arrays from the risks."""
    grid = grid or SummaryGrid()
    labels = np.asarray(labels)
    from_logits = site_summary(labels, logits, times, events, grid)
    from_risks = site_summary(labels, log_risk, times, events, grid)
    out = {key: from_logits[key] for key in AUC_KEYS}
    out.update({key: from_risks[key] for key in CINDEX_KEYS})
    return out


def clinical_summary(logits: np.ndarray, log_risk: np.ndarray, labels: np.ndarray, times: np.ndarray,
                     events: np.ndarray, grid: ClinicalGrid | None = None) -> dict[str, np.ndarray]:
    """The full clinical summary of one model at one site (fixed-size counts and per-bin sums).

    Binary figures (AUC, threshold metrics, Brier, calibration, decision
    curves) come from the early-recurrence head: score = logit, probability =
    sigmoid(logit). Survival figures (C-index, Kaplan-Meier by risk group,
    log-rank, time-dependent AUC) come from the Cox head: the ``cidx_*``
    arrays are binned by log-risk. Keys and shapes: see
    :func:`common.metrics.federated_clinical.model_site_summary`.
    """
    grid = grid or ClinicalGrid()
    logits = np.asarray(logits, dtype=float)
    probs = 1.0 / (1.0 + np.exp(-np.clip(logits, -40.0, 40.0)))
    out = model_site_summary(labels, logits, probs, times, events, grid)
    survival = model_site_summary(labels, log_risk, probs, times, events, grid)
    out["cidx_event"], out["cidx_all"] = survival["cidx_event"], survival["cidx_all"]
    return out
