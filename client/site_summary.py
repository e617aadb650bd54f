"""The work of `hccfed site-summary`: one hospital's predictions CSV -> an aggregate-only summary document.

Input CSV (one row per patient, header required):

    patient_id   any text; read only to check the row, never written out
    label        early recurrence: 1, 0, or empty when unknown (censored
                 before 24 months without recurrence)
    time         follow-up in months (>= 0)
    event        1 = recurrence observed at `time`, 0 = censored
    score_<m>    one column per model m: any risk score, higher = higher risk
                 (a logit, points, a log-risk, a hazard ratio: any scale)
    prob_<m>     optional: predicted probability of early recurrence in
                 [0, 1] for model m; when absent, prob = sigmoid(score_<m>)
                 (right for a logit score; give prob_<m> for any other scale)

The document (:func:`site_summary_document`) holds, per model, the exact
tables of :func:`common.metrics.summaries.model_summary` (each distinct
score, risk and (time, score) with its counts) and their declared totals; no
patient id, no row. Under ``epsilon`` the tables are noisy ones of a coarse
grid instead (:mod:`common.metrics.summary_dp`). A site smaller than the
minimum cell size writes nothing.

Paired DeLong tests between models need a second round
(:mod:`common.metrics.federated_delong`): `hccfed pool-summaries` writes a
request for each site (round2/<site>.json); the site runs `hccfed
site-summary --pooled round2/<site>.json` again and its document also
carries the sums of its patients' placement values. We chose this over one
joint table of every model's scores per patient, which would link them.
"""

from __future__ import annotations

import csv
import json
import secrets
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.special import expit

from hccfed.common.metrics.federated_delong import placement_sums
from hccfed.common.metrics.summaries import model_summary
from hccfed.common.metrics.summary_checks import MinimumCells, check_minimum, summary_totals
from hccfed.common.metrics.summary_codec import SITE_FORMAT, decode_request, encode_arrays, encode_placement_sums
from hccfed.common.metrics.summary_dp import DP_GRID, DPGrid, privatize_model_summary

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
    prob_arrays = {m: np.asarray(probs[m]) if m in probs else expit(score_arrays[m]) for m in models}
    return Predictions(labels=np.asarray(cols["label"]), times=np.asarray(cols["time"]),
                       events=np.asarray(cols["event"]), scores=score_arrays, probs=prob_arrays,
                       prob_source={m: f"column prob_{m}" if m in probs else f"sigmoid(score_{m})" for m in models})


def load_round2_request(path: str | Path) -> dict:
    """Read a round-2 request that `hccfed pool-summaries` wrote for one site (round2/<site>.json)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read the round-2 request ({err})") from None
    return decode_request(doc, path.name)


def site_summary_document(preds: Predictions, site_id: str, round2: dict | None = None,
                          epsilon: float | None = None, test_noise_seed: int | None = None,
                          dp_grid: DPGrid = DP_GRID,
                          minimum: MinimumCells = MinimumCells()) -> dict:
    """The JSON-ready summary of one site: tables and totals only, no patient-level value.

    ``round2`` (a request of :func:`load_round2_request`) adds the placement
    sums for the paired DeLong tests. With ``epsilon``, every model's tables
    are epsilon-DP on ``dp_grid`` (3 x epsilon per model, recorded in the
    document); paired tests are then refused, since the placement sums are
    exact. Raises ValueError naming the site when it is below ``minimum``.
    """
    if epsilon is not None and round2 is not None:
        raise ValueError("--pooled (paired DeLong sums) cannot be combined with --epsilon: "
                         "the placement sums would be released without noise")
    doc = {"format": SITE_FORMAT, "site_id": site_id, "protocol": "exact" if epsilon is None else "dp-laplace",
           "models": {}}
    if epsilon is not None:
        doc["privacy"] = {"mechanism": "Laplace noise on the counts of a coarse grid; tables at bin centres",
                          "grid": dp_grid.to_dict(), "epsilon_per_model": 3.0 * float(epsilon),
                          "epsilon_total": 3.0 * float(epsilon) * len(preds.scores),
                          "delta": 0.0, "neighbouring": "add / remove one patient",
                          "guarantee": "pure epsilon-DP (delta 0) under add / remove one patient: each patient "
                                       "adds 1 to one cell of each of 3 histograms per model, each cell noised "
                                       f"with Laplace(1 / {float(epsilon):g})",
                          "noise_source": ("operating system entropy" if test_noise_seed is None else
                                           f"TEST MODE: seed {test_noise_seed}; reproducible, so NOT private")}
    # The noise's generator: 128 bits of OS entropy, unless an explicit test mode gives a seed.
    rng = np.random.default_rng(secrets.randbits(128) if test_noise_seed is None else test_noise_seed)
    for m, s in preds.scores.items():
        rows = (preds.labels, s, preds.probs[m], preds.times, preds.events)
        exact = model_summary(*rows)
        check_minimum(exact, minimum, f"site {site_id}, model '{m}'")
        tables = (exact if epsilon is None else
                  privatize_model_summary(*rows, epsilon, rng, dp_grid, where=f"site {site_id}, model '{m}'"))
        doc["models"][m] = {"prob_source": preds.prob_source[m], "totals": summary_totals(tables),
                            "tables": encode_arrays(tables)}
    if round2 is not None:
        if round2["site_id"] != site_id:
            raise ValueError(f"the round-2 request is for site {round2['site_id']!r}, not {site_id!r} "
                             "(give this site's file, or its --site-id)")
        unknown = sorted(set(round2["models"]) - set(preds.scores))
        if unknown or len(round2["models"]) < 2:
            raise ValueError(f"the round-2 request lists models {sorted(round2['models'])}; this site has "
                             f"{sorted(preds.scores)} (a paired test needs 2 or more shared models)")
        sums = placement_sums(preds.labels, preds.scores, round2)
        doc["placement_sums"] = encode_placement_sums(sums)
    return doc
