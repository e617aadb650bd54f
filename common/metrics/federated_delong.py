"""Paired DeLong test between models across sites: a second summary round.

Round 1: each site sends per-class score histograms of every model
(``auc_pos``, ``auc_neg`` of :func:`common.metrics.federated_clinical.model_site_summary`);
the server pools them. Round 2: the server sends the pooled histograms back;
each site computes its own patients' DeLong placement values against them
(V10 for positives: the pooled fraction of negatives below, plus half of
those in the same bin; V01 for negatives: the fraction of positives above,
plus half) and returns only their sums, squares and cross-products over
the models (:func:`placement_sums`). The server adds them
(:func:`pool_placement_sums`) and gets the pooled placement covariance
matrices, hence the paired z-test (:func:`delong_paired_from_sums`).

Exactness: the result is :func:`common.metrics.clinical.delong_paired_test`
on the score-bin indices; it equals the per-patient test when each score
bin holds at most one distinct score. Patients with an unknown label (-1)
take no part. A HIGHER SCORE MEANS HIGHER RISK.
"""

from __future__ import annotations

import hashlib

import numpy as np
from numpy.typing import ArrayLike, NDArray

from hccfed.common.metrics.clinical import delong_paired_test_from_moments
from hccfed.common.metrics.summaries import SummaryGrid

__all__ = ["histogram_fingerprint", "placement_sums", "pool_placement_sums", "delong_paired_from_sums"]

PLACEMENT_KEYS = ("n_pos", "n_neg", "v10_sum", "v10_cross", "v01_sum", "v01_cross")


def histogram_fingerprint(pooled_by_model: dict[str, dict], models: list[str]) -> str:
    """SHA-256 of the pooled per-class score histograms of ``models`` (in that order).

    A site includes it in its round-2 answer; the server checks it against
    the pool of the round-1 summaries it was given, so placement sums
    computed against different histograms are refused.
    """
    h = hashlib.sha256()
    for name in models:
        h.update(name.encode())
        for key in ("auc_pos", "auc_neg"):
            h.update(np.ascontiguousarray(np.asarray(pooled_by_model[name][key], dtype=np.int64)).tobytes())
    return h.hexdigest()


def _placement_tables(pos: NDArray, neg: NDArray) -> tuple[NDArray, NDArray]:
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"pooled histograms hold one class only (n_pos={n_pos}, n_neg={n_neg})")
    v10 = (np.cumsum(neg) - neg + 0.5 * neg) / n_neg
    v01 = (n_pos - np.cumsum(pos) + 0.5 * pos) / n_pos
    return v10, v01


def placement_sums(
    labels: ArrayLike, scores_by_model: dict[str, ArrayLike], pooled_by_model: dict[str, dict],
    grid: SummaryGrid | None = None,
) -> dict:
    """One site's round-2 answer: sums of its patients' placement values.

    Parameters
    ----------
    labels : shape (n,), 1 / 0 / -1 (unknown, ignored).
    scores_by_model : model name -> scores of shape (n,), same patients.
    pooled_by_model : model name -> pooled ``auc_pos``/``auc_neg`` histograms.
    grid : the score grid of the histograms.

    Returns
    -------
    dict with models (names, order of the matrices), n_pos, n_neg,
    v10_sum (k,), v10_cross (k, k) = sum of V10 V10^T over positives, and
    v01_sum, v01_cross likewise over negatives, plus fingerprint.
    """
    grid = SummaryGrid() if grid is None else grid
    models = list(scores_by_model)
    y = np.asarray(labels, dtype=float)
    pos_mask, neg_mask = y == 1, y == 0
    v10 = np.empty((len(models), int(pos_mask.sum())))
    v01 = np.empty((len(models), int(neg_mask.sum())))
    for k, name in enumerate(models):
        s = np.asarray(scores_by_model[name], dtype=float)
        if s.shape != y.shape:
            raise ValueError(f"scores of model '{name}' have shape {s.shape}, labels {y.shape}")
        t10, t01 = _placement_tables(np.asarray(pooled_by_model[name]["auc_pos"]),
                                     np.asarray(pooled_by_model[name]["auc_neg"]))
        b = grid.score_bin_index(s)
        v10[k], v01[k] = t10[b[pos_mask]], t01[b[neg_mask]]
    return {"models": models, "n_pos": int(pos_mask.sum()), "n_neg": int(neg_mask.sum()),
            "v10_sum": v10.sum(axis=1), "v10_cross": v10 @ v10.T,
            "v01_sum": v01.sum(axis=1), "v01_cross": v01 @ v01.T,
            "fingerprint": histogram_fingerprint(pooled_by_model, models)}


def pool_placement_sums(answers: list[dict]) -> dict:
    """Add the sites' round-2 answers; they must list the same models and fingerprint."""
    if not answers:
        raise ValueError("no round-2 answers to pool")
    models, fp = list(answers[0]["models"]), answers[0].get("fingerprint")
    for i, a in enumerate(answers):
        if list(a["models"]) != models:
            raise ValueError(f"round-2 answer {i} lists models {list(a['models'])}, expected {models}")
        if a.get("fingerprint") != fp:
            raise ValueError(f"round-2 answer {i} was computed against different pooled histograms")
    out = {"models": models, "fingerprint": fp}
    for key in PLACEMENT_KEYS:
        out[key] = np.sum([np.asarray(a[key], dtype=float) for a in answers], axis=0)
    return out


def delong_paired_from_sums(pooled: dict, model_a: str, model_b: str) -> dict[str, float]:
    """Paired DeLong z-test of AUC(model_a) - AUC(model_b) from pooled placement sums.

    Covariances: S10 = (sum V10 V10^T - n_pos * mean mean^T) / (n_pos - 1),
    likewise S01; then as :func:`common.metrics.clinical.delong_paired_test`.
    """
    models = list(pooled["models"])
    i, j = models.index(model_a), models.index(model_b)
    n_pos, n_neg = float(pooled["n_pos"]), float(pooled["n_neg"])
    if n_pos < 2 or n_neg < 2:
        raise ValueError(f"DeLong covariance needs at least 2 positives and 2 negatives (n_pos={n_pos}, n_neg={n_neg})")
    covs = []
    for key, n in (("v10", n_pos), ("v01", n_neg)):
        total = np.asarray(pooled[f"{key}_sum"], dtype=float)
        cross = np.asarray(pooled[f"{key}_cross"], dtype=float)
        covs.append((cross - np.outer(total, total) / n) / (n - 1.0))
    auc = np.asarray(pooled["v10_sum"], dtype=float) / n_pos
    return delong_paired_test_from_moments(int(n_pos), int(n_neg), auc, covs[0], covs[1], i, j)
