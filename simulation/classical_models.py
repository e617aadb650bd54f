"""The seeds' classical models trained federated on a cohort of sites, in-process.

CR (clinical-radiological, seed 002): univariate federated logistic screening
of the clinical features (Wald p < ``p_enter``), then a multivariable model by
backward elimination (p < ``p_keep``).
R (radiomics, seeds 002 / 003): federated Welch t-test screen (p < ``p_screen``),
greedy Pearson filter |r| > 0.8 walking features by p value, then LASSO
logistic regression with the penalty chosen by federated cross-validation.
RCR: logistic regression on the R model's score and the CR model's features.

Each site is a :class:`client.stats_site.StatsSite` over its training rows
(the train + validation splits of :func:`client.site_data.split_indices`), so
the server functions see only aggregates; each model then scores every site's
test rows *at the site* (``site_scores``), ready for
:func:`client.evaluation.clinical_summary` and
:func:`server.federated_eval.pooled_clinical_figures`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

import re

from client.evaluation import clinical_summary
from client.radiomics import REGIONS
from client.site_data import split_indices
from client.stats_site import StatsSite, local_send
from server import federated_stats as fs
from common.schema import PHASES
from server.federated_eval import pooled_clinical_figures

RADIOMIC_NAME = re.compile(rf"^({'|'.join(PHASES)})_({'|'.join(REGIONS)})_")


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


@dataclass
class LinearModel:
    """score = intercept + x[:, features] @ coef (raw feature scale; higher = higher risk)."""

    name: str
    features: list[str]
    intercept: float
    coef: np.ndarray

    def score(self, site: ClassicalSite, rows: np.ndarray) -> np.ndarray:
        idx = [site.names.index(f) for f in self.features]
        return self.intercept + site.features[np.ix_(rows, idx)] @ self.coef


def build_sites(prepared: list, radiomics_tables: list | None, seed: int) -> list[ClassicalSite]:
    """Join each PreparedSite's clinical vector with its RadiomicsTable on patient id; split by ``seed``."""
    sites = []
    for i, site in enumerate(prepared):
        names, x = list(site.clinical_names), np.asarray(site.clinical, dtype=float)
        keep = np.arange(len(site.patient_ids))
        if radiomics_tables is not None:
            table = radiomics_tables[i]
            if table.site_id != site.site_id:
                raise ValueError(f"radiomics table of {table.site_id} given for site {site.site_id}")
            row_of = {str(p): j for j, p in enumerate(table.patient_ids)}
            keep = np.array([k for k, p in enumerate(site.patient_ids) if str(p) in row_of], dtype=int)
            rad = table.values[[row_of[str(site.patient_ids[k])] for k in keep]]
            names, x = names + list(table.names), np.column_stack([x[keep], rad])
        splits = split_indices(site, seed)
        position = {k: j for j, k in enumerate(keep)}
        train = np.array([position[k] for k in np.concatenate([splits["train"], splits["val"]]) if k in position])
        test = np.array([position[k] for k in splits["test"] if k in position])
        sites.append(ClassicalSite(site.site_id, site.patient_ids[keep], names, x, site.labels[keep],
                                   site.times[keep], site.events[keep], np.sort(train), np.sort(test)))
    return sites


def _stats_sites(sites: list[ClassicalSite], n_folds: int, seed: int, extra=None) -> list[StatsSite]:
    out = []
    for i, s in enumerate(sites):
        x, names = s.features[s.train], list(s.names)
        if extra is not None:
            x, names = np.column_stack([extra[i], x]), ["extra_score"] + names
        second = None if s.second_reader is None or extra is not None else s.second_reader[s.train]
        out.append(StatsSite(s.site_id, x, names, s.labels[s.train], s.times[s.train], s.events[s.train],
                             second_reader=second, n_folds=n_folds, seed=seed))
    return out


def _wald_p(fit: dict) -> np.ndarray:
    z = fit["beta_std"][1:] / np.sqrt(np.diag(fit["cov_std"])[1:])
    return 2 * stats.norm.sf(np.abs(z))


def fit_cr(send, names: list[str], candidates: list[int], p_enter: float = 0.05, p_keep: float = 0.05
           ) -> LinearModel:
    """Univariate then multivariable (backward elimination) federated logistic regression."""
    usable = [j for j in candidates if fs.federated_mean_sd(send, [j], labelled=True)[1][0] > 0]
    p_uni = {j: _wald_p(fs.federated_logistic(send, [j]))[0] for j in usable}
    chosen = [j for j in usable if p_uni[j] < p_enter] or sorted(usable, key=p_uni.get)[:2]
    while True:
        fit = fs.federated_logistic(send, chosen)
        p = _wald_p(fit)
        if len(chosen) == 1 or p.max() < p_keep:
            break
        chosen = [j for k, j in enumerate(chosen) if k != int(np.argmax(p))]
    return LinearModel("CR", [names[j] for j in chosen], fit["intercept"], fit["coef"])


def fit_r(send, names: list[str], candidates: list[int], n_folds: int, p_screen: float = 0.05,
          r_max: float = 0.8, max_features: int = 60, icc_min: float | None = None) -> LinearModel:
    """(ICC > icc_min filter,) t-test screen, correlation filter, LASSO with the penalty chosen by federated CV."""
    sd = fs.federated_mean_sd(send, candidates, labelled=True)[1]
    candidates = [j for j, s in zip(candidates, sd) if s > 1e-12]
    if icc_min is not None:
        kept = fs.federated_icc(send, candidates, "icc3", icc_min)["kept"]
        candidates = [candidates[k] for k in kept]
    tests = fs.federated_ttests(send, candidates, equal_var=False)
    order = np.argsort(tests["p"])
    passed = [k for k in order if tests["p"][k] < p_screen][:max_features] or list(order[:5])
    kept_pos = fs.federated_correlation_filter(send, [candidates[k] for k in passed], np.arange(len(passed)), r_max)
    columns = [int(c) for c in kept_pos]
    lasso = fs.federated_elastic_net_cv(send, columns, l1_ratio=1.0, n_folds=n_folds)
    selected = list(lasso["selected"]) or [int(np.argmax(np.abs(lasso["beta_std"][1:])))]
    return LinearModel("R", [names[columns[k]] for k in selected], lasso["intercept"],
                       lasso["coef"][selected])


def run_classical_models(sites: list[ClassicalSite], seed: int = 0, n_folds: int = 5) -> dict:
    """Fit CR, R (when radiomics columns exist) and RCR federated; score and evaluate every site's test rows.

    Returns {model: {"model": LinearModel, "site_scores": {site_id: (n_test,)}, "summaries": [...],
    "figures": pooled_clinical_figures(...)}}.
    """
    names = sites[0].names
    if any(s.names != names for s in sites):
        raise ValueError("sites disagree on the feature list; extract radiomics with the same parameter file")
    radiomic = [j for j, n in enumerate(names) if RADIOMIC_NAME.match(n)]
    clinical = [j for j in range(len(names)) if j not in radiomic]
    send = local_send(_stats_sites(sites, n_folds, seed))
    models = {"CR": fit_cr(send, names, clinical)}
    if radiomic:
        icc_min = 0.75 if all(s.second_reader is not None for s in sites) else None
        models["R"] = fit_r(send, names, radiomic, n_folds, icc_min=icc_min)
        rad_train = [models["R"].score(s, s.train) for s in sites]
        send_rcr = local_send(_stats_sites(sites, n_folds, seed, extra=rad_train))
        columns = [0] + [1 + names.index(f) for f in models["CR"].features]
        fit = fs.federated_logistic(send_rcr, columns)
        models["RCR"] = _RCR(models["R"], models["CR"].features, fit)
    out = {}
    for key, model in models.items():
        scores = {s.site_id: model.score(s, s.test) for s in sites}
        summaries = [clinical_summary(scores[s.site_id], scores[s.site_id], s.labels[s.test], s.times[s.test],
                                      s.events[s.test]) for s in sites]
        out[key] = {"model": model, "site_scores": scores, "summaries": summaries,
                    "figures": pooled_clinical_figures(summaries)}
    return out


class _RCR(LinearModel):
    """Logistic regression on the R score and the CR features."""

    def __init__(self, radiomics_model: LinearModel, clinical: list[str], fit: dict):
        super().__init__("RCR", ["R_score"] + list(clinical), fit["intercept"], fit["coef"])
        self.radiomics_model = radiomics_model

    def score(self, site: ClassicalSite, rows: np.ndarray) -> np.ndarray:
        rad = self.radiomics_model.score(site, rows)
        idx = [site.names.index(f) for f in self.features[1:]]
        return self.intercept + np.column_stack([rad, site.features[np.ix_(rows, idx)]]) @ self.coef


def tabular_site(config):
    """A PreparedSite without images (the classical models need none): clinical vector, labels, outcomes.

    Patients whose manifest row or labs fail QC are left out, as ``client.prepare`` would.
    """
    from client.labs import clinical_features
    from client.manifest import read_manifest
    from client.prepare import PreparedSite
    from client.qc import check_labs
    from common.schema import clinical_feature_names, early_recurrence_label

    manifest = read_manifest(config, strict=False)
    table, issues = check_labs(manifest.table, config)
    failed = {i.patient_id for i in issues}
    table = table.loc[[p for p in manifest.patient_ids if p not in failed]]
    times = table["time_months"].to_numpy(dtype=float)
    events = table["event"].to_numpy(dtype=np.int64)
    return PreparedSite(config.site_id, np.array([str(p) for p in table.index]), np.zeros((len(table), 0)),
                        clinical_features(table, config).astype(float), clinical_feature_names(),
                        early_recurrence_label(times, events), times, events, np.zeros((len(table), 0)))


def evaluate_cohort(site_yamls: list, params: str = "fast", seed: int = 0, n_folds: int = 5,
                    workers: int | None = None, second_reader_seed: int | None = None, progress: bool = True
                    ) -> dict:
    """Prepare (cached), extract radiomics (cached) and run CR / R / RCR on a cohort of site YAMLs.

    ``second_reader_seed`` set: also extract radiomics on perturbed masks and filter R's features by ICC > 0.75.
    Returns {model: pooled clinical figures} plus "n_test" per site and the models' feature lists.
    """
    from client.radiomics import extract_site
    from common.config import load_site_config

    configs = [load_site_config(p) for p in site_yamls]
    prepared = [tabular_site(c) for c in configs]
    tables = [extract_site(c, params, workers=workers, progress=progress) for c in configs]
    sites = build_sites(prepared, tables, seed)
    if second_reader_seed is not None:
        seconds = [extract_site(c, params, workers=workers, progress=progress, perturb_seed=second_reader_seed)
                   for c in configs]
        for site, table, second in zip(sites, tables, seconds):
            row_of = {str(p): j for j, p in enumerate(second.patient_ids)}
            rows = [row_of.get(str(p)) for p in site.patient_ids]
            if None in rows or second.names != table.names:
                raise RuntimeError(f"site {site.site_id}: second-reader radiomics missing patients or features")
            n_clin = len(site.names) - len(table.names)
            site.second_reader = np.column_stack([site.features[:, :n_clin], second.values[rows]])
    out = run_classical_models(sites, seed, n_folds)
    return {key: {"features": r["model"].features, "figures": r["figures"]} for key, r in out.items()} | {
        "n_test": {s.site_id: int(len(s.test)) for s in sites}}
