"""The main job: synthetic hospitals -> preparation -> classical models -> federated training -> report.

The seeds' classical CR / R / RCR models come first, by federated statistics;
the R model's selected radiomics become the fusion model's radiomics input.
Besides the federated model (trained through Flower's simulation engine on a
real local SuperLink, then again under DP-SGD) it trains, in this process and
with the same code and the same number of epochs, the references a federation
is judged against (:mod:`hccfed.simulation.references`). Every model is
evaluated on the same test patients through the same site-summary path and
compared with the federated model by paired DeLong tests
(:mod:`hccfed.simulation.evaluation`); the oracle row (the generator's true risk)
says how close to the best possible they come.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hccfed.client.site import Site
from hccfed.common.splits import fitted_split
from hccfed.common.plan import derive_plan
from hccfed.common.run_config import RunConfig
from hccfed.common.site_config import load_site_config
from hccfed.server.report import write_report
from hccfed.simulation.classical_models import classical_model_results
from hccfed.simulation.evaluation import (TestPredictions, describe_evaluation, evaluation_sets, oracle_figures,
                                          paired_delong_tests)
from hccfed.server.run_summary import privacy_summary
from hccfed.simulation.federated_runs import federated_run
from hccfed.simulation.references import clinical_logistic_regression, train_reference
from hccfed.simulation.settings import SimulationSettings, effective_site_configs, ensure_cohort

log = logging.getLogger("hccfed.simulate")


def plan_sites(settings: SimulationSettings, site_paths: list[Path]) -> list[Site]:
    """Each hospital's Site, prepared by the federation plan the server would make from the training
    hospitals' fingerprints (the Flower run's ServerApp derives the same plan from the same fingerprints)."""
    configs = [load_site_config(path) for path in site_paths]
    fingerprints = {c.site_id: Site(c, settings.seed, workers=settings.workers, progress=True).fingerprint()
                    for c in configs if c.site_id != settings.external}
    plan = derive_plan(fingerprints, settings.run)
    log.info("federation plan: %g mm voxels, %d-voxel crop, %s normalisation%s", plan.spacing_mm,
             plan.crop_voxels, plan.normalisation, "".join(f"; {n}" for n in plan.notes))
    sites = []
    for config in configs:
        t0 = time.time()
        sites.append(Site(config, settings.seed, workers=settings.workers, progress=True, plan=plan))
        log.info("prepared %s: %d patients (%.1f s)", config.site_id, len(sites[-1].prepared), time.time() - t0)
    return sites


def simulate(settings: SimulationSettings = SimulationSettings()) -> Path:
    """Run the whole job; returns the run folder (metrics.json, report.html, report.md)."""
    started = time.time()
    run_id = settings.run_id or datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    run_dir = (settings.runs_dir / run_id).resolve()
    site_ids = [p.site_id for p in settings.sites]
    if settings.external is not None:
        if settings.external not in site_ids:
            raise ValueError(f"--external {settings.external!r}: no such site (sites: {', '.join(site_ids)})")
        if len(site_ids) < 3:
            raise ValueError("--external needs at least 3 sites: 2 to federate, 1 to hold out")
        if settings.run.local_norm:
            raise ValueError("--external cannot be combined with --local-norm: the held-out hospital "
                             "has no normalization parameters of its own")
    run_dir.mkdir(parents=True, exist_ok=True)
    ensure_cohort(settings)
    site_paths = effective_site_configs(settings, run_dir)
    sites = plan_sites(settings, site_paths)
    train_paths = [path for site, path in zip(sites, site_paths) if site.site_id != settings.external]
    train_sites = [site for site in sites if site.site_id != settings.external]
    sets = evaluation_sets(sites, settings.external)
    evaluation = describe_evaluation(sets, settings.external)
    if settings.external is not None:
        log.info(f"external validation: training on {', '.join(s.site_id for s in train_sites)}; "
             f"testing on all {evaluation['patients']} patients of {settings.external}")

    models: dict[str, Any] = {}
    radiomics: tuple[str, ...] = ()
    if settings.classical:
        # The seeds' classical models first: the federated R model's selection is the radiomics the
        # fusion model takes (DLRCR). Under --external they are fitted on the training hospitals only.
        t0 = time.time()
        log.info("classical models (CR / R / RCR) by federated statistics on ComBat-harmonized radiomics "
             "(each site extracts its radiomics once; cached)")
        classical = classical_model_results(train_sites, harmonize=True, fit_on=fitted_split(settings.run.cv_folds))
        radiomics = tuple(classical["R (federated)"]["features"])
        for name, result in classical.items():
            log.info(f"{name}: test AUC {result['test']['auc']:.3f}, C-index {result['test']['c_index']:.3f}"
                 + (" (training hospitals' test splits; not reported)" if settings.external else ""))
        if settings.external is None:
            models.update(classical)
        log.info(f"classical models done ({time.time() - t0:.0f} s); the fusion model takes the R model's "
             f"{len(radiomics)} radiomics features")
    if radiomics:
        sites = [site.with_radiomics(radiomics, "fast") for site in sites]
        train_sites = [site for site in sites if site.site_id != settings.external]
        sets = evaluation_sets(sites, settings.external)

    run = RunConfig.from_mapping(replace(settings.run, site_configs=tuple(str(p) for p in train_paths),
                                         run_dir=str(run_dir / "federated"),
                                         radiomics_features=radiomics).to_flwr())  # a Flower run's checks
    book = TestPredictions()
    models = {"federated": federated_run(run, "federated", train_sites, sets, settings.external, book),
              **models}
    if settings.compare_dp_epsilon > 0 and run.dp_epsilon == 0 and run.central_dp_noise == 0:
        private = RunConfig.from_mapping(replace(run, dp_epsilon=settings.compare_dp_epsilon,
                                                 run_dir=str(run_dir / "federated-dp")).to_flwr())
        name = f"federated + DP-SGD (epsilon {settings.compare_dp_epsilon:g})"
        models[name] = federated_run(private, name, train_sites, sets, settings.external, book)
    if settings.baselines:
        models["centralized"] = train_reference("centralized", train_sites, sets, run, run.encoder, book)
        for site in train_sites:
            name = f"local-only {site.site_id}"
            models[name] = train_reference(name, [site], sets, run, run.encoder, book)
        models["clinical-only (centralized)"] = train_reference("clinical-only (centralized)", train_sites, sets,
                                                                run, "none", book, radiomics=False)
        if run.encoder != "none":
            models["image-only (centralized)"] = train_reference("image-only (centralized)", train_sites, sets, run,
                                                                 run.encoder, book, clinical=False,
                                                                 radiomics=False)
        models["clinical logistic regression (centralized)"] = clinical_logistic_regression(
            train_sites, sets, book, split=fitted_split(run.cv_folds))
    paired = paired_delong_tests(book)
    if run.local_norm and paired.get("status") == "computed":
        paired["note"] = "the federated model is not in these tests: with local norms each site holds its own variant"
    metrics = {
        "run_id": run_id,
        "seconds": time.time() - started,
        "settings": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(settings).items()
                        if k not in ("sites", "run")}, "run": settings.run.to_flwr()},
        "evaluation": evaluation,
        "plan": json.loads(sites[0].plan.to_json()),
        "sites": {s.site_id: {"patients": len(s), "role": "external test" if s.site_id == settings.external
                              else "training", **{split: int(len(s.split_indices[split]))
                                                  for split in ("train", "val", "test")}} for s in sites},
        "oracle": oracle_figures(settings.data_dir, sets),
        "models": models,
        "paired_delong": paired,
        "privacy": privacy_summary(models),
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    report = write_report(metrics, run_dir)
    log.info(f"done in {metrics['seconds'] / 60:.1f} min; report: {report}")
    return run_dir
