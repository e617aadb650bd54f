"""What a site sends after evaluating a model: tables of distinct predictions with their counts, never rows.

The early-recurrence logits go into the score table (per distinct logit: its
positives and negatives; for the pooled AUC and its DeLong CI); the Cox
log-risks into the survival table (per distinct (time, log-risk): events and
patients; for the pooled C-index). The pooled figures equal those of the
pooled rows exactly (:mod:`common.metrics.summaries`, which also says what
the tables reveal).
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit

from hccfed.common.metrics.summaries import model_summary, site_summary

#: Prefix of the clinical-summary arrays in an evaluate reply (the final test evaluation only).
CLINICAL_PREFIX = "clinical/"


def evaluation_summary(logits: np.ndarray, log_risk: np.ndarray, labels: np.ndarray,
                       times: np.ndarray, events: np.ndarray) -> dict[str, np.ndarray]:
    """The score table of the logits and the survival table of the log-risks of one site's patients.

    Shapes (n,); labels 1 / 0 / -1 (unknown); times in months; events 1 =
    recurrence observed. Keys :data:`common.metrics.summaries.EVALUATION_KEYS`.
    """
    return site_summary(labels, logits, times, events, survival_scores=log_risk)


def clinical_summary(logits: np.ndarray, log_risk: np.ndarray, labels: np.ndarray, times: np.ndarray,
                     events: np.ndarray) -> dict[str, np.ndarray]:
    """Every table of one model at one site (keys :data:`common.metrics.summaries.MODEL_KEYS`).

    Binary figures (AUC, threshold metrics, Brier, calibration, decision
    curves) come from the early-recurrence head: score = logit, probability =
    sigmoid(logit). Survival figures (C-index, Kaplan-Meier by risk group,
    log-rank, time-dependent AUC) come from the Cox head: the survival table
    holds the log-risks.
    """
    logits = np.asarray(logits, dtype=float)
    return model_summary(labels, logits, expit(logits), times, events, survival_scores=log_risk)
