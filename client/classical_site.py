"""A site's rows for the seeds' classical models (CR / R / RCR), and the site's answers about them.

The rows: each patient's clinical vector (``client.labs``) then its radiomics
(``client.radiomics``, cached), joined on patient id, with the train (+ validation)
and test splits of :func:`client.site_data.split_indices`.
:class:`ClassicalStatsSite` answers the server's statistics requests over the
training rows (through :class:`client.stats_site.StatsSite`) and three more:

- ``describe``: the feature names, which are radiomics, and the split sizes (counts);
- ``score_input`` (a field of any request): the request is answered over the
  training rows with the given model's score prepended as column ``extra_score``
  (RCR is fitted on the R score and the clinical features);
- ``clinical_summary``: the given model scores the site's test rows *here* and
  only their :func:`client.evaluation.clinical_summary` (fixed-size) leaves;
- ``combat`` (a field of any request): the server's ComBat estimate (pooled fit, every site's
  gamma* / delta*, columns, protected covariate columns, reference site); the request is answered
  over this site's rows harmonised by it, the covariates' effects kept (train
  and test, and the second reader). Rows are never changed in place, so any process serving the
  site answers the same.

A model travels as a plain dict: ``{"name", "features", "intercept", "coef",
"inputs"}``; score = intercept + x[features] @ coef, where a feature named in
``inputs`` is that (nested) model's score.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, replace

import numpy as np

from hccfed.client.evaluation import clinical_summary
from hccfed.client.radiomics import REGIONS, RadiomicsTable
from hccfed.client.site_data import split_indices, split_rows
from hccfed.client.stats_site import StatsSite
from hccfed.common.schema import PHASES
from hccfed.common.splits import DEV
from hccfed.common.stats import combat

RADIOMIC_NAME = re.compile(rf"^({'|'.join(PHASES)})_({'|'.join(REGIONS)})_")
SCORE_COLUMN = "extra_score"


@dataclass
class ClassicalSite:
    """One site's rows for the classical models: clinical then radiomics columns, and its split."""

    site_id: str
    patient_ids: np.ndarray
    names: list[str]
    features: np.ndarray
    labels: np.ndarray
    times: np.ndarray
    events: np.ndarray
    train: np.ndarray  # row indices used for fitting
    test: np.ndarray  # row indices scored
    second_reader: np.ndarray | None = None  # same columns, radiomics from a perturbed mask (ICC filter)


def join_site(site, table: RadiomicsTable | None, seed: int, fit_on: str = "train") -> ClassicalSite:
    """A site's patients (``PreparedSite`` or ``hccfed.client.site.PatientRows``: clinical vector, labels,
    outcomes) joined with its RadiomicsTable on patient id; split by ``seed`` like the deep models.
    ``fit_on``: the patients the models are fitted on, the training split or "dev" (training and
    validation: when the deep models are cross-validated and train on both)."""
    if fit_on not in ("train", DEV):
        raise ValueError(f"fit_on must be 'train' or {DEV!r}, got {fit_on!r}")
    names, x = list(site.clinical_names), np.asarray(site.clinical, dtype=float)
    keep = np.arange(len(site.patient_ids))
    if table is not None:
        if table.site_id != site.site_id:
            raise ValueError(f"radiomics table of {table.site_id} given for site {site.site_id}")
        row_of = {str(p): j for j, p in enumerate(table.patient_ids)}
        keep = np.array([k for k, p in enumerate(site.patient_ids) if str(p) in row_of], dtype=int)
        rad = table.values[[row_of[str(site.patient_ids[k])] for k in keep]]
        names, x = names + list(table.names), np.column_stack([x[keep], rad])
    splits = split_indices(site, seed)
    position = {k: j for j, k in enumerate(keep)}
    # Fitted on the training split only, like the deep models: the validation split is for choices
    # (a neural model's round, operating thresholds, recalibration), so every model learns from the
    # same patients; the classical models make their own choices by cross-validation within it.
    train = np.array([position[k] for k in split_rows(site, fit_on, seed) if k in position], dtype=int)
    test = np.array([position[k] for k in splits["test"] if k in position], dtype=int)
    return ClassicalSite(site.site_id, site.patient_ids[keep], names, x, site.labels[keep], site.times[keep],
                         site.events[keep], np.sort(train), np.sort(test))


def add_second_reader(site: ClassicalSite, table: RadiomicsTable, second: RadiomicsTable) -> None:
    """Attach the second reader's radiomics (the same features, some or all of the patients) to ``site``,
    clinical columns shared; a patient the second reader did not read has a row of NaN."""
    if second.names != table.names:
        raise RuntimeError(f"site {site.site_id}: the second reader's radiomics have other features")
    row_of = {str(p): j for j, p in enumerate(second.patient_ids)}
    values = np.full((len(site.patient_ids), len(table.names)), np.nan)
    for i, p in enumerate(site.patient_ids):
        if str(p) in row_of:
            values[i] = second.values[row_of[str(p)]]
    if not np.isfinite(values).all(axis=1).any():
        raise RuntimeError(f"site {site.site_id}: the second reader read none of the site's patients")
    n_clin = len(site.names) - len(table.names)
    site.second_reader = np.column_stack([site.features[:, :n_clin], values])


def score_model(model: dict, names: list[str], x: np.ndarray) -> np.ndarray:
    """The linear score of a model dict on rows ``x`` (columns ``names``); nested ``inputs`` scored first."""
    inputs = model.get("inputs") or {}
    columns = []
    for feature in model["features"]:
        if feature in inputs:
            columns.append(score_model(inputs[feature], names, x))
        elif feature in names:
            columns.append(x[:, names.index(feature)])
        else:
            raise ValueError(f"model {model.get('name')!r}: feature {feature!r} is not among this site's features")
    coef = np.asarray(model["coef"], dtype=float)
    return float(model["intercept"]) + (np.column_stack(columns) @ coef if columns else np.zeros(len(x)))


class ClassicalStatsSite:
    """The site's endpoint for the classical models: ``handle(request) -> aggregates``.

    Stateless between requests as far as the server can tell: a request's ``combat`` (ComBat estimate)
    and ``score_input`` (model) fields say which rows answer it; the rows they give are cached.
    """

    def __init__(self, site: ClassicalSite, n_folds: int = 5, seed: int = 0):
        self.site, self.n_folds, self.seed = site, n_folds, seed
        self._sites: dict[str, ClassicalSite] = {"": site}
        self._views: dict[tuple[str, str], StatsSite] = {}

    def rows(self, combat_estimate: dict | None = None) -> ClassicalSite:
        """The site's rows, harmonised by ``combat_estimate`` (every row, its columns only) when given."""
        return self._rows(combat_estimate)[1]

    def _rows(self, combat_estimate: dict | None) -> tuple[str, ClassicalSite]:
        key = _key(combat_estimate)
        if key not in self._sites:
            s = self.site
            params = combat_estimate["site_params"].get(s.site_id)
            if params is None:
                raise ValueError(f"site {s.site_id}: the request's ComBat estimate has no parameters for this site")
            cols = np.asarray(combat_estimate["columns"], dtype=int)
            covariates = np.asarray(combat_estimate.get("covariates") or [], dtype=int)

            def harmonised(matrix):
                if matrix is None or combat_estimate.get("reference") == s.site_id:
                    return matrix  # a reference site's rows stay as they are
                out = np.array(matrix, dtype=float)
                c = out[:, covariates] if len(covariates) else None
                out[:, cols] = combat.apply_combat(out[:, cols], c, combat_estimate["fit"], params["gamma"],
                                                   params["delta"])
                return out

            self._sites[key] = replace(s, features=harmonised(s.features), second_reader=harmonised(s.second_reader))
        return key, self._sites[key]

    def _view(self, combat_estimate: dict | None, score_input: dict | None) -> StatsSite:
        """A StatsSite over the training rows (with ``score_input``'s score as first column), cached."""
        rows_key, s = self._rows(combat_estimate)
        key = (rows_key, _key(score_input))
        if key not in self._views:
            rows = s.train
            x, names = s.features[rows], list(s.names)
            second = None if s.second_reader is None else s.second_reader[rows]
            if score_input is not None:
                x = np.column_stack([score_model(score_input, s.names, x), x])
                names, second = [SCORE_COLUMN] + names, None
            self._views[key] = StatsSite(s.site_id, x, names, s.labels[rows], s.times[rows], s.events[rows],
                                         second_reader=second, n_folds=self.n_folds, seed=self.seed)
        return self._views[key]

    def handle(self, request: dict) -> dict:
        request = dict(request)
        op = request.get("op")
        combat_estimate, score_input = request.pop("combat", None), request.pop("score_input", None)
        s = self.rows(combat_estimate)
        if op == "describe":
            return {"names": list(s.names), "radiomic": [bool(RADIOMIC_NAME.match(n)) for n in s.names],
                    "n_train": int(len(s.train)), "n_test": int(len(s.test)),
                    "second_reader": s.second_reader is not None, "site_id": s.site_id}
        if op == "clinical_summary":
            rows = s.test
            scores = score_model(request["model"], s.names, s.features[rows])
            return {**clinical_summary(scores, scores, s.labels[rows], s.times[rows], s.events[rows]),
                    "site_id": s.site_id}
        if op == "combat_apply":
            raise ValueError(f"site {s.site_id}: rows are not changed in place here; send the ComBat estimate "
                             "with each request (field 'combat')")
        return self._view(combat_estimate, score_input).handle(request)


def _key(value) -> str:
    """A canonical text of a request field (model or ComBat estimate) to cache the rows it gives."""
    if value is None:
        return ""
    text = json.dumps(value, sort_keys=True, default=lambda a: np.asarray(a).tolist())
    return hashlib.sha256(text.encode()).hexdigest()


def local_endpoints(sites: list[ClassicalSite], n_folds: int = 5, seed: int = 0) -> list[ClassicalStatsSite]:
    """One endpoint per site (in-process runs); ``client.stats_site.local_send`` sends to them."""
    return [ClassicalStatsSite(s, n_folds, seed) for s in sites]
