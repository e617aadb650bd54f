"""Site summaries that are exact for any score: tables of distinct values with their counts.

A site turns its patients' rows into tables (:func:`model_summary`, or
:func:`site_summary` for the discrimination and survival tables only); the
server merges the tables of all sites, adding the counts of equal values
(:func:`pool_summaries`). A pooled table is the table of the pooled rows, so
every figure computed from it (``common.metrics.summary_*``) is the
per-patient figure of the pooled rows, whatever the scale of the scores:
probabilities squeezed near 0, points, offsets, heavy tails, negative
scores, integer scores with ties. Nothing is binned, clipped or rounded; a
value is kept as the float the site read.

The tables of one model (flat keys, 1-D arrays, so a Flower ArrayRecord carries them):

- score table ``auc_value`` (k,) float64, strictly ascending, with
  ``auc_pos``, ``auc_neg`` (k,) int64: the patients with a known label
  (1 / 0) that have each distinct score. -> AUC, DeLong, ROC, thresholds.
- probability table ``prob_value``, ``prob_pos``, ``prob_neg``: the same for
  the predicted risk in [0, 1]. -> Brier, calibration, Hosmer-Lemeshow, net benefit.
- survival table ``cidx_time``, ``cidx_score`` (m,) float64, ordered by time
  then score, each (time, score) pair once, with ``cidx_event`` and
  ``cidx_all`` (m,) int64: the events and all patients (unknown labels
  included) that have it. -> C-index, Kaplan-Meier by risk group, log-rank,
  time-dependent AUC.

What a site reveals by them: for each model, the multiset of its patients'
(label, score) pairs, of their (label, risk) pairs and of their (time,
event, score) triples, each table unlinked from the others, from the other
models and from patient ids; the order of the rows is gone. That is what
exactness for any score costs: a coarser table could not rank a score of
one site against a close score of another. Sites below a minimum cell size
are refused (:mod:`common.metrics.summary_checks`) so that no single
patient's row can be read back; ``common.metrics.summary_dp`` releases
noisy, binned tables instead.

Sign convention: a HIGHER SCORE MEANS HIGHER RISK. Times are months >= 0;
events 1 = recurrence observed, 0 = censored; labels 1 / 0 / -1 (unknown).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "AUC_KEYS",
    "PROB_KEYS",
    "SURVIVAL_KEYS",
    "EVALUATION_KEYS",
    "MODEL_KEYS",
    "validate_rows",
    "class_table",
    "survival_table",
    "site_summary",
    "model_summary",
    "pool_summaries",
    "check_summary",
    "table_groups",
]

AUC_KEYS: tuple[str, ...] = ("auc_value", "auc_pos", "auc_neg")
PROB_KEYS: tuple[str, ...] = ("prob_value", "prob_pos", "prob_neg")
SURVIVAL_KEYS: tuple[str, ...] = ("cidx_time", "cidx_score", "cidx_event", "cidx_all")
#: What a site sends at each evaluation of a Flower run: the score and survival tables.
EVALUATION_KEYS: tuple[str, ...] = AUC_KEYS + SURVIVAL_KEYS
#: Every table of one model (the clinical summary).
MODEL_KEYS: tuple[str, ...] = AUC_KEYS + PROB_KEYS + SURVIVAL_KEYS
_GROUPS = {"auc": AUC_KEYS, "prob": PROB_KEYS, "cidx": SURVIVAL_KEYS}
_VALUE_KEYS = {"auc_value", "prob_value", "cidx_time", "cidx_score"}


def validate_rows(
    labels: ArrayLike, scores: ArrayLike, times: ArrayLike, events: ArrayLike
) -> tuple[NDArray, NDArray, NDArray, NDArray]:
    """Float arrays of shape (n,) for one site's rows; ValueError naming what is wrong."""
    arrays = {}
    for name, x in (("labels", labels), ("scores", scores), ("times", times), ("events", events)):
        a = np.asarray(x, dtype=float)
        if a.ndim != 1:
            raise ValueError(f"{name} must be 1-dimensional with shape (n,), got shape {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError(f"{name} contains NaN or infinite values ({int((~np.isfinite(a)).sum())} patients)")
        arrays[name] = a
    lengths = {k: v.shape[0] for k, v in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"mismatched lengths: {lengths}")
    if not np.isin(arrays["labels"], (-1.0, 0.0, 1.0)).all():
        raise ValueError("labels must be 1 (recurrence), 0 (no recurrence) or -1 (unknown)")
    if not np.isin(arrays["events"], (0.0, 1.0)).all():
        raise ValueError("events must contain only 0 and 1")
    if (arrays["times"] < 0).any():
        raise ValueError(f"times must be >= 0 months ({int((arrays['times'] < 0).sum())} patients are not)")
    return arrays["labels"], arrays["scores"], arrays["times"], arrays["events"]


def class_table(labels: NDArray, values: NDArray) -> tuple[NDArray, NDArray, NDArray]:
    """(distinct values ascending, positives, negatives) over the patients with label 1 or 0."""
    known = labels >= 0
    value, inverse = np.unique(values[known], return_inverse=True)
    pos = np.bincount(inverse, weights=labels[known] == 1, minlength=value.size).astype(np.int64)
    neg = np.bincount(inverse, weights=labels[known] == 0, minlength=value.size).astype(np.int64)
    return value.astype(np.float64), pos, neg


def survival_table(times: NDArray, events: NDArray, scores: NDArray) -> tuple[NDArray, NDArray, NDArray, NDArray]:
    """(time, score, events, patients) per distinct (time, score) pair, ordered by time then score."""
    pairs, inverse = np.unique(np.column_stack([times, scores]).reshape(-1, 2), axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    all_ = np.bincount(inverse, minlength=pairs.shape[0]).astype(np.int64)
    ev = np.bincount(inverse, weights=events, minlength=pairs.shape[0]).astype(np.int64)
    return pairs[:, 0].astype(np.float64), pairs[:, 1].astype(np.float64), ev, all_


def _tables(prefix: str, arrays: tuple[NDArray, ...]) -> dict[str, NDArray]:
    return dict(zip(_GROUPS[prefix], arrays))


def site_summary(labels: ArrayLike, scores: ArrayLike, times: ArrayLike, events: ArrayLike,
                 survival_scores: ArrayLike | None = None) -> dict[str, NDArray]:
    """The score table and the survival table of one site (keys :data:`EVALUATION_KEYS`).

    labels : shape (n,), 1 / 0 / -1 (unknown: left out of the score table,
        kept in the survival table). scores : shape (n,), finite, higher =
        higher risk. times : months >= 0. events : 1 = recurrence observed.
    survival_scores : shape (n,), the score of the survival table (e.g. a
        Cox log-risk beside the logit of ``scores``); default ``scores``.
    """
    y, s, t, e = validate_rows(labels, scores, times, events)
    r = s if survival_scores is None else validate_rows(labels, survival_scores, times, events)[1]
    return {**_tables("auc", class_table(y, s)), **_tables("cidx", survival_table(t, e, r))}


def model_summary(labels: ArrayLike, scores: ArrayLike, probs: ArrayLike, times: ArrayLike, events: ArrayLike,
                  survival_scores: ArrayLike | None = None) -> dict[str, NDArray]:
    """Every table of one model at one site (keys :data:`MODEL_KEYS`).

    As :func:`site_summary`, plus probs : shape (n,), the predicted risk of
    early recurrence in [0, 1] (calibration-type figures).
    """
    y, s, t, e = validate_rows(labels, scores, times, events)
    p = np.asarray(probs, dtype=float)
    if p.shape != y.shape:
        raise ValueError(f"mismatched lengths: probs has shape {p.shape}, labels {y.shape}")
    bad = ~np.isfinite(p) | (p < 0) | (p > 1)
    if bad.any():
        raise ValueError(f"probs must lie in [0, 1] ({int(bad.sum())} patients do not)")
    out = site_summary(y, s, t, e, survival_scores)
    out.update(_tables("prob", class_table(y, p)))
    return {k: out[k] for k in MODEL_KEYS}


def table_groups(summary: dict) -> list[str]:
    """Which tables (``auc``, ``prob``, ``cidx``) a summary holds; a partial table is an error."""
    groups = []
    for prefix, keys in _GROUPS.items():
        present = [k for k in keys if k in summary]
        if present and len(present) < len(keys):
            raise ValueError(f"the {prefix} table lacks {sorted(set(keys) - set(present))}")
        if present:
            groups.append(prefix)
    return groups


def check_summary(summary: dict, where: str = "summary", exact: bool = True) -> list[str]:
    """Check the tables of one summary; returns its table groups. ValueError naming ``where`` and the array.

    Values finite and strictly ascending (survival: by time, then score),
    counts non-negative integers, no empty row, events <= patients,
    probabilities in [0, 1], times >= 0, all arrays of a table equally long,
    and (``exact``; not for the noisy tables of ``summary_dp``) the score and
    probability tables holding the same patients.
    """
    try:
        groups = table_groups(summary)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    if not groups:
        raise ValueError(f"{where}: no table (expected the keys {list(MODEL_KEYS)})")
    for prefix in groups:
        keys = _GROUPS[prefix]
        arrays = {k: np.asarray(summary[k]) for k in keys}
        lengths = {a.shape for a in arrays.values()}
        if any(a.ndim != 1 for a in arrays.values()) or len(lengths) > 1:
            raise ValueError(f"{where}: the arrays {list(keys)} must be 1-D of one length, got shapes "
                             f"{ {k: a.shape for k, a in arrays.items()} }")
        for key, a in arrays.items():
            if key in _VALUE_KEYS:
                if not np.issubdtype(a.dtype, np.number) or not np.isfinite(a.astype(float)).all():
                    raise ValueError(f"{where}: '{key}' must hold finite numbers")
            elif not np.issubdtype(a.dtype, np.integer) or (a < 0).any():
                raise ValueError(f"{where}: '{key}' must hold non-negative integer counts")
        _check_order_and_rows(prefix, arrays, where)
    if exact and "auc" in groups and "prob" in groups:
        for cls in ("pos", "neg"):
            a, b = int(np.sum(summary[f"auc_{cls}"])), int(np.sum(summary[f"prob_{cls}"]))
            if a != b:
                raise ValueError(f"{where}: 'auc_{cls}' adds up to {a} patients but 'prob_{cls}' to {b}")
    return groups


def _check_order_and_rows(prefix: str, a: dict[str, NDArray], where: str) -> None:
    if prefix == "cidx":
        t, s = a["cidx_time"].astype(float), a["cidx_score"].astype(float)
        ascending = (np.diff(t) > 0) | ((np.diff(t) == 0) & (np.diff(s) > 0))
        if not ascending.all():
            raise ValueError(f"{where}: 'cidx_time', 'cidx_score' must be ordered by time then score, "
                             f"each pair once (row {int(np.argmin(ascending)) + 1} is not)")
        if (t < 0).any():
            raise ValueError(f"{where}: 'cidx_time' holds negative times")
        if (a["cidx_all"] < 1).any():
            raise ValueError(f"{where}: 'cidx_all' has an empty row")
        if (a["cidx_event"] > a["cidx_all"]).any():
            raise ValueError(f"{where}: 'cidx_event' exceeds 'cidx_all' in "
                             f"{int((a['cidx_event'] > a['cidx_all']).sum())} rows (more events than patients)")
        return
    value = a[f"{prefix}_value"].astype(float)
    if not (np.diff(value) > 0).all():
        raise ValueError(f"{where}: '{prefix}_value' must be strictly ascending, each value once")
    if ((a[f"{prefix}_pos"] + a[f"{prefix}_neg"]) < 1).any():
        raise ValueError(f"{where}: the {prefix} table has an empty row")
    if prefix == "prob" and value.size and (value[0] < 0 or value[-1] > 1):
        raise ValueError(f"{where}: 'prob_value' holds values outside [0, 1]")


def _merge_class(tables: list[tuple[NDArray, NDArray, NDArray]]) -> tuple[NDArray, NDArray, NDArray]:
    value, inverse = np.unique(np.concatenate([np.asarray(t[0], dtype=float) for t in tables]), return_inverse=True)
    out = []
    for col in (1, 2):
        counts = np.concatenate([np.asarray(t[col], dtype=np.int64) for t in tables])
        out.append(np.bincount(inverse, weights=counts, minlength=value.size).astype(np.int64))
    return value, out[0], out[1]


def _merge_survival(tables: list[tuple[NDArray, ...]]) -> tuple[NDArray, NDArray, NDArray, NDArray]:
    pairs = np.concatenate([np.column_stack([np.asarray(t[0], float), np.asarray(t[1], float)]).reshape(-1, 2)
                            for t in tables])
    unique, inverse = np.unique(pairs, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    out = []
    for col in (2, 3):
        counts = np.concatenate([np.asarray(t[col], dtype=np.int64) for t in tables])
        out.append(np.bincount(inverse, weights=counts, minlength=unique.shape[0]).astype(np.int64))
    return unique[:, 0].copy(), unique[:, 1].copy(), out[0], out[1]


def pool_summaries(summaries: list[dict], names: list[str] | None = None, exact: bool = True) -> dict[str, NDArray]:
    """Merge site summaries: equal values share a row, their counts add up; order does not matter.

    Every summary is checked (:func:`check_summary` with ``exact``, errors
    name the site by ``names[i]`` or its position) and all must hold the same tables.
    Returns the pooled tables (the tables of the pooled rows).
    """
    if not summaries:
        raise ValueError("pool_summaries needs at least one site summary")
    names = [f"summary {i}" for i in range(len(summaries))] if names is None else list(names)
    groups = [check_summary(s, names[i], exact) for i, s in enumerate(summaries)]
    for i, g in enumerate(groups):
        if g != groups[0]:
            raise ValueError(f"{names[i]} holds the tables {g}, {names[0]} holds {groups[0]}")
    pooled: dict[str, NDArray] = {}
    for prefix in groups[0]:
        keys = _GROUPS[prefix]
        tables = [tuple(np.asarray(s[k]) for k in keys) for s in summaries]
        merged = _merge_survival(tables) if prefix == "cidx" else _merge_class(tables)
        pooled.update(dict(zip(keys, merged)))
    return pooled
