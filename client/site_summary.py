"""`hccfed site-summary`: one hospital's predictions CSV -> aggregate-only JSON.

Input CSV (one row per patient, header required):

    patient_id   any text; read only to check the row, never written out
    label        early recurrence: 1, 0, or empty when unknown (censored
                 before 24 months without recurrence)
    time         follow-up in months (>= 0)
    event        1 = recurrence observed at `time`, 0 = censored
    score_<m>    one column per model m: logit or log-risk, higher = higher risk
    prob_<m>     optional: predicted probability of early recurrence in
                 [0, 1] for model m; when absent, prob = sigmoid(score_<m>)
                 (right for a logit score; give prob_<m> for a Cox log-risk)

Output JSON: the grid, and per model the fixed-size arrays of
:func:`common.metrics.federated_clinical.model_site_summary` (counts and sums
per bin), sparse-encoded. No patient id, no row, no per-patient value.

Paired DeLong tests between models need a second step (see
:mod:`common.metrics.federated_delong`): after `hccfed pool-summaries` has
written `pooled_histograms.json`, each site runs `hccfed site-summary
--pooled pooled_histograms.json` again and the JSON also carries the sums
of its patients' placement values against the pooled histograms. We chose
this two-step protocol over one joint (model A score x model B score)
histogram, whose size grows with the square of the score resolution.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hccfed.common.metrics.federated_clinical import DP_GRID, ClinicalGrid, model_site_summary, privatize_model_summary
from hccfed.common.metrics.federated_delong import placement_sums
from hccfed.common.metrics.summary_codec import decode_arrays, encode_arrays

SITE_FORMAT = "hccfed-site-summary/1"
POOLED_FORMAT = "hccfed-pooled-histograms/1"
REQUIRED = ("patient_id", "label", "time", "event")


@dataclass(frozen=True)
class Predictions:
    """One site's validated rows as arrays of shape (n,); labels -1 = unknown."""

    labels: np.ndarray
    times: np.ndarray
    events: np.ndarray
    scores: dict[str, np.ndarray]
    probs: dict[str, np.ndarray]
    prob_source: dict[str, str]


def _number(path: Path, row: int, column: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{path.name} row {row}, column '{column}': {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{path.name} row {row}, column '{column}': {text!r} is not a finite number")
    return value


def _zero_one(path: Path, row: int, column: str, text: str, allow_empty: bool) -> float:
    if allow_empty and text == "":
        return -1.0
    if text not in ("0", "1", "0.0", "1.0"):
        empty = " (or empty when unknown)" if allow_empty else ""
        raise ValueError(f"{path.name} row {row}, column '{column}': {text!r} is not 0 or 1{empty}")
    return float(text)


def read_predictions(path: str | Path) -> Predictions:
    """Read and validate a predictions CSV (see the module docstring).

    Errors name the file, the row (its line number; the header is row 1) and
    the column, e.g. "preds.csv row 7, column 'event': 'yes' is not 0 or 1".
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such predictions file")
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise ValueError(f"{path.name}: missing column(s) {missing}; the header is {header}")
        models = [h[len("score_"):] for h in header if h.startswith("score_") and len(h) > len("score_")]
        if not models:
            raise ValueError(f"{path.name}: no score_<model> column; the header is {header}")
        prob_models = [m for m in models if f"prob_{m}" in header]
        orphans = [h for h in header if h.startswith("prob_") and h[len("prob_"):] not in models]
        if orphans:
            raise ValueError(f"{path.name}: column(s) {orphans} have no matching score_<model> column")
        cols: dict[str, list[float]] = {c: [] for c in ("label", "time", "event")}
        scores = {m: [] for m in models}
        probs = {m: [] for m in prob_models}
        for row_no, raw in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
            if row.get("patient_id", "") == "":
                raise ValueError(f"{path.name} row {row_no}, column 'patient_id': empty")
            cols["label"].append(_zero_one(path, row_no, "label", row["label"], allow_empty=True))
            t = _number(path, row_no, "time", row["time"])
            if t < 0:
                raise ValueError(f"{path.name} row {row_no}, column 'time': {row['time']!r} is negative (months >= 0)")
            cols["time"].append(t)
            cols["event"].append(_zero_one(path, row_no, "event", row["event"], allow_empty=False))
            for m in models:
                scores[m].append(_number(path, row_no, f"score_{m}", row[f"score_{m}"]))
            for m in prob_models:
                p = _number(path, row_no, f"prob_{m}", row[f"prob_{m}"])
                if not 0.0 <= p <= 1.0:
                    raise ValueError(f"{path.name} row {row_no}, column 'prob_{m}': {row[f'prob_{m}']!r} is not in [0, 1]")
                probs[m].append(p)
    if not cols["time"]:
        raise ValueError(f"{path.name}: no patient rows")
    score_arrays = {m: np.asarray(v) for m, v in scores.items()}
    prob_arrays = {m: np.asarray(probs[m]) if m in probs else 1.0 / (1.0 + np.exp(-score_arrays[m])) for m in models}
    return Predictions(labels=np.asarray(cols["label"]), times=np.asarray(cols["time"]),
                       events=np.asarray(cols["event"]), scores=score_arrays, probs=prob_arrays,
                       prob_source={m: f"column prob_{m}" if m in probs else f"sigmoid(score_{m})" for m in models})


def load_pooled_histograms(path: str | Path) -> tuple[ClinicalGrid, dict[str, dict]]:
    """Read the `pooled_histograms.json` written by `hccfed pool-summaries`."""
    path = Path(path)
    data = json.loads(path.read_text())
    if data.get("format") != POOLED_FORMAT:
        raise ValueError(f"{path.name}: not a pooled-histograms file (format {data.get('format')!r})")
    grid = ClinicalGrid.from_dict(data["grid"])
    return grid, {m: decode_arrays(a, f"{path.name} model '{m}'") for m, a in data["models"].items()}


def site_summary_document(preds: Predictions, site_id: str, grid: ClinicalGrid | None = None,
                          pooled: tuple[ClinicalGrid, dict[str, dict]] | None = None,
                          epsilon: float | None = None, seed: int | None = None) -> dict:
    """The JSON-ready summary of one site: only aggregate arrays, no patient-level value.

    With ``pooled`` (round 2), also ``placement_sums`` against the pooled
    histograms for the paired DeLong tests (the pooled grid is then used).
    With ``epsilon``, every model's arrays are made epsilon-DP on the coarse
    ``DP_GRID`` (:func:`privatize_model_summary`; 3 * epsilon per model,
    recorded in the document); paired tests are then refused, since the
    placement sums are exact.
    """
    if epsilon is not None:
        if pooled is not None:
            raise ValueError("--pooled (paired DeLong sums) cannot be combined with --epsilon: "
                             "the placement sums would be released without noise")
        grid = DP_GRID if grid is None else grid
    if pooled is not None:
        grid = pooled[0]
    grid = ClinicalGrid() if grid is None else grid
    rng = np.random.default_rng(seed)
    doc = {"format": SITE_FORMAT, "site_id": site_id, "grid": grid.to_dict(), "models": {}}
    if epsilon is not None:
        doc["privacy"] = {"mechanism": "Laplace on counts, sums rebuilt at bin centres",
                          "epsilon_per_model": 3.0 * float(epsilon),
                          "epsilon_total": 3.0 * float(epsilon) * len(preds.scores)}
    for m, s in preds.scores.items():
        arrays = model_site_summary(preds.labels, s, preds.probs[m], preds.times, preds.events, grid)
        if epsilon is not None:
            arrays = privatize_model_summary(arrays, epsilon, rng, grid)
        doc["models"][m] = {"prob_source": preds.prob_source[m], "arrays": encode_arrays(arrays)}
    if pooled is not None:
        histograms = pooled[1]
        unknown = sorted(set(histograms) - set(preds.scores))
        if unknown or len(histograms) < 2:
            raise ValueError(f"the pooled histograms list models {sorted(histograms)}; this site has "
                             f"{sorted(preds.scores)} (a paired test needs 2 or more shared models)")
        models = sorted(histograms)
        sums = placement_sums(preds.labels, {m: preds.scores[m] for m in models}, histograms, grid.base)
        doc["placement_sums"] = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in sums.items()}
    return doc


def write_site_summary(predictions: str | Path, out: str | Path, site_id: str | None = None,
                       pooled: str | Path | None = None, epsilon: float | None = None,
                       seed: int | None = None) -> Path:
    """Read ``predictions``, write the site summary JSON to ``out``; returns ``out``."""
    preds = read_predictions(predictions)
    site = site_id or Path(predictions).stem
    doc = site_summary_document(preds, site, pooled=load_pooled_histograms(pooled) if pooled else None,
                                epsilon=epsilon, seed=seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc))
    return out
