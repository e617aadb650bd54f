"""The main job: synthetic hospitals -> preparation -> classical models -> federated training -> report.

The seeds' classical CR / R / RCR models come first, by federated statistics;
the R model's selected radiomics become the fusion model's radiomics input.
Besides the federated model (trained through Flower's simulation engine on a
real local SuperLink, then again under DP-SGD) it trains, in this process and
with the same code and the same number of epochs, the references a federation
is judged against: the centralized model on the pooled training data, each
hospital alone, clinical-only and image-only models. Every model is evaluated
on the same test patients (each hospital's test split, or with ``external``
every patient of a held-out hospital) through the same site-summary path, and
compared with the federated model by paired DeLong tests from two summary
rounds; the oracle row (the generator's true risk) says how close to the best
possible they come. Only this module reads the oracle.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from hccfed.client.evaluation import clinical_summary, evaluation_summary
from hccfed.client.prepare import PreparedSite, prepare_site
from hccfed.client.federated import model_for
from hccfed.client.site_radiomics import attach_radiomics
from hccfed.client.site_data import ALL, SplitData, pooled_split, site_split
from hccfed.client.training import TrainSettings, predict, train_local
from hccfed.common.config import RunConfig, SiteConfig, load_site_config, site_config_to_yaml
from hccfed.common.models.fusion import model_from_run_config
from hccfed.common.metrics.federated_delong import delong_paired_from_sums, placement_sums, pool_placement_sums
from hccfed.common.metrics.summaries import SummaryGrid, site_summary
from hccfed.common.schema import IMAGE_CHANNELS, clinical_feature_names
from hccfed.server.audit import read_audit, train_bytes_per_site
from hccfed.server.federated_eval import pooled_clinical_figures, pooled_figures
from hccfed.server.report import write_report
from hccfed.simulation.classical_models import classical_model_results
from hccfed.simulation.cohort import DEFAULT_SITES, GENERATOR_VERSION, SiteProfile, oracle_path, synthesize_cohort
from hccfed.simulation.flower_runner import flwr_run

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class SimulationSettings:
    """What `hccfed simulate` runs. Defaults are sized for the demo on 2 CPU cores."""

    data_dir: Path = REPO_ROOT / "data" / "synthetic"
    runs_dir: Path = REPO_ROOT / "runs"
    cache_dir: Path = REPO_ROOT / ".cache" / "prepared"
    seed: int = RunConfig.seed
    rounds: int = RunConfig.num_server_rounds
    local_epochs: int = RunConfig.local_epochs
    learning_rate: float = RunConfig.learning_rate
    batch_size: int = RunConfig.batch_size
    encoder_width: int = RunConfig.encoder_width
    sites: tuple[SiteProfile, ...] = DEFAULT_SITES
    run_id: str | None = None
    workers: int | None = None
    baselines: bool = True
    # Model and federation options take RunConfig's defaults, so the two never drift apart.
    encoder: str = RunConfig.encoder
    vit_patch_size: int = RunConfig.vit_patch_size
    vit_depth: int = RunConfig.vit_depth
    vit_heads: int = RunConfig.vit_heads
    augment: str = RunConfig.augment
    strategy: str = RunConfig.strategy
    proximal_mu: float = RunConfig.proximal_mu
    server_learning_rate: float = RunConfig.server_learning_rate
    local_norm: bool = RunConfig.local_norm
    dp_epsilon: float = RunConfig.dp_epsilon
    dp_delta: float = RunConfig.dp_delta
    dp_max_grad_norm: float = RunConfig.dp_max_grad_norm
    central_dp_noise: float = RunConfig.central_dp_noise
    central_dp_clipping_norm: float = RunConfig.central_dp_clipping_norm
    secagg: bool = RunConfig.secagg
    resume: bool = RunConfig.resume
    # External validation: train on the other hospitals, test on every patient of this one.
    external: str | None = None
    # Also train the federated model under DP-SGD at this epsilon (per site; 0: skip), reported beside it.
    compare_dp_epsilon: float = 8.0
    # The seeds' classical models (CR / R / RCR) by federated statistics on radiomics and labs.
    classical: bool = True


def _say(message: str) -> None:
    print(f"[hccfed {datetime.now():%H:%M:%S}] {message}", flush=True)


def ensure_cohort(settings: SimulationSettings, echo: Callable[[str], None] = _say) -> None:
    """Generate the synthetic cohort unless the same one is already on disk."""
    info_path = settings.data_dir / "cohort.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        wanted = {s.site_id: s.n_patients for s in settings.sites}
        if (info.get("seed") == settings.seed and info.get("counts") == wanted
                and not info.get("tabular_only") and info.get("generator_version") == GENERATOR_VERSION):
            echo(f"synthetic cohort found in {settings.data_dir}")
            return
    echo(f"generating the synthetic cohort in {settings.data_dir} (seed {settings.seed})")
    synthesize_cohort(settings.data_dir, seed=settings.seed, sites=settings.sites,
                      workers=settings.workers or 2, progress=True)


def effective_site_configs(settings: SimulationSettings, run_dir: Path) -> list[Path]:
    """Each site's YAML with absolute paths into this cohort, written into the run folder."""
    paths = []
    for profile in settings.sites:
        config = load_site_config(profile.config_path)
        config = replace(config, data_root=(settings.data_dir / profile.site_id).resolve(),
                         manifest=(settings.data_dir / profile.site_id / "manifest.csv").resolve(),
                         cache_dir=(settings.cache_dir / profile.site_id).resolve())
        path = run_dir / "sites" / f"{profile.site_id}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(site_config_to_yaml(config))
        paths.append(path)
    return paths


EvaluationSets = list[tuple[str, SplitData]]


def evaluation_sets(sites: list[PreparedSite], seed: int, external: str | None = None) -> EvaluationSets:
    """The patients every model is tested on: each hospital's test split (internal validation), or
    every patient of the held-out hospital ``external`` (external validation, leave-one-site-out)."""
    if external is None:
        return [(site.site_id, site_split(site, "test", seed)) for site in sites]
    held = [site for site in sites if site.site_id == external]
    if not held:
        raise ValueError(f"--external {external!r}: no such site (sites: {', '.join(s.site_id for s in sites)})")
    return [(external, site_split(held[0], ALL, seed))]


class TestPredictions:
    """Every model's test scores, kept where they were computed (each test site's side).

    They never enter metrics.json; they are the sites' input to round 2 of the
    paired DeLong test (:func:`paired_delong_tests`).
    """

    __test__ = False  # not a pytest class

    def __init__(self) -> None:
        self.rows: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.scores: dict[str, dict[str, np.ndarray]] = {}

    def add(self, model: str, site_id: str, data: SplitData, scores: np.ndarray) -> None:
        self.rows.setdefault(site_id, (data.labels.numpy(), data.times.numpy(), data.events.numpy()))
        self.scores.setdefault(site_id, {})[model] = np.asarray(scores, dtype=float)

    def models(self) -> list[str]:
        """The models every site has scores of."""
        sets = [set(s) for s in self.scores.values()]
        return sorted(set.intersection(*sets)) if sets else []


def evaluate_scores(rows: list[tuple[str, SplitData, np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Pooled and per-site figures from (site, data, logits, log-risks), through the sites' histograms."""
    summaries, clinical = {}, []
    for site_id, data, logits, risks in rows:
        values = (logits, risks, data.labels.numpy(), data.times.numpy(), data.events.numpy())
        summaries[site_id] = evaluation_summary(*values)
        clinical.append(clinical_summary(*values))
    return {"test": pooled_figures(list(summaries.values())),
            "test_per_site": {s: pooled_figures([summary]) for s, summary in summaries.items()},
            "figures": pooled_clinical_figures(clinical)}


def evaluate_on_test(model: torch.nn.Module, sets: EvaluationSets, name: str | None = None,
                     book: TestPredictions | None = None) -> dict[str, Any]:
    """Test figures of ``model`` on ``sets`` through the same histogram path as a federated run;
    its scores go into ``book`` (under ``name``) for the paired DeLong tests."""
    rows = []
    for site_id, data in sets:
        logits, risks = predict(model, data)
        rows.append((site_id, data, logits, risks))
        if book is not None and name is not None:
            book.add(name, site_id, data, logits)
    return evaluate_scores(rows)


def paired_delong_tests(book: TestPredictions, reference: str | None = "federated") -> dict[str, Any]:
    """Paired DeLong tests between the models in ``book``, by the two-round summary protocol.

    Round 1: each site's per-class histograms of every model's scores, pooled.
    Round 2: each site's placement sums against the pooled histograms
    (:func:`common.metrics.federated_delong.placement_sums`), pooled; the test
    follows from those sums only. ``reference`` is compared with every other
    model (all pairs when it is absent). Same format as `pool-summaries`.
    """
    models = book.models()
    if len(models) < 2:
        return {"status": "one model only: no paired test"}
    grid = SummaryGrid()
    pooled = {}
    for m in models:
        per_site = [site_summary(book.rows[s][0], book.scores[s][m], book.rows[s][1], book.rows[s][2], grid)
                    for s in book.scores]
        pooled[m] = {k: np.sum([p[k] for p in per_site], axis=0) for k in ("auc_pos", "auc_neg")}
    answers = [placement_sums(book.rows[s][0], {m: book.scores[s][m] for m in models}, pooled, grid)
               for s in book.scores]
    total = pool_placement_sums(answers)
    pairs = ([(reference, m) for m in models if m != reference] if reference in models
             else list(itertools.combinations(models, 2)))
    tests = []
    for a, b in pairs:
        try:
            tests.append({"model_a": a, "model_b": b, **delong_paired_from_sums(total, a, b)})
        except ValueError as err:
            tests.append({"model_a": a, "model_b": b, "error": str(err)})
    return {"status": "computed", "tests": tests}


def _validation_auc(model: torch.nn.Module, sites: list[PreparedSite], seed: int) -> float:
    summaries = []
    for site in sites:
        data = site_split(site, "val", seed)
        logits, risks = predict(model, data)
        summaries.append(evaluation_summary(logits, risks, data.labels.numpy(), data.times.numpy(),
                                            data.events.numpy()))
    return pooled_figures(summaries).get("auc", float("nan"))


def train_reference(name: str, sites_for_training: list[PreparedSite], sets: EvaluationSets,
                    run: RunConfig, encoder: str, echo: Callable[[str], None],
                    book: TestPredictions | None = None, clinical: bool = True,
                    radiomics: bool = True) -> dict[str, Any]:
    """Train one in-process reference model and test it.

    The same budget and rule as the federated model: ``rounds`` steps of
    ``local_epochs`` epochs (a fresh optimizer each step, as a site gets each
    round), keeping the step with the best validation AUC on the training
    sites' own validation splits (all a hospital alone would have).
    """
    started = time.time()
    n_clinical = len(clinical_feature_names()) if clinical else 0  # 0: the image-only model ignores the labs
    features = run.radiomics_features if radiomics else ()
    model = model_from_run_config(replace(run, encoder=encoder, radiomics_features=features),
                                  len(IMAGE_CHANNELS), n_clinical)
    data = pooled_split(sites_for_training, "train", run.seed)
    torch.manual_seed(run.seed)
    best_auc, best_step, best_state = -np.inf, 0, None
    for step in range(1, run.num_server_rounds + 1):
        train_local(model, data, TrainSettings(epochs=run.local_epochs, learning_rate=run.learning_rate,
                                               batch_size=run.batch_size, seed=run.seed * 1000 + step,
                                               augment=run.augment))
        auc = _validation_auc(model, sites_for_training, run.seed)
        if best_state is None or auc > best_auc:
            best_auc, best_step = (auc if np.isfinite(auc) else best_auc), step
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    result = evaluate_on_test(model, sets, name, book)
    result["selected_round"] = best_step
    result["seconds"] = time.time() - started
    result["train_patients"] = len(data)
    echo(f"{name}: test AUC {result['test']['auc']:.3f}, C-index {result['test']['c_index']:.3f} "
         f"({result['seconds']:.0f} s)")
    return result


def clinical_logistic_regression(sites: list[PreparedSite], sets: EvaluationSets, seed: int,
                                 book: TestPredictions | None = None,
                                 name: str = "clinical logistic regression (centralized)") -> dict[str, Any]:
    """The seeds' clinical model: logistic regression on the harmonized clinical vector, pooled.

    A reference that does not depend on any choice made for the neural models.
    The Cox figure uses the same linear score.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train = pooled_split(sites, "train", seed)
    known = train.labels.numpy() >= 0
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    model.fit(train.clinical.numpy()[known], train.labels.numpy()[known])
    rows = []
    for site_id, data in sets:
        score = model.decision_function(data.clinical.numpy())
        rows.append((site_id, data, score, score))
        if book is not None:
            book.add(name, site_id, data, score)
    return {**evaluate_scores(rows), "train_patients": int(known.sum())}


def oracle_figures(settings: SimulationSettings, sets: EvaluationSets) -> dict[str, Any]:
    """The generator's true risk on the same test patients: the best any model can do."""
    oracle = pd.read_csv(oracle_path(settings.data_dir)).set_index(["site_id", "patient_id"])
    rows = []
    for site_id, data in sets:
        truth = oracle.loc[[(site_id, pid) for pid in data.patient_ids]]
        risk = np.clip(truth["true_risk_24m"].to_numpy(dtype=float), 1e-6, 1 - 1e-6)
        rows.append((site_id, data, np.log(risk / (1 - risk)), truth["linear_predictor"].to_numpy(dtype=float)))
    figures = evaluate_scores(rows)
    return {"test": figures["test"], "figures": figures["figures"]}


def run_config_for(settings: SimulationSettings, site_paths: list[Path], run_dir: Path,
                   radiomics_features: tuple[str, ...] = ()) -> RunConfig:
    """The federated run's RunConfig from the simulation settings (and the radiomics the model takes)."""
    shared = {name: getattr(settings, name) for name in (
        "seed", "encoder", "encoder_width", "vit_patch_size", "vit_depth", "vit_heads", "augment", "strategy",
        "proximal_mu", "server_learning_rate", "local_norm", "dp_epsilon", "dp_delta", "dp_max_grad_norm",
        "central_dp_noise", "central_dp_clipping_norm", "secagg", "resume", "local_epochs", "learning_rate",
        "batch_size")}
    config = RunConfig(num_server_rounds=settings.rounds, site_configs=tuple(str(p) for p in site_paths),
                       run_dir=str(run_dir / "federated"), radiomics_features=tuple(radiomics_features), **shared)
    return RunConfig.from_mapping(config.to_flwr())  # the same checks as a Flower run


def describe_privacy(run: RunConfig) -> str:
    parts = []
    if run.dp_epsilon > 0:
        parts.append(f"DP-SGD (epsilon {run.dp_epsilon}, delta {run.dp_delta})")
    if run.central_dp_noise > 0:
        parts.append(f"central DP (noise {run.central_dp_noise})")
    if run.secagg:
        parts.append("SecAgg+")
    return (", " + ", ".join(parts)) if parts else ""


def bytes_sent_per_round(audit_path: Path, rounds: int) -> dict[str, float]:
    """Mean bytes each site sent in its training replies per round, from the server's audit log."""
    per_site = train_bytes_per_site(read_audit(audit_path))
    return {site: sum(values) / rounds for site, values in sorted(per_site.items())}


def dp_spent_per_site(audit_path: Path) -> dict[str, float]:
    """The last epsilon each site reported in its training replies (from the server's audit log)."""
    entries = read_audit(audit_path)
    names = {e["src_node_id"]: e["site_id"] for e in entries if e.get("site_id")}
    spent: dict[str, float] = {}
    for entry in entries:
        metrics = entry["metric_records"].get("metrics", {})
        if entry["message_type"] == "train" and "dp-epsilon" in metrics:
            spent[names.get(entry["src_node_id"], str(entry["src_node_id"]))] = float(metrics["dp-epsilon"])
    return dict(sorted(spent.items()))


def privacy_summary(models: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per federated model and site: what the site sent and the DP-SGD budget it spent (the report's
    privacy table). Read from each run's saved config and the server's audit figures."""
    runs = {}
    for name, entry in models.items():
        config = entry.get("run_config")
        if config is None or "bytes_sent_per_round" not in entry:
            continue
        run = RunConfig.from_mapping(config)
        spent = entry.get("dp_epsilon_spent_per_site", {})
        runs[name] = {
            "dp_sgd": {"target_epsilon": run.dp_epsilon, "delta": run.dp_delta, "max_grad_norm": run.dp_max_grad_norm}
            if run.dp_epsilon > 0 else None,
            "central_dp": {"noise_multiplier": run.central_dp_noise, "clipping_norm": run.central_dp_clipping_norm}
            if run.central_dp_noise > 0 else None,
            "secure_aggregation": "SecAgg+" if run.secagg else None,
            "sites": {site: {"bytes_sent_per_round": sent, "dp_sgd_epsilon_spent": spent.get(site)}
                      for site, sent in entry["bytes_sent_per_round"].items()}}
    return {"runs": runs,
            "evaluation_summaries": "exact counts (histograms of test predictions; no per-patient value)"}


def federated_run(run: RunConfig, name: str, train_sites: list[PreparedSite], sets: EvaluationSets,
                  external: str | None, book: TestPredictions, echo: Callable[[str], None]) -> dict[str, Any]:
    """One federated training through Flower on a local SuperLink, its figures on ``sets``, what each site
    sent per round and (under DP-SGD) the epsilon each spent. Its scores go into ``book``."""
    folder = Path(run.run_dir)
    echo(f"{name}: {len(train_sites)} sites, {run.num_server_rounds} rounds, encoder {run.encoder}, "
         f"strategy {run.strategy}{describe_privacy(run)} (Flower simulation)")
    t0 = time.time()
    flwr_run(REPO_ROOT, run.to_flwr(), folder.parent / f".flwr-{folder.name}", num_supernodes=len(train_sites),
             log_path=folder.parent / f"flower-{folder.name}.log",
             echo=lambda line: echo("  " + line.split(":", 1)[-1].strip()))
    result = json.loads((folder / "federated.json").read_text())
    if not run.local_norm:  # with local norms each site tests its own variant: no single model to hold
        internal = {k: result[k] for k in ("test", "test_per_site", "figures") if k in result}
        tested = evaluate_on_test(federated_model(run), sets, name, book)
        if external is not None:
            result["internal_test"] = internal
            result.update(tested)
    echo(f"{name}: test AUC {result['test']['auc']:.3f}, C-index {result['test']['c_index']:.3f} "
         f"({time.time() - t0:.0f} s)")
    audit = folder / "messages_audit.jsonl"
    result["bytes_sent_per_round"] = bytes_sent_per_round(audit, run.num_server_rounds)
    echo("bytes each site sends per round: " + ", ".join(
        f"{site} {n / 1e6:.3f} MB" for site, n in result["bytes_sent_per_round"].items()))
    if run.dp_epsilon > 0:
        result["dp_epsilon_spent_per_site"] = dp_spent_per_site(audit)
        echo(f"DP-SGD at the sites (target epsilon {run.dp_epsilon}, delta {run.dp_delta}), spent: " + ", ".join(
            f"{site} {eps:.2f}" for site, eps in result["dp_epsilon_spent_per_site"].items()))
    result["train_patients"] = sum(len(site_split(s, "train", run.seed)) for s in train_sites)
    return result


def federated_model(run: RunConfig) -> torch.nn.Module:
    """The federated run's selected global model (``global_model.pt``), as a site loads it."""
    state = torch.load(Path(run.run_dir) / "global_model.pt", weights_only=True)
    return model_for(run, state)


def describe_evaluation(sets: EvaluationSets, external: str | None) -> dict[str, Any]:
    n = sum(len(data) for _, data in sets)
    if external is None:
        return {"kind": "internal", "sites": [s for s, _ in sets], "patients": n,
                "description": f"each hospital's held-back test split ({n} patients in all)"}
    return {"kind": "external", "sites": [external], "patients": n,
            "description": f"external validation: every patient of {external} ({n}), a hospital no model "
                           f"was trained or tuned on (leave-one-site-out)"}


def simulate(settings: SimulationSettings = SimulationSettings(), echo: Callable[[str], None] = _say) -> Path:
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
        if settings.local_norm:
            raise ValueError("--external cannot be combined with --local-norm: the held-out hospital "
                             "has no normalization parameters of its own")
    run_dir.mkdir(parents=True, exist_ok=True)
    ensure_cohort(settings, echo)
    site_paths = effective_site_configs(settings, run_dir)
    sites = []
    for path in site_paths:
        config: SiteConfig = load_site_config(path)
        t0 = time.time()
        sites.append(prepare_site(config, workers=settings.workers))
        echo(f"prepared {config.site_id}: {len(sites[-1])} patients ({time.time() - t0:.1f} s)")
    train_paths = [path for site, path in zip(sites, site_paths) if site.site_id != settings.external]
    train_sites = [site for site in sites if site.site_id != settings.external]
    sets = evaluation_sets(sites, settings.seed, settings.external)
    evaluation = describe_evaluation(sets, settings.external)
    if settings.external is not None:
        echo(f"external validation: training on {', '.join(s.site_id for s in train_sites)}; "
             f"testing on all {evaluation['patients']} patients of {settings.external}")

    models: dict[str, Any] = {}
    radiomics: tuple[str, ...] = ()
    if settings.classical:
        # The seeds' classical models first: the federated R model's selection is the radiomics the
        # fusion model takes (DLRCR). Under --external they are fitted on the training hospitals only.
        t0 = time.time()
        echo("classical models (CR / R / RCR) by federated statistics on ComBat-harmonized radiomics "
             "(each site extracts its radiomics once; cached)")
        classical = classical_model_results(train_sites, settings.seed, harmonize=True,
                                            site_configs=train_paths, workers=settings.workers,
                                            progress=True)
        radiomics = tuple(classical["R (federated)"]["features"])
        for name, result in classical.items():
            echo(f"{name}: test AUC {result['test']['auc']:.3f}, C-index {result['test']['c_index']:.3f}"
                 + (" (training hospitals' test splits; not reported)" if settings.external else ""))
        if settings.external is None:
            models.update(classical)
        echo(f"classical models done ({time.time() - t0:.0f} s); the fusion model takes the R model's "
             f"{len(radiomics)} radiomics features")
    if radiomics:
        sites = [attach_radiomics(site, load_site_config(path), radiomics, "fast", settings.workers)
                 for site, path in zip(sites, site_paths)]
        train_sites = [site for site in sites if site.site_id != settings.external]
        sets = evaluation_sets(sites, settings.seed, settings.external)

    run = run_config_for(settings, train_paths, run_dir, radiomics)
    book = TestPredictions()
    models = {"federated": federated_run(run, "federated", train_sites, sets, settings.external, book, echo),
              **models}
    if settings.compare_dp_epsilon > 0 and run.dp_epsilon == 0 and run.central_dp_noise == 0:
        private = RunConfig.from_mapping(replace(run, dp_epsilon=settings.compare_dp_epsilon,
                                                 run_dir=str(run_dir / "federated-dp")).to_flwr())
        name = f"federated + DP-SGD (epsilon {settings.compare_dp_epsilon:g})"
        models[name] = federated_run(private, name, train_sites, sets, settings.external, book, echo)
    if settings.baselines:
        models["centralized"] = train_reference("centralized", train_sites, sets, run, run.encoder, echo, book)
        for site in train_sites:
            name = f"local-only {site.site_id}"
            models[name] = train_reference(name, [site], sets, run, run.encoder, echo, book)
        models["clinical-only (centralized)"] = train_reference("clinical-only (centralized)", train_sites, sets,
                                                                run, "none", echo, book, radiomics=False)
        if run.encoder != "none":
            models["image-only (centralized)"] = train_reference("image-only (centralized)", train_sites, sets, run,
                                                                 run.encoder, echo, book, clinical=False,
                                                                 radiomics=False)
        models["clinical logistic regression (centralized)"] = clinical_logistic_regression(
            train_sites, sets, run.seed, book)
    paired = paired_delong_tests(book)
    if run.local_norm and paired.get("status") == "computed":
        paired["note"] = "the federated model is not in these tests: with local norms each site holds its own variant"
    metrics = {
        "run_id": run_id,
        "seconds": time.time() - started,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(settings).items() if k != "sites"},
        "evaluation": evaluation,
        "sites": {s.site_id: {"patients": len(s), "role": "external test" if s.site_id == settings.external
                              else "training", **{split: int(len(site_split(s, split, run.seed)))
                                                  for split in ("train", "val", "test")}} for s in sites},
        "oracle": oracle_figures(settings, sets),
        "models": models,
        "paired_delong": paired,
        "privacy": privacy_summary(models),
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    report = write_report(metrics, run_dir)
    echo(f"done in {metrics['seconds'] / 60:.1f} min; report: {report}")
    return run_dir
