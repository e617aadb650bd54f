"""The site side of every federated statistic: rows stay here, only aggregates leave.

A :class:`StatsSite` holds one hospital's feature rows (n, p) with their names,
early-recurrence labels (1 / 0 / -1 unknown), follow-up times (months) and
events, and optionally a second reader's features (the same patients, a perturbed
mask) for the ICC. ComBat's protected covariates are feature columns the request
names (``covariates``: indices). ``handle(request)`` answers one
server request (a dict with an ``op``) with a dict of fixed-size arrays whose
shapes depend only on the request and the number of features, never on the
number of patients. The math lives in :mod:`common.stats`.

Cross-validation folds are drawn here, stratified by label, from the run's seed
and the site id, so each site holds its own folds and nothing is sent to draw them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from hccfed.common.stats import combat, cox, icc, moments, regression


def _site_rng(seed: int, site_id: str) -> np.random.Generator:
    digest = hashlib.sha256(f"stats-folds:{seed}:{site_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def assign_folds(labels: np.ndarray, n_folds: int, seed: int, site_id: str) -> np.ndarray:
    """Fold (0..n_folds-1) of each row, stratified by label; -1 for unlabelled rows."""
    rng = _site_rng(seed, site_id)
    folds = np.full(len(labels), -1, dtype=np.int64)
    offset = 0
    for label in (1, 0):
        members = np.flatnonzero(labels == label)
        members = members[rng.permutation(len(members))]
        folds[members] = (np.arange(len(members)) + offset) % n_folds
        offset += len(members)
    return folds


@dataclass
class StatsSite:
    """One site's rows for federated statistics. ``features`` (n, p) float, names (p,)."""

    site_id: str
    features: np.ndarray
    names: list[str]
    labels: np.ndarray
    times: np.ndarray
    events: np.ndarray
    second_reader: np.ndarray | None = None
    n_folds: int = 5
    seed: int = 0
    folds: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.features = np.asarray(self.features, dtype=float)
        if self.features.ndim != 2 or self.features.shape[1] != len(self.names):
            raise ValueError(f"site {self.site_id}: features shape {self.features.shape} does not match "
                             f"{len(self.names)} names")
        bad = np.argwhere(~np.isfinite(self.features))
        if len(bad):
            i, j = bad[0]
            raise ValueError(f"site {self.site_id}: feature {self.names[j]!r} of row {i} is not finite")
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.times = np.asarray(self.times, dtype=float)
        self.events = np.asarray(self.events, dtype=np.int64)
        self.folds = assign_folds(self.labels, self.n_folds, self.seed, self.site_id)

    # ------------------------------------------------------------------ row selection
    def _rows(self, request: dict) -> np.ndarray:
        """Boolean row mask: labelled rows when ``labelled``; a CV fold's train / valid part."""
        keep = np.ones(len(self.labels), dtype=bool)
        if request.get("labelled", False):
            keep &= self.labels >= 0
        fold = request.get("fold")
        if fold is not None:
            keep &= (self.folds != fold) if request.get("part", "train") == "train" else (self.folds == fold)
            keep &= self.folds >= 0
        return keep

    def _x(self, request: dict, rows: np.ndarray) -> np.ndarray:
        cols = request.get("columns")
        x = self.features[rows]
        return x if cols is None else x[:, np.asarray(cols, dtype=int)]

    # ------------------------------------------------------------------ handlers
    def handle(self, request: dict) -> dict:
        """Answer one request: ``{"op": ..., ...}`` -> aggregates (+ ``site_id``)."""
        op = request.get("op")
        handler = getattr(self, f"_op_{op}", None)
        if handler is None:
            raise ValueError(f"site {self.site_id}: unknown statistics request op {op!r}")
        reply = handler(request)
        reply["site_id"] = self.site_id
        return reply

    def _op_moments(self, request: dict) -> dict:
        rows = self._rows(request)
        x = self._x(request, rows)
        shift, cross = request.get("shift"), request.get("cross", False)
        if request.get("by_label", False):
            y = self.labels[rows]
            return {"pos": moments.moment_contribution(x[y == 1], shift, cross),
                    "neg": moments.moment_contribution(x[y == 0], shift, cross)}
        return {"all": moments.moment_contribution(x, shift, cross)}

    def _op_logistic(self, request: dict) -> dict:
        rows = self._rows({**request, "labelled": True})
        xd = regression.design(self._x(request, rows), request["mean"], request["scale"])
        return regression.logistic_contribution(xd, self.labels[rows], request["beta"])

    def _op_logistic_auc_counts(self, request: dict) -> dict:
        """Per-class histograms of the linear predictor on a fixed score grid (for a validation AUC)."""
        rows = self._rows({**request, "labelled": True})
        xd = regression.design(self._x(request, rows), request["mean"], request["scale"])
        eta = xd @ np.asarray(request["beta"], dtype=float)
        edges = np.asarray(request["edges"], dtype=float)
        y = self.labels[rows]
        return {"pos": np.histogram(eta[y == 1], edges)[0].astype(float),
                "neg": np.histogram(eta[y == 0], edges)[0].astype(float)}

    def _op_event_histogram(self, request: dict) -> dict:
        return {"counts": cox.event_histogram(self.times, self.events, request["width"], request["max_months"])}

    def _op_cox(self, request: dict) -> dict:
        rows = np.ones(len(self.times), dtype=bool)
        x = (self._x(request, rows) - np.asarray(request["mean"])) / np.asarray(request["scale"])
        return cox.cox_contribution(x, self.times, self.events, request["beta"], request["grid"], request["width"])

    def _op_icc(self, request: dict) -> dict:
        if self.second_reader is None:
            raise ValueError(f"site {self.site_id}: no second-reader features for the ICC request")
        cols = request.get("columns")
        second = self.second_reader if cols is None else self.second_reader[:, np.asarray(cols, dtype=int)]
        read = np.isfinite(second).all(axis=1)  # the patients the second reader read (a random subset)
        ratings = np.stack([self._x(request, read), second[read]], axis=1)
        return icc.icc_contribution(ratings, request.get("shift"))

    def _combat_rows(self, request: dict) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """(the ComBat columns' values (n, p), the protected covariates' (n, q) or None, the column indices)."""
        cols = request.get("columns")
        cols = np.arange(self.features.shape[1]) if cols is None else np.asarray(cols, dtype=int)
        covariates = request.get("covariates")
        c = None if not covariates else self.features[:, np.asarray(covariates, dtype=int)]
        return self.features[:, cols], c, cols

    def _op_combat_location(self, request: dict) -> dict:
        y, c, _ = self._combat_rows(request)
        return combat.location_contribution(y, c, request["shift"], request.get("covariate_shift"))

    def _op_combat_moments(self, request: dict) -> dict:
        y, c, _ = self._combat_rows(request)
        return combat.moments_contribution(combat.standardise(y, c, request["fit"]))

    def _op_combat_apply(self, request: dict) -> dict:
        """Harmonise this site's rows in place (a reference site's stay as they are)."""
        y, c, cols = self._combat_rows(request)
        if request.get("reference") != self.site_id:
            params = request["site_params"][self.site_id]
            self.features[:, cols] = combat.apply_combat(y, c, request["fit"], params["gamma"], params["delta"])
        return {"applied": np.array(1.0)}


def local_send(sites: list[StatsSite]):
    """A ``send(request) -> [reply per site]`` running every site in this process (tests, simulation)."""
    def send(request: dict) -> list[dict]:
        return [site.handle(request) for site in sites]
    return send
