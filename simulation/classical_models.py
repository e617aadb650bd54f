"""The seeds' classical models (CR / R / RCR) trained federated on a cohort of sites, in-process.

The server side is :mod:`server.classical_models` (the same code the ServerApp's
``stats`` job runs over Flower); each site is a
:class:`client.classical_site.ClassicalStatsSite` over its rows, reached with
:func:`client.stats_site.local_send`, so the server functions see only
aggregates and each model scores every site's test rows *at the site*. Being the
simulator, this module also reads the sites' test scores (``site_scores``).

``harmonize``: the radiomics are first harmonised across sites by federated ComBat.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from hccfed.client.classical_site import (ClassicalSite, ClassicalStatsSite, join_site, local_endpoints,
                                          score_model)
from hccfed.client.site import Site
from hccfed.client.stats_site import local_send
from hccfed.common.site_config import SiteConfig, load_site_config
from hccfed.common.stats.icc import ICC_PATIENTS_PER_SITE, PERTURBED_READER_SEED
from hccfed.server import classical_models as cm

__all__ = ["ClassicalSite", "LinearModel", "run_classical_models",
           "classical_model_results", "harmonization_effect", "flower_stats_run"]

REPO_ROOT = Path(__file__).resolve().parent.parent
#: The demo's simulated second reader (perturbed masks, for the ICC filter): a fixed reader, the same
#: for every run seed, so its radiomics are extracted and cached once.
SECOND_READER_SEED = PERTURBED_READER_SEED
#: Names of the models' rows in the demo report.
REPORT_NAMES = {"CR": "CR (federated)", "R": "R (federated)", "RCR": "RCR (federated)"}


class LinearModel:
    """A fitted model (the dict the server sends to the sites) with a ``score`` on a site's rows."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.name, self.features = spec["name"], list(spec["features"])
        self.intercept, self.coef = spec["intercept"], np.asarray(spec["coef"])

    def score(self, site: ClassicalSite, rows: np.ndarray) -> np.ndarray:
        return score_model(self.spec, site.names, site.features[rows])


def run_classical_models(sites: list[ClassicalSite], seed: int = 0, n_folds: int = 5, harmonize: bool = False
                         ) -> dict:
    """Fit CR, R (when radiomics columns exist) and RCR federated; score and evaluate every site's test rows.

    Returns {model: {"model": LinearModel, "site_scores": {site_id: (n_test,)}, "summaries": [...],
    "test": pooled_figures(...), "figures": pooled_clinical_figures(...), "sites": the sites' counts and the
    columns harmonised}}, and for "R" its "selection" (what survived each step, per phase and region).
    The caller's ``sites`` are not changed (ComBat gives the endpoints new rows).
    """
    endpoints = local_endpoints(sites, n_folds, seed)
    result = cm.run_classical_models(local_send(endpoints), n_folds, harmonize)
    out: dict = {}
    for key, r in result["models"].items():
        rows = [e.rows(result["combat"]) for e in endpoints]
        scores = {s.site_id: score_model(r["model"], s.names, s.features[s.test]) for s in rows}
        out[key] = {"model": LinearModel(r["model"]), "site_scores": scores, "summaries": r["summaries"],
                    "test": r["test"], "figures": r["figures"], "sites": result["sites"],
                    "combat": result["combat"],
                    **({"selection": result["selection"]} if key == "R" else {})}
    return out


def _configs(site_yamls: list) -> list[SiteConfig]:
    return [c if isinstance(c, SiteConfig) else load_site_config(c) for c in site_yamls]


def holdout_rows(site: Site, params: str) -> ClassicalSite:
    """Every patient of a held-out evaluation cohort as rows to score (none fitted), in the order of
    ``site.split(ALL)`` (its patients with radiomics: all of them, or the failure is raised)."""
    table = site.radiomics(params)
    if table.failed:
        patient, reason = next(iter(table.failed.items()))
        raise ValueError(f"{site.site_id} held-out cohort: radiomics failed for {len(table.failed)} patient(s), "
                         f"first {patient}: {reason}")
    rows = join_site(site.rows, table, site.seed)
    return replace(rows, train=np.array([], dtype=int), test=np.arange(len(rows.patient_ids)))


def score_holdouts(fitted: dict, holdouts: list[Site], params: str, book=None) -> dict[str, dict]:
    """The fitted classical models (``run_classical_models``'s result) scored at each held-out cohort's
    hospital, after that hospital's ComBat harmonisation; the figures through the sites' tables, and the
    scores into ``book`` for the paired DeLong tests."""
    from hccfed.client.site_data import ALL
    from hccfed.simulation.evaluation import evaluate_scores

    endpoints = []
    for site in holdouts:
        rows, data = holdout_rows(site, params), site.split(ALL)
        if list(map(str, rows.patient_ids)) != list(map(str, data.patient_ids)):
            raise ValueError(f"{site.site_id} held-out cohort: the radiomics rows are not its patients")
        endpoints.append((site, data, ClassicalStatsSite(rows)))
    out = {}
    for key, r in fitted.items():
        name, rows = REPORT_NAMES[key], []
        for site, data, endpoint in endpoints:
            harmonised = endpoint.rows(r["combat"])
            score = r["model"].score(harmonised, harmonised.test)
            rows.append((site.site_id, data, score, score))
            if book is not None:
                book.add(name, site.site_id, data, score)
        out[name] = {**evaluate_scores(rows), "train_patients": int(sum(r["sites"]["n_train"].values())),
                     "features": r["model"].features}
    return out


def classical_model_results(sites: list[Site], harmonize: bool = True, params: str = "fast", n_folds: int = 5,
                            second_reader_seed: int | None = SECOND_READER_SEED,
                            icc_patients: int | None = ICC_PATIENTS_PER_SITE,
                            holdouts: list[Site] = (), book=None, fit_on: str = "train") -> dict[str, dict]:
    """The demo report's rows for CR / R / RCR trained federated on the demo's sites.

    Each :class:`~hccfed.client.site.Site` gives its rows (``Site.classical``: the same patients and
    train / test split as the deep models, radiomics with ``params`` cached under its ``cache_dir``).
    ``second_reader_seed``: the simulated second reader whose radiomics (perturbed masks) feed the ICC
    filter, of ``icc_patients`` training patients per site (None: all); None: no ICC step. ``fit_on``:
    "train", or "dev" (training and validation) beside cross-validated deep models.
    Returns {"CR (federated)" / "R (federated)" / "RCR (federated)": {"test": pooled_figures (auc,
    auc_ci_lower, auc_ci_upper, c_index, n_patients, n_positive, n_negative, ...), "figures":
    pooled_clinical_figures, "train_patients": int, "features": [...], "harmonized": bool}}; the R
    entry also holds "selection" (server.radiomics_selection) and the protected covariates.
    """
    rows = [site.classical(params, second_reader_seed, icc_patients, fit_on) for site in sites]
    out = run_classical_models(rows, sites[0].seed, n_folds, harmonize)
    if holdouts:  # the benchmark: each model on the held-out cohorts instead of the test splits
        held = score_holdouts(out, list(holdouts), params, book)
        for key, r in out.items():
            r["test"], r["figures"] = held[REPORT_NAMES[key]]["test"], held[REPORT_NAMES[key]]["figures"]
    return {REPORT_NAMES[key]: {"test": r["test"], "figures": r["figures"],
                                "train_patients": int(sum(r["sites"]["n_train"].values())),
                                "features": r["model"].features, "harmonized": bool(r["sites"]["harmonized_columns"]),
                                **({"selection": r["selection"], "protected_covariates":
                                    r["sites"]["protected_covariates"]} if "selection" in r else {})}
            for key, r in out.items()}


def harmonization_effect(site_yamls: list | None = None, params: str = "fast", seed: int = 0, n_folds: int = 5,
                         workers: int | None = None) -> dict:
    """Pooled test AUC (95% CI) and C-index of CR / R / RCR without and with federated ComBat of the radiomics.

    Default cohort: the repository's site YAMLs (data/synthetic). Returns {model: {"without": {...},
    "with": {...}, "auc_change": with - without}} and "seconds" per arm.
    """
    if site_yamls is None:
        from hccfed.simulation.cohort import DEFAULT_SITES

        site_yamls = [p.config_path for p in DEFAULT_SITES]
    sites = [Site(c, seed, workers=workers).classical(params) for c in _configs(site_yamls)]
    arms, seconds = {}, {}
    for arm, harmonize in (("without", False), ("with", True)):
        start = time.time()
        arms[arm] = run_classical_models(sites, seed, n_folds, harmonize)
        seconds[arm] = time.time() - start
    keep = ("auc", "auc_ci_lower", "auc_ci_upper", "c_index", "n_patients")
    out: dict = {key: {arm: {k: arms[arm][key]["test"].get(k) for k in keep} | {
        "features": arms[arm][key]["model"].features} for arm in arms} for key in arms["without"]}
    for row in out.values():
        row["auc_change"] = row["with"]["auc"] - row["without"]["auc"]
    return out | {"seconds": seconds}


def flower_stats_run(site_yamls: list, run_dir: Path, seed: int = 0, harmonize: bool = False, echo=None) -> Path:
    """The ServerApp's stats job on a local simulation SuperLink, one SuperNode per site YAML.

    Writes under ``run_dir``: ``stats/federated_stats.json`` (returned), ``stats/messages_audit.jsonl``
    and ``flower.log``.
    """
    from hccfed.common.run_config import RunConfig
    from hccfed.server.stats_job import RESULTS_FILE
    from hccfed.simulation.flower_runner import flwr_run

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    run = RunConfig(seed=seed, site_configs=tuple(str(Path(p).resolve()) for p in site_yamls),
                    run_dir=str((run_dir / "stats").resolve()), job="stats-combat" if harmonize else "stats")
    flwr_run(REPO_ROOT, run.to_flwr(), run_dir / ".flwr", num_supernodes=len(site_yamls),
             log_path=run_dir / "flower.log", echo=echo)
    out = run_dir / "stats" / RESULTS_FILE
    if not out.exists():  # `flwr run` can exit 0 when the ServerApp raised
        log = (run_dir / "flower.log").read_text(errors="replace").splitlines()
        reason = next((line for line in reversed(log) if "Error" in line or "error" in line), "no error line")
        raise RuntimeError(f"the stats job wrote no {RESULTS_FILE}: {reason.strip()} (see {run_dir / 'flower.log'})")
    return out


def stats_demo(settings, harmonize: bool = False, run_id: str | None = None) -> Path:
    """`hccfed stats`: the synthetic hospitals (made when missing), each one's radiomics extracted once
    with all cores, then the ServerApp's stats job over Flower; returns ``federated_stats.json``."""
    import json
    import logging
    from datetime import datetime

    from hccfed.client.radiomics import extract_site
    from hccfed.simulation.settings import effective_site_configs, ensure_cohort

    say = logging.getLogger("hccfed.stats").info
    run_dir = settings.runs_dir / (run_id or f"stats-{datetime.now():%Y%m%d-%H%M%S}")
    ensure_cohort(settings)
    yamls = effective_site_configs(settings, run_dir)
    for path in yamls:  # the sites then read their cache
        config = load_site_config(path)
        table = extract_site(config, "fast", workers=settings.workers, progress=True)
        say("%s: radiomics of %d patients (%d features, fast parameter file), cached in %s", config.site_id,
            len(table.patient_ids), len(table.names), config.cache_dir / "radiomics")
    say("federated statistics over Flower: CR / R / RCR on %d sites%s (log: %s)", len(yamls),
        ", radiomics harmonised by ComBat" if harmonize else "", run_dir / "flower.log")
    out = flower_stats_run(yamls, run_dir, seed=settings.seed, harmonize=harmonize,
                           echo=lambda line: say("  %s", line.split(":", 1)[-1].strip()))
    result = json.loads(out.read_text())
    say("%d statistics requests in %.0f s", result["requests"], result["seconds"])
    for name, model in result["models"].items():
        test = model["test"]
        say("%s: test AUC %.3f (%.3f-%.3f), C-index %.3f; %d features", name, test["auc"], test["auc_ci_lower"],
            test["auc_ci_upper"], test["c_index"], len(model["features"]))
    return out


if __name__ == "__main__":  # python -m hccfed.simulation.classical_models: the ComBat comparison on data/synthetic
    import json

    print(json.dumps(harmonization_effect(), indent=2, default=float))
    print(f"cohort: {Path('data/synthetic').resolve()}")
