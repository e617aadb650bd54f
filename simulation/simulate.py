"""The main job: synthetic hospitals -> preparation -> federated training -> report.

Besides the federated model (trained through Flower's simulation engine on a
real local SuperLink) it trains, in this process and with the same code and
the same number of epochs, the references a federation is judged against:
the centralized model on the pooled training data, each hospital alone, and a
clinical-only model. Every model is evaluated on the same test patients
through the same site-summary path; the oracle row (the generator's true risk)
says how close to the best possible they come. Only this module reads the oracle.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from client.evaluation import clinical_summary, evaluation_summary
from client.prepare import PreparedSite, prepare_site
from client.site_data import pooled_split, site_split
from client.training import TrainSettings, predict, train_local
from common.config import RunConfig, SiteConfig, load_site_config, site_config_to_yaml
from common.models.fusion import model_from_run_config
from common.schema import IMAGE_CHANNELS, clinical_feature_names
from server.audit import read_audit, train_bytes_per_site
from server.federated_eval import pooled_clinical_figures, pooled_figures
from server.report import write_report
from simulation.cohort import DEFAULT_SITES, GENERATOR_VERSION, SiteProfile, oracle_path, synthesize_cohort
from simulation.flower_runner import flwr_run

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


def evaluate_on_test(model: torch.nn.Module, sites: list[PreparedSite], seed: int) -> dict[str, Any]:
    """Pooled and per-site test figures through the same histogram path as a federated run."""
    summaries, clinical = {}, []
    for site in sites:
        data = site_split(site, "test", seed)
        logits, risks = predict(model, data)
        rows = (logits, risks, data.labels.numpy(), data.times.numpy(), data.events.numpy())
        summaries[site.site_id] = evaluation_summary(*rows)
        clinical.append(clinical_summary(*rows))
    return {"test": pooled_figures(list(summaries.values())),
            "test_per_site": {s: pooled_figures([summary]) for s, summary in summaries.items()},
            "figures": pooled_clinical_figures(clinical)}


def _validation_auc(model: torch.nn.Module, sites: list[PreparedSite], seed: int) -> float:
    summaries = []
    for site in sites:
        data = site_split(site, "val", seed)
        logits, risks = predict(model, data)
        summaries.append(evaluation_summary(logits, risks, data.labels.numpy(), data.times.numpy(),
                                            data.events.numpy()))
    return pooled_figures(summaries).get("auc", float("nan"))


def train_reference(name: str, sites_for_training: list[PreparedSite], all_sites: list[PreparedSite],
                    run: RunConfig, encoder: str, echo: Callable[[str], None]) -> dict[str, Any]:
    """Train one in-process reference model and test it.

    The same budget and rule as the federated model: ``rounds`` steps of
    ``local_epochs`` epochs (a fresh optimizer each step, as a site gets each
    round), keeping the step with the best validation AUC on the training
    sites' own validation splits (all a hospital alone would have).
    """
    started = time.time()
    model = model_from_run_config(replace(run, encoder=encoder), len(IMAGE_CHANNELS), len(clinical_feature_names()))
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
    result = evaluate_on_test(model, all_sites, run.seed)
    result["selected_round"] = best_step
    result["seconds"] = time.time() - started
    result["train_patients"] = len(data)
    echo(f"{name}: test AUC {result['test']['auc']:.3f}, C-index {result['test']['c_index']:.3f} "
         f"({result['seconds']:.0f} s)")
    return result


def clinical_logistic_regression(sites: list[PreparedSite], seed: int) -> dict[str, Any]:
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
    summaries = []
    for site in sites:
        data = site_split(site, "test", seed)
        score = model.decision_function(data.clinical.numpy())
        summaries.append(evaluation_summary(score, score, data.labels.numpy(), data.times.numpy(),
                                            data.events.numpy()))
    return {"test": pooled_figures(summaries), "train_patients": int(known.sum())}


def oracle_figures(settings: SimulationSettings, sites: list[PreparedSite], seed: int) -> dict[str, Any]:
    """The generator's true risk on the same test patients: the best any model can do."""
    oracle = pd.read_csv(oracle_path(settings.data_dir)).set_index(["site_id", "patient_id"])
    summaries, clinical = [], []
    for site in sites:
        data = site_split(site, "test", seed)
        rows = oracle.loc[[(site.site_id, pid) for pid in data.patient_ids]]
        risk = np.clip(rows["true_risk_24m"].to_numpy(dtype=float), 1e-6, 1 - 1e-6)
        values = (np.log(risk / (1 - risk)), rows["linear_predictor"].to_numpy(dtype=float),
                  data.labels.numpy(), data.times.numpy(), data.events.numpy())
        summaries.append(evaluation_summary(*values))
        clinical.append(clinical_summary(*values))
    return {"test": pooled_figures(summaries), "figures": pooled_clinical_figures(clinical)}


def run_config_for(settings: SimulationSettings, site_paths: list[Path], run_dir: Path) -> RunConfig:
    """The federated run's RunConfig from the simulation settings."""
    shared = {name: getattr(settings, name) for name in (
        "seed", "encoder", "encoder_width", "vit_patch_size", "vit_depth", "vit_heads", "augment", "strategy",
        "proximal_mu", "server_learning_rate", "local_norm", "dp_epsilon", "dp_delta", "dp_max_grad_norm",
        "central_dp_noise", "central_dp_clipping_norm", "secagg", "resume", "local_epochs", "learning_rate",
        "batch_size")}
    config = RunConfig(num_server_rounds=settings.rounds, site_configs=tuple(str(p) for p in site_paths),
                       run_dir=str(run_dir / "federated"), **shared)
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


def simulate(settings: SimulationSettings = SimulationSettings(), echo: Callable[[str], None] = _say) -> Path:
    """Run the whole job; returns the run folder (metrics.json, report.html, report.md)."""
    started = time.time()
    run_id = settings.run_id or datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    run_dir = (settings.runs_dir / run_id).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    ensure_cohort(settings, echo)
    site_paths = effective_site_configs(settings, run_dir)
    sites = []
    for path in site_paths:
        config: SiteConfig = load_site_config(path)
        t0 = time.time()
        sites.append(prepare_site(config, workers=settings.workers))
        echo(f"prepared {config.site_id}: {len(sites[-1])} patients ({time.time() - t0:.1f} s)")

    run = run_config_for(settings, site_paths, run_dir)
    echo(f"federated training: {len(sites)} sites, {run.num_server_rounds} rounds, encoder {run.encoder}, "
         f"strategy {run.strategy}{describe_privacy(run)} (Flower simulation)")
    t0 = time.time()
    flwr_run(REPO_ROOT, run.to_flwr(), run_dir / ".flwr", num_supernodes=len(sites),
             log_path=run_dir / "flower.log", echo=lambda line: echo("  " + line.split(":", 1)[-1].strip()))
    federated = json.loads((run_dir / "federated" / "federated.json").read_text())
    echo(f"federated: test AUC {federated['test']['auc']:.3f}, C-index {federated['test']['c_index']:.3f} "
         f"({time.time() - t0:.0f} s)")
    federated["bytes_sent_per_round"] = bytes_sent_per_round(run_dir / "federated" / "messages_audit.jsonl",
                                                             run.num_server_rounds)
    echo("bytes each site sends per round: " + ", ".join(
        f"{site} {n / 1e6:.3f} MB" for site, n in federated["bytes_sent_per_round"].items()))
    if run.dp_epsilon > 0:
        federated["dp_epsilon_spent_per_site"] = dp_spent_per_site(run_dir / "federated" / "messages_audit.jsonl")
        echo(f"DP-SGD at the sites (target epsilon {run.dp_epsilon}, delta {run.dp_delta}), spent: " + ", ".join(
            f"{site} {eps:.2f}" for site, eps in federated["dp_epsilon_spent_per_site"].items()))

    federated["train_patients"] = sum(len(site_split(s, "train", run.seed)) for s in sites)
    models: dict[str, Any] = {"federated": federated}
    if settings.baselines:
        models["centralized"] = train_reference("centralized", sites, sites, run, run.encoder, echo)
        for site in sites:
            models[f"local-only {site.site_id}"] = train_reference(f"local-only {site.site_id}", [site], sites,
                                                                   run, run.encoder, echo)
        models["clinical-only (centralized)"] = train_reference("clinical-only (centralized)", sites, sites,
                                                                run, "none", echo)
        models["clinical logistic regression (centralized)"] = clinical_logistic_regression(sites, run.seed)
    metrics = {
        "run_id": run_id,
        "seconds": time.time() - started,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(settings).items() if k != "sites"},
        "sites": {s.site_id: {"patients": len(s), **{split: int(len(site_split(s, split, run.seed)))
                                                     for split in ("train", "val", "test")}} for s in sites},
        "oracle": oracle_figures(settings, sites, run.seed),
        "models": models,
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    report = write_report(metrics, run_dir)
    echo(f"done in {metrics['seconds'] / 60:.1f} min; report: {report}")
    return run_dir
