"""Recalibration of a model's risks, fitted on a score table (:mod:`common.metrics.summaries`), never on rows.

The server pools the sites' validation score tables (distinct logits with
their positives and negatives; the tables every round's validation already
sends) and fits a map from score to probability on them:

- **Platt scaling** (:func:`fit_platt_from_table`): the maximum-likelihood
  logistic regression ``P(y=1) = sigmoid(a + b * score)``. A distinct score
  enters once, weighted by its patients, so the estimate is the MLE on the
  pooled rows. It does not exist when one class is missing or when the
  scores separate the classes (every positive at or above every negative, or
  the reverse): both are a ValueError that says so, never huge numbers.
- **Isotonic regression** (:func:`fit_isotonic_from_table`): the weighted
  pool-adjacent-violators fit of the positive rate on the score, as
  ``sklearn.isotonic.IsotonicRegression(out_of_bounds="clip")`` on the pooled
  rows: the same breakpoints, linear interpolation between them, the end
  values outside them. (sklearn merges scores closer than 1e-15 in absolute
  value; here every distinct float is its own score.) Its risks are often
  exactly 0 or 1 at the ends (a lowest block without positives...): the
  logistic calibration slope of such risks, on logits clipped at 1e-12,
  says little; read the Brier score and the calibration curve.

:class:`Recalibration` holds the fitted map (plain JSON: what a server sends
or stores) and applies it; :func:`recalibrate_prob_table` rewrites the
probability table of a (site or pooled) model summary with it. The map is
monotone, so a recalibrated table is the table of the recalibrated rows and
every figure computed from it (Brier, calibration slope...) is the
per-patient figure of the recalibrated rows.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.optimize import isotonic_regression
from scipy.special import expit

from hccfed.common.metrics.calibration import fit_logistic_recalibration
from hccfed.common.metrics.summaries import _merge_class, check_summary, table_groups

__all__ = [
    "METHODS",
    "Recalibration",
    "fit_platt_from_table",
    "fit_isotonic_from_table",
    "fit_recalibration",
    "logit_of_prob",
    "recalibrate_prob_table",
]

METHODS: tuple[str, ...] = ("platt", "isotonic")


def _score_table(value: ArrayLike, pos: ArrayLike, neg: ArrayLike, what: str) -> tuple[NDArray, NDArray, NDArray]:
    """The checked table (float scores, int64 counts); ValueError unless both classes are present."""
    table = {"auc_value": np.asarray(value), "auc_pos": np.asarray(pos), "auc_neg": np.asarray(neg)}
    check_summary(table, f"{what}: the score table")
    x, p, n = table["auc_value"].astype(float), table["auc_pos"].astype(np.int64), table["auc_neg"].astype(np.int64)
    n_pos, n_neg = int(p.sum()), int(n.sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"{what} needs patients of both classes: the score table holds {n_pos} positive(s) and "
                         f"{n_neg} negative(s)")
    return x, p, n


def fit_platt_from_table(value: ArrayLike, pos: ArrayLike, neg: ArrayLike) -> dict:
    """Maximum-likelihood ``P(y=1) = sigmoid(intercept + slope * score)`` from a score table.

    value : shape (k,), distinct scores, strictly ascending (e.g. the pooled
    ``auc_value`` of the validation patients); pos, neg : shape (k,), the
    positives and negatives at each score. Newton-Raphson with step halving
    (:func:`common.metrics.calibration.fit_logistic_recalibration`) on the
    scores centred and scaled by their mean and standard deviation over the
    patients (so scores of any scale, 1e-3 or 1e4, are fitted alike), then
    mapped back.

    Returns {"method": "platt", "intercept", "slope", "n_positive", "n_negative"}.
    ValueError when a class is missing, when there is a single distinct score
    (no slope), or when the scores separate the classes (complete or
    quasi-complete separation: the likelihood keeps growing as the slope
    grows, there is no estimate).
    """
    x, p, n = _score_table(value, pos, neg, "Platt scaling")
    if x.size < 2:
        raise ValueError(f"Platt scaling needs at least two distinct scores: every patient scores {x[0]!r}, "
                         "so the slope is not identifiable")
    at_pos, at_neg = x[p > 0], x[n > 0]
    if at_pos.min() >= at_neg.max() or at_pos.max() <= at_neg.min():
        raise ValueError("Platt scaling has no maximum-likelihood estimate: the scores separate the classes "
                         f"(positives score from {at_pos.min():.6g} to {at_pos.max():.6g}, negatives from "
                         f"{at_neg.min():.6g} to {at_neg.max():.6g}; complete or quasi-complete separation, the "
                         "slope would be infinite); use isotonic recalibration or more validation patients")
    count = (p + n).astype(float)
    centre = float(np.dot(count, x) / count.sum())
    scale = float(np.sqrt(np.dot(count, (x - centre) ** 2) / count.sum()))
    try:
        a, b = fit_logistic_recalibration((x - centre) / scale, p.astype(float), count)
    except ValueError as err:
        raise ValueError(f"Platt scaling on the score table: {err}") from None
    slope = b / scale
    return {"method": "platt", "intercept": a - slope * centre, "slope": slope,
            "n_positive": int(p.sum()), "n_negative": int(n.sum())}


def fit_isotonic_from_table(value: ArrayLike, pos: ArrayLike, neg: ArrayLike) -> dict:
    """Increasing isotonic regression of the outcome on the score, from a score table.

    Each distinct score is one point with target ``pos / (pos + neg)`` and
    weight ``pos + neg`` (what the pooled rows reduce to), fitted by weighted
    pool-adjacent-violators (``scipy.optimize.isotonic_regression``, the
    solver of sklearn's IsotonicRegression). The breakpoints kept are the
    first and last score of each constant piece, as sklearn's
    ``X_thresholds_`` / ``y_thresholds_``.

    Returns {"method": "isotonic", "thresholds": scores (list, ascending),
    "probabilities": fitted risks there (list, non-decreasing), "n_positive",
    "n_negative"}. ValueError when a class is missing.
    """
    x, p, n = _score_table(value, pos, neg, "isotonic recalibration")
    count = (p + n).astype(float)
    y = np.asarray(isotonic_regression(p / count, weights=count, increasing=True).x, dtype=float)
    keep = np.ones(y.size, dtype=bool)
    keep[1:-1] = (y[1:-1] != y[:-2]) | (y[1:-1] != y[2:])
    return {"method": "isotonic", "thresholds": x[keep].tolist(), "probabilities": y[keep].tolist(),
            "n_positive": int(p.sum()), "n_negative": int(n.sum())}


@dataclass(frozen=True)
class Recalibration:
    """A fitted map from score (a logit) to recalibrated probability.

    ``method`` "platt": ``sigmoid(intercept + slope * score)``; "isotonic":
    linear interpolation between (``thresholds``, ``probabilities``), the end
    probabilities below the first and above the last threshold.
    ``n_positive`` / ``n_negative``: the patients it was fitted on.
    Built from what :func:`fit_platt_from_table` / :func:`fit_isotonic_from_table`
    return (``Recalibration(**fit)``) or from :meth:`from_json`.
    """

    method: str
    intercept: float | None = None
    slope: float | None = None
    thresholds: tuple[float, ...] = field(default=())
    probabilities: tuple[float, ...] = field(default=())
    n_positive: int = 0
    n_negative: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))
        object.__setattr__(self, "probabilities", tuple(float(q) for q in self.probabilities))
        object.__setattr__(self, "n_positive", int(self.n_positive))
        object.__setattr__(self, "n_negative", int(self.n_negative))
        if self.n_positive < 0 or self.n_negative < 0:
            raise ValueError(f"a recalibration's patient counts must be >= 0, got {self.n_positive}, {self.n_negative}")
        for name in ("intercept", "slope"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, float(getattr(self, name)))
        if self.method == "platt":
            if self.intercept is None or self.slope is None or not (math.isfinite(self.intercept)
                                                                     and math.isfinite(self.slope)):
                raise ValueError(f"Platt recalibration needs a finite intercept and slope, got "
                                 f"{self.intercept!r}, {self.slope!r}")
            if self.thresholds or self.probabilities:
                raise ValueError("Platt recalibration has no thresholds or probabilities")
        elif self.method == "isotonic":
            t, q = np.asarray(self.thresholds), np.asarray(self.probabilities)
            if t.size == 0 or t.size != q.size:
                raise ValueError(f"isotonic recalibration needs as many probabilities as thresholds (at least one), "
                                 f"got {t.size} and {q.size}")
            if not (np.isfinite(t).all() and (np.diff(t) > 0).all()):
                raise ValueError("isotonic recalibration: thresholds must be finite and strictly ascending")
            if not (np.isfinite(q).all() and (q >= 0).all() and (q <= 1).all() and (np.diff(q) >= 0).all()):
                raise ValueError("isotonic recalibration: probabilities must be non-decreasing, in [0, 1]")
            if self.intercept is not None or self.slope is not None:
                raise ValueError("isotonic recalibration has no intercept or slope")
        else:
            raise ValueError(f"recalibration method must be one of {list(METHODS)}, got {self.method!r}")

    def apply(self, scores: ArrayLike) -> NDArray[np.float64]:
        """Recalibrated probabilities of ``scores`` (any shape; +-inf allowed, NaN refused).

        Platt: +inf goes to 1 and -inf to 0 when the slope is positive (the
        reverse when negative; a zero slope gives sigmoid(intercept)).
        Isotonic: scores are clipped to the first and last threshold (as
        sklearn's ``out_of_bounds="clip"``), so +-inf get the end probabilities.
        """
        s = np.asarray(scores, dtype=float)
        if np.isnan(s).any():
            raise ValueError(f"scores to recalibrate contain NaN ({int(np.isnan(s).sum())} values)")
        if self.method == "platt":
            eta = np.full(s.shape, float(self.intercept)) if self.slope == 0 else self.intercept + self.slope * s
            return expit(eta)
        t, q = np.asarray(self.thresholds), np.asarray(self.probabilities)
        return np.interp(np.clip(s, t[0], t[-1]), t, q)

    def params(self) -> dict:
        """The fitted parameters of its method (plain numbers and lists)."""
        keys = ("intercept", "slope") if self.method == "platt" else ("thresholds", "probabilities")
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if k in keys}

    def to_json(self) -> str:
        """Plain JSON: method, the parameters of that method and the patients it was fitted on."""
        return json.dumps({"method": self.method, **self.params(), "n_positive": self.n_positive,
                           "n_negative": self.n_negative})

    @classmethod
    def from_json(cls, text: str) -> "Recalibration":
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError(f"a recalibration is a JSON object, got {type(raw).__name__}")
        known = {"method", "intercept", "slope", "thresholds", "probabilities", "n_positive", "n_negative"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"a recalibration has no keys {unknown}; known: {sorted(known)}")
        return cls(**raw)

    def describe(self) -> str:
        fitted = f"fitted on {self.n_positive + self.n_negative} patients ({self.n_positive} positive)"
        if self.method == "platt":
            return (f"Platt scaling: risk = sigmoid({self.intercept:.4g} + {self.slope:.4g} x score), {fitted}")
        t, q = self.thresholds, self.probabilities
        return (f"isotonic regression: {len(t)} breakpoint(s), risk {q[0]:.3g} at score <= {t[0]:.4g} up to "
                f"{q[-1]:.3g} at score >= {t[-1]:.4g}, linear in between; {fitted}")


def fit_recalibration(value: ArrayLike, pos: ArrayLike, neg: ArrayLike, method: str = "platt") -> Recalibration:
    """The :class:`Recalibration` of ``method`` ("platt" or "isotonic") fitted on a score table."""
    fits = {"platt": fit_platt_from_table, "isotonic": fit_isotonic_from_table}
    if method not in fits:
        raise ValueError(f"recalibration method must be one of {list(METHODS)}, got {method!r}")
    return Recalibration(**fits[method](value, pos, neg))


def logit_of_prob(probs: ArrayLike) -> NDArray[np.float64]:
    """``log(p) - log(1 - p)``, unclipped: p = 0 gives -inf and p = 1 gives +inf.

    The inverse of ``sigmoid`` up to rounding. Beware the loss of precision
    near 1: a probability computed as sigmoid(logit) in float64 keeps 1 - p
    only to about 1e-16, so the logit comes back with an error of about
    1e-16 * exp(logit), and every logit above about 36.7 comes back as +inf
    (sigmoid gave exactly 1). Near 0 nothing is lost down to logits of about -745.
    """
    p = np.asarray(probs, dtype=float)
    with np.errstate(divide="ignore"):
        return np.log(p) - np.log1p(-p)


def recalibrate_prob_table(summary: dict, recalibration: Recalibration) -> dict:
    """``summary`` with its probability table (``prob_*``) replaced by the recalibrated risks.

    The table's risks must be ``sigmoid(score)`` (as :func:`client.evaluation.clinical_summary`
    makes them): each distinct risk p becomes ``recalibration.apply(logit(p))``
    (:func:`logit_of_prob`: p = 0 and p = 1 are scores of -inf and +inf, which
    :meth:`Recalibration.apply` maps consistently), risks that become equal
    share one row and add their counts, values stay strictly ascending,
    counts int64. Every other table is left as it is. Because the map is
    monotone, the figures of the new table are those of the recalibrated
    rows. The logit is recovered from the probability, so logits above about
    17 lose precision and those above about 36.7 all become +inf (see
    :func:`logit_of_prob`); the score table cannot be used instead, since
    the tables are unlinked (a distinct score does not say which risk row it is).
    """
    if "prob" not in table_groups(summary):
        raise ValueError("recalibrate_prob_table needs a summary with a probability table (prob_value, prob_pos, "
                         "prob_neg)")
    prob = {k: np.asarray(summary[k]) for k in ("prob_value", "prob_pos", "prob_neg")}
    check_summary(prob, "the probability table to recalibrate")
    new = recalibration.apply(logit_of_prob(prob["prob_value"].astype(float)))
    value, pos, neg = _merge_class([(new, prob["prob_pos"], prob["prob_neg"])])
    return {**summary, "prob_value": value, "prob_pos": pos, "prob_neg": neg}
