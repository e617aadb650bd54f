"""Paired DeLong test between models across sites: a second, exact summary round.

Round 1: each site sends the score table of every model
(:func:`common.metrics.summaries.model_summary`); the server pools them.
Round 2: the server sends each site a request (:func:`placement_request`)
holding, for the distinct scores that site sent, their DeLong placement
values against the pooled table (V10 for positives: the pooled fraction of
negatives below the score plus half of those at it; V01 for negatives: the
fraction of positives above plus half). The site looks its patients' scores
up and returns only sums, squares and cross-products over the models
(:func:`placement_sums`); the server adds them (:func:`pool_placement_sums`)
and gets the pooled placement covariance matrices, hence the paired z-test
(:func:`delong_paired_from_sums`), equal to
:func:`common.metrics.clinical.delong_paired_test` on the pooled rows.

What round 2 shows a site: the pooled placement of its own scores, i.e. how
many of the other sites' patients of each class score below each of its
scores; not the other sites' scores. Patients with an unknown label (-1)
take no part. A HIGHER SCORE MEANS HIGHER RISK.
"""

from __future__ import annotations

import hashlib

import numpy as np
from numpy.typing import ArrayLike

from hccfed.common.metrics.clinical import delong_paired_test_from_moments
from hccfed.common.metrics.summary_discrimination import class_counts, placements_from_counts

__all__ = ["pooled_fingerprint", "placement_request", "placement_sums", "pool_placement_sums",
           "check_placement_sums", "delong_paired_from_sums"]

PLACEMENT_KEYS = ("n_pos", "n_neg", "v10_sum", "v10_cross", "v01_sum", "v01_cross")


def pooled_fingerprint(pooled_by_model: dict[str, dict], models: list[str]) -> str:
    """SHA-256 of the pooled score tables of ``models`` (in that order).

    A site includes it in its round-2 answer; the server checks it against
    the pool of the round-1 tables it holds, so placement sums computed
    against another pool are refused.
    """
    h = hashlib.sha256()
    for name in models:
        h.update(name.encode() + b"\0")
        for key, dtype in (("auc_value", np.float64), ("auc_pos", np.int64), ("auc_neg", np.int64)):
            h.update(np.ascontiguousarray(np.asarray(pooled_by_model[name][key], dtype=dtype)).tobytes())
    return h.hexdigest()


def placement_request(pooled_by_model: dict[str, dict], site_by_model: dict[str, dict], site_id: str) -> dict:
    """What the server sends one site in round 2: its distinct scores with their pooled placements.

    pooled_by_model, site_by_model : model name -> score table (``auc_*``),
    pooled and of this site. Returns {"site_id", "fingerprint", "models":
    {name: {"value", "v10", "v01"}}} with arrays of the site's table length.
    """
    models = sorted(pooled_by_model)
    out = {"site_id": site_id, "fingerprint": pooled_fingerprint(pooled_by_model, models), "models": {}}
    for name in models:
        value, pos, neg = class_counts(pooled_by_model[name])
        v10, v01 = placements_from_counts(pos, neg)
        own = np.asarray(site_by_model[name]["auc_value"], dtype=float)
        at = np.searchsorted(value, own)
        if own.size and (at.max() >= value.size or (value[at] != own).any()):
            raise ValueError(f"site {site_id}, model '{name}': its scores are not all in the pooled table "
                             "(its summary was not part of the pool)")
        out["models"][name] = {"value": own, "v10": v10[at], "v01": v01[at]}
    return out


def placement_sums(labels: ArrayLike, scores_by_model: dict[str, ArrayLike], request: dict) -> dict:
    """One site's round-2 answer: sums of its patients' placement values.

    Parameters
    ----------
    labels : shape (n,), 1 / 0 / -1 (unknown, ignored).
    scores_by_model : model name -> scores of shape (n,), the same patients.
    request : this site's :func:`placement_request`.

    Returns
    -------
    dict with models (the order of the matrices), n_pos, n_neg, v10_sum (k,),
    v10_cross (k, k) = sum of V10 V10^T over positives, v01_sum and v01_cross
    likewise over negatives, and the fingerprint of the pool they refer to.
    """
    models = sorted(request["models"])
    missing = sorted(set(models) - set(scores_by_model))
    if missing:
        raise ValueError(f"the round-2 request names model(s) {missing} that this site has no scores of")
    y = np.asarray(labels, dtype=float)
    pos, neg = y == 1, y == 0
    v10, v01 = np.empty((len(models), int(pos.sum()))), np.empty((len(models), int(neg.sum())))
    for k, name in enumerate(models):
        s = np.asarray(scores_by_model[name], dtype=float)
        if s.shape != y.shape:
            raise ValueError(f"scores of model '{name}' have shape {s.shape}, labels {y.shape}")
        table = request["models"][name]
        value = np.asarray(table["value"], dtype=float)
        known = s[y >= 0]
        at = np.minimum(np.searchsorted(value, known), max(value.size - 1, 0))
        unlisted = np.ones(known.shape, bool) if value.size == 0 else value[at] != known
        if unlisted.any():
            raise ValueError(f"model '{name}': {int(np.sum(unlisted))} patients' scores are not in the round-2 "
                             f"request for site {request.get('site_id')!r} (it was made from another summary of "
                             "this site: run round 1 again)")
        at_of = np.full(y.shape, -1)
        at_of[y >= 0] = at
        v10[k] = np.asarray(table["v10"], dtype=float)[at_of[pos]]
        v01[k] = np.asarray(table["v01"], dtype=float)[at_of[neg]]
    return {"models": models, "n_pos": int(pos.sum()), "n_neg": int(neg.sum()),
            "v10_sum": v10.sum(axis=1), "v10_cross": v10 @ v10.T,
            "v01_sum": v01.sum(axis=1), "v01_cross": v01 @ v01.T, "fingerprint": request["fingerprint"]}


def check_placement_sums(answer: dict, where: str, models: list[str] | None = None,
                         n_pos: int | None = None, n_neg: int | None = None) -> None:
    """Refuse a round-2 answer that cannot be true; ValueError naming ``where`` and the field.

    Placement values lie in [0, 1], so each sum lies in [0, n], each square
    sum between (sum)^2 / n and the sum, and the cross-product matrices are
    symmetric; the counts must match the site's round-1 tables when given.
    """
    try:
        k = len(answer["models"])
        if models is not None and list(answer["models"]) != list(models):
            raise ValueError(f"'models' lists {list(answer['models'])}, expected {list(models)}")
        for cls, expected in (("pos", n_pos), ("neg", n_neg)):
            n = answer[f"n_{cls}"]
            if not isinstance(n, (int, np.integer)) or n < 0:
                raise ValueError(f"'n_{cls}' must be a non-negative integer, got {n!r}")
            if expected is not None and n != expected:
                raise ValueError(f"'n_{cls}' is {n}, but the site's round-1 table counts {expected}")
            key = "v10" if cls == "pos" else "v01"
            total = np.asarray(answer[f"{key}_sum"], dtype=float)
            cross = np.asarray(answer[f"{key}_cross"], dtype=float)
            if total.shape != (k,) or cross.shape != (k, k) or not (np.isfinite(total).all() and np.isfinite(cross).all()):
                raise ValueError(f"'{key}_sum' / '{key}_cross' must be finite of shapes ({k},) and ({k}, {k})")
            tol = 1e-9 * max(1, n)
            diag = np.diag(cross)
            if ((total < -tol) | (total > n + tol)).any() or (diag > total + tol).any() or \
                    (n > 0 and (diag < total**2 / n - tol).any()) or not np.allclose(cross, cross.T, atol=tol):
                raise ValueError(f"'{key}_sum' / '{key}_cross' are impossible for {n} placement values in [0, 1]")
    except (KeyError, TypeError) as err:
        raise ValueError(f"{where}: malformed placement sums ({err})") from None
    except ValueError as err:
        raise ValueError(f"{where}: placement sums: {err}") from None


def pool_placement_sums(answers: list[dict], names: list[str] | None = None) -> dict:
    """Add the sites' round-2 answers; they must list the same models and fingerprint."""
    if not answers:
        raise ValueError("no round-2 answers to pool")
    names = [f"round-2 answer {i}" for i in range(len(answers))] if names is None else names
    models, fp = list(answers[0]["models"]), answers[0].get("fingerprint")
    for name, a in zip(names, answers):
        check_placement_sums(a, name, models)
        if a.get("fingerprint") != fp:
            raise ValueError(f"{name} was computed against different pooled tables")
    out = {"models": models, "fingerprint": fp}
    for key in PLACEMENT_KEYS:
        out[key] = np.sum([np.asarray(a[key], dtype=float) for a in answers], axis=0)
    return out


def delong_paired_from_sums(pooled: dict, model_a: str, model_b: str) -> dict[str, float]:
    """Paired DeLong z-test of AUC(model_a) - AUC(model_b) from pooled placement sums.

    Covariances: S10 = (sum V10 V10^T - n_pos mean mean^T) / (n_pos - 1),
    likewise S01; then as :func:`common.metrics.clinical.delong_paired_test`.
    """
    models = list(pooled["models"])
    i, j = models.index(model_a), models.index(model_b)
    n_pos, n_neg = float(pooled["n_pos"]), float(pooled["n_neg"])
    if n_pos < 2 or n_neg < 2:
        raise ValueError(f"DeLong covariance needs at least 2 positives and 2 negatives (n_pos={n_pos:.0f}, "
                         f"n_neg={n_neg:.0f})")
    covs = []
    for key, n in (("v10", n_pos), ("v01", n_neg)):
        total = np.asarray(pooled[f"{key}_sum"], dtype=float)
        cross = np.asarray(pooled[f"{key}_cross"], dtype=float)
        covs.append((cross - np.outer(total, total) / n) / (n - 1.0))
    auc = np.asarray(pooled["v10_sum"], dtype=float) / n_pos
    return delong_paired_test_from_moments(int(n_pos), int(n_neg), auc, covs[0], covs[1], i, j)

