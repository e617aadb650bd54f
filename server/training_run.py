"""One federated training run as the coordinator sees it.

The strategy (server/strategies.py: FedAvg by default, FedProx or FedAdam,
optionally inside central DP) is weighted by each site's number of training
patients. Each round: the sampled sites train, their replies are checked
(server/update_validation.py: a bad reply is logged and left out), the rest
are aggregated; then every site evaluates the global model on its validation
split and the server pools their histograms into an AUC and C-index; the
round's model and state are checkpointed (server/checkpoints.py). The round
with the best pooled validation AUC is kept and, after the last round,
evaluated on the sites' test splits; its test risks are also reported
recalibrated (Platt or isotonic, run option ``recalibration``) on the pooled
validation score tables of that round, which the sites sent with it. The
server writes the global model, the figures and an audit of every received
message under the run's ``run-dir``.

With ``cv-folds`` K >= 2 the round is chosen by federated cross-validation instead
(:func:`cross_validate`): each site cuts its development patients (training and
validation splits) into K folds at home; for each fold k a fresh model trains on
the other folds for every round and each site evaluates it on fold k; the server
pools the K folds' tables per round (out-of-fold, every development patient once)
and keeps the round with the best pooled AUC. Then a final model trains on all
development patients for that many rounds; the recalibration is fitted on that
round's out-of-fold tables. Nothing new leaves a site: the same summaries, of
other patient subsets, each above the site's minimum cell size.

The round loop is written out here rather than using ``Strategy.start``: that
loop always starts at round 1 and cannot resume, and the reply checks must
run before any wrapper (central DP clips replies before its inner strategy sees them).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy

from hccfed.common.atomic_io import atomic_write_text
from hccfed.common.errors import ConfigError
from hccfed.common.run_config import RunConfig
from hccfed.common.splits import DEV, cv_split_name
from hccfed.common.models.fusion import model_from_run_config
from hccfed.common.schema import IMAGE_CHANNELS, clinical_feature_names
from hccfed.server.audit import AuditingGrid
from hccfed.server.checkpoints import load_checkpoint, save_checkpoint
from hccfed.server.federated_eval import SUMMARY_KEYS, pooled_clinical_figures, pooled_figures, pooled_score_table, \
    recalibrated_clinical_figures, score_table_arrays
from hccfed.server.plan_step import agree_plan
from hccfed.server.privacy_releases import ReleaseCollectingGrid, privacy_json, refusal_of
from hccfed.server.roster import Roster, RosterGrid, min_sites, roster_sites
from hccfed.server.run_summary import write_coordinator_report
from hccfed.server.secagg import SecureAggregator
from hccfed.server.strategies import make_strategy, restore_strategy_state, strategy_state
from hccfed.server.update_validation import reply_site_id, validate_train_replies

LOG = logging.getLogger("flwr")  # Flower's logger: shown in the run's log with its own lines


def summaries_of(contents: list[RecordDict]) -> list[dict[str, np.ndarray]]:
    """The histogram arrays of each evaluate reply."""
    return [{k: content["summary"][k].numpy() for k in SUMMARY_KEYS} for content in contents]


def site_ids_of(contents: list[RecordDict]) -> list[str]:
    return [str(content["site"]["site-id"]) if "site" in content else f"site-{i}"
            for i, content in enumerate(contents)]


class PooledEvaluation:
    """Hook for FedAvg's ``evaluate_metrics_aggr_fn``: pooled figures, kept per round."""

    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []
        self.last_contents: list[RecordDict] = []

    def __call__(self, contents: list[RecordDict], weighted_by_key: str) -> MetricRecord:
        self.last_contents = contents
        figures = pooled_figures(summaries_of(contents))
        self.history.append(figures)
        return MetricRecord({k: v for k, v in figures.items() if np.isfinite(v)})


@dataclass
class RunProgress:
    """The bookkeeping of a run that a checkpoint keeps (no weights but the best round's number)."""

    run_token: str
    best_round: int = 0
    best_auc: float = -np.inf
    validation_history: list[dict[str, Any]] = field(default_factory=list)
    train_history: dict[int, dict[str, float]] = field(default_factory=dict)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    node_sites: dict[int, str] = field(default_factory=dict)
    #: The best round's pooled validation score table as lists (server.federated_eval.pooled_score_table), for
    #: the recalibration; None when that round's validation sent no tables or the checkpoint predates it.
    best_validation_scores: dict[str, list] | None = None

    def update_best(self, server_round: int, auc: float, validation: list[RecordDict] | None = None) -> None:
        """Early stopping on the pooled validation AUC: keep the best round (the earliest on ties) and, from
        ``validation`` (that round's evaluate replies; None when none came), its pooled score table."""
        if self.best_round == 0 or auc > self.best_auc:
            self.best_round = server_round
            self.best_auc = auc if np.isfinite(auc) else self.best_auc
            self.best_validation_scores = pooled_score_table(summaries_of(validation)) if validation else None


def _round_config(base: ConfigRecord, **values: Any) -> ConfigRecord:
    config = ConfigRecord(dict(base))
    config.update(values)
    return config


def train_one_round(strategy: Strategy, grid: Any, server_round: int, arrays: ArrayRecord,
                    train_config: ConfigRecord, progress: RunProgress, seed: int
                    ) -> tuple[ArrayRecord, MetricRecord | None, int]:
    """Send, check the replies, aggregate; returns the new global arrays (unchanged if none was sound), the
    metrics and how many sites answered (a refusal or an unsound update is an answer; a node unavailable,
    a timeout or a crashed ClientApp is not)."""
    messages = strategy.configure_train(server_round, arrays, _round_config(train_config), grid)
    replies = list(grid.send_and_receive(messages))
    refused = [r for r in map(refusal_of, replies) if r is not None]
    answered = sum(1 for r in replies if not r.has_error()) + len(refused)
    if replies and len(refused) == len(replies):
        raise ConfigError(f"round {server_round}: every site refused to train: "
                          + "; ".join(reason for _, reason in refused))
    for msg in replies:
        if reply_site_id(msg) != "unknown":
            progress.node_sites[int(msg.metadata.src_node_id)] = reply_site_id(msg)
    accepted, rejected = validate_train_replies(replies, arrays, progress.node_sites)
    # Aggregate in a fixed order (replies arrive in any order; float sums depend on it).
    accepted.sort(key=lambda m: (reply_site_id(m), int(m.metadata.src_node_id)))
    progress.rejected += [{"round": server_round, "node_id": r.node_id, "site_id": r.site_id, "reason": r.reason}
                          for r in rejected]
    if not accepted:
        LOG.warning("round %d: no sound training reply; the global model is unchanged", server_round)
        return arrays, None, answered
    # Central DP draws its noise from numpy's global generator: seed it per round for reproducibility.
    np.random.seed(np.random.SeedSequence([seed, server_round]).generate_state(1)[0])
    new_arrays, metrics = strategy.aggregate_train(server_round, accepted)
    return (new_arrays if new_arrays is not None else arrays), metrics, answered


def train_round_with_retries(strategy: Strategy, grid: Any, roster: Roster, audited: Any, server_round: int,
                             arrays: ArrayRecord, train_config: ConfigRecord, progress: RunProgress,
                             config: RunConfig) -> tuple[ArrayRecord, MetricRecord | None]:
    """A round counts when at least the roster's minimum of sites answered; otherwise it is retried (the
    strategy's state restored) once the missing sites are back or ``roster-wait-s`` has passed, at most
    ``round-retries`` times; then the run stops with the sites that were missing."""
    for attempt in range(config.round_retries + 1):
        roster.wait(audited, config.roster_wait_s)  # missing sites: a bounded wait for them to rejoin
        saved = strategy_state(strategy)
        new_arrays, metrics, answered = train_one_round(strategy, grid, server_round, arrays, train_config,
                                                        progress, config.seed)
        if answered >= roster.minimum:
            return new_arrays, metrics
        restore_strategy_state(strategy, saved)
        LOG.warning("round %d: %d site(s) answered, %d needed (min-sites); %s", server_round, answered,
                    roster.minimum, "retrying the round" if attempt < config.round_retries else "giving up")
    raise ConfigError(f"round {server_round}: fewer than min-sites ({roster.minimum}) sites answered in "
                      f"{config.round_retries + 1} attempts; missing now: {roster.missing()}")


def secure_train_round(aggregator: SecureAggregator, grid: Any, server_round: int, arrays: ArrayRecord,
                       train_config: ConfigRecord) -> tuple[ArrayRecord, MetricRecord | None]:
    """A SecAgg+ round: the server only sees the weighted average, which must still be finite."""
    aggregated, metrics = aggregator.aggregate(grid, server_round, arrays, train_config)
    if aggregated is None or not all(np.isfinite(a.numpy()).all() for a in aggregated.values()):
        LOG.warning("round %d: secure aggregation gave no usable model; the global model is unchanged", server_round)
        return arrays, None
    return aggregated, MetricRecord(metrics)


def evaluate_round_on_sites(strategy: Strategy, grid: Any, server_round: int, arrays: ArrayRecord,
                            config: ConfigRecord) -> MetricRecord | None:
    replies = grid.send_and_receive(strategy.configure_evaluate(server_round, arrays, config, grid))
    return strategy.aggregate_evaluate(server_round, replies)


def train_config_for(config: RunConfig, progress: RunProgress, plan: Any, split: str | None = None) -> ConfigRecord:
    """What every training message carries; ``split``: the split the sites train on (None: "train")."""
    record = ConfigRecord({"lr": config.learning_rate, "run-token": progress.run_token, "plan": plan.to_json()})
    if split is not None:
        record["train-split"] = split
    return record


def evaluation_tables(strategy: Strategy, grid: Any, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                      evaluation: PooledEvaluation) -> list[dict[str, np.ndarray]]:
    """Every site's evaluation summary of the split ``config`` names; a site that sent none (refused, failed or
    silent) stops the run with its reason, since a pooled figure without it would be another cohort's."""
    messages = list(strategy.configure_evaluate(server_round, arrays, config, grid))
    replies = list(grid.send_and_receive(messages))
    before = len(evaluation.history)
    strategy.aggregate_evaluate(server_round, replies)
    contents = evaluation.last_contents if len(evaluation.history) > before else []
    if not messages or len(contents) < len(messages):
        reasons = [reason for _, reason in filter(None, map(refusal_of, replies))]
        raise ConfigError(f"round {server_round}: {len(contents)} of {len(messages)} sites returned evaluation "
                          f"tables of split {config['split']!r}" + (": " + "; ".join(reasons) if reasons else "")
                          + ("" if not str(config["split"]).startswith("cv-") else
                             " (a fold below a site's privacy.min_cell_size: use fewer cv-folds)"))
    return summaries_of(contents)


def cross_validate(grid: Any, roster: Roster, audited: Any, config: RunConfig, plan: Any, initial: ArrayRecord,
                   progress: RunProgress) -> dict[str, Any]:
    """Federated K-fold cross-validation of the round (``cv-folds``): K trainings of ``num-server-rounds``
    rounds from ``initial``, fold k's model evaluated each round on fold k at every site. Returns the pooled
    out-of-fold figures per round ("history"), the selected round (best pooled out-of-fold AUC, the earliest on
    ties), its pooled out-of-fold score table, and each fold's own AUC per round. Fold k's round r travels as
    message round (k - 1) * rounds + r, so every local seed, ledger entry and audit line is distinct."""
    folds, rounds = config.cv_folds, config.num_server_rounds
    per_fold: list[list[list[dict[str, np.ndarray]]]] = []
    per_fold_auc: list[list[float]] = []
    for fold in range(1, folds + 1):
        evaluation = PooledEvaluation()
        strategy = make_strategy(config, roster.minimum, evaluation)
        arrays = initial
        train_config = train_config_for(config, progress, plan, cv_split_name(fold, folds, "train"))
        tables = []
        for r in range(1, rounds + 1):
            message_round = (fold - 1) * rounds + r
            LOG.info("[CV FOLD %d/%d, ROUND %d/%d]", fold, folds, r, rounds)
            arrays, _ = train_round_with_retries(strategy, grid, roster, audited, message_round, arrays,
                                                 train_config, progress, config)
            tables.append(evaluation_tables(strategy, grid, message_round, arrays, ConfigRecord(
                {"split": cv_split_name(fold, folds, "val"), "run-token": progress.run_token,
                 "model-round": message_round, "plan": plan.to_json()}), evaluation))
        per_fold.append(tables)
        per_fold_auc.append([h.get("auc", float("nan")) for h in evaluation.history])  # pooled by the hook
        LOG.info("cv fold %d/%d: held-out fold AUC per round %s", fold, folds,
                 " ".join(f"{auc:.3f}" for auc in per_fold_auc[-1]))
    history = [pooled_figures([s for tables in per_fold for s in tables[r]]) for r in range(rounds)]
    aucs = np.array([h.get("auc", np.nan) for h in history], dtype=float)
    if not np.isfinite(aucs).any():
        raise ConfigError("cross-validation: no round has a pooled out-of-fold AUC (every fold needs patients "
                          "of both classes)")
    best = int(np.nanargmax(aucs)) + 1  # nanargmax keeps the first of equal maxima
    LOG.info("cross-validation: pooled out-of-fold AUC best at round %d (%.3f) of %d", best, aucs[best - 1], rounds)
    return {"folds": folds, "selected_round": best, "history": history,
            "score_table": pooled_score_table([s for tables in per_fold for s in tables[best - 1]]),
            "per_fold_auc": per_fold_auc}


def train_final(grid: Any, roster: Roster, audited: Any, config: RunConfig, plan: Any, initial: ArrayRecord,
                progress: RunProgress, rounds: int, first_message_round: int, run_dir: Path
                ) -> tuple[ArrayRecord, Strategy, PooledEvaluation]:
    """After cross-validation: a fresh model trained on every site's development patients for ``rounds``
    rounds (no validation split is left to evaluate on); each round checkpointed under its own number."""
    evaluation = PooledEvaluation()
    strategy = make_strategy(config, roster.minimum, evaluation)
    train_config = train_config_for(config, progress, plan, DEV)
    arrays = initial
    for r in range(1, rounds + 1):
        LOG.info("[FINAL ROUND %d/%d] on every development patient", r, rounds)
        arrays, metrics = train_round_with_retries(strategy, grid, roster, audited, first_message_round + r, arrays,
                                                   train_config, progress, config)
        if metrics is not None:
            progress.train_history[r] = dict(metrics)
        save_checkpoint(run_dir, r, arrays, config, strategy_state(strategy), vars(progress))
    return arrays, strategy, evaluation


# run-dir: "{run-id}" then the folder itself; recalibration only changes what the final report adds.
RESUME_MAY_CHANGE = {"resume", "num-server-rounds", "run-dir", "recalibration"}
#: What a checkpoint written before an option existed ran with (the behaviour before the option).
BEFORE_OPTION = {"tabular-norm": "layer", "pretrained-encoder": "", "vit-registers": 0, "cv-folds": 0,
                 "fusion-head": "mlp"}


def check_resumable(run_dir: Path, config: RunConfig) -> None:
    """Resuming needs the interrupted run's settings (only ``num-server-rounds`` may grow)."""
    saved = {**BEFORE_OPTION, **json.loads((run_dir / "checkpoints" / "run_config.json").read_text())}
    current = config.to_flwr()
    changed = sorted(k for k in set(saved) | set(current)
                     if k not in RESUME_MAY_CHANGE and saved.get(k) != current.get(k))
    if changed:
        raise ConfigError(f"run config: cannot resume {run_dir} with changed keys {changed}; "
                          f"start a new run-dir or use the saved values in {run_dir / 'checkpoints' / 'run_config.json'}")


def run_folder(config: RunConfig, run_id: str) -> Path:
    """``run-dir`` with ``{run-id}`` filled in; a new run never writes into another run's folder."""
    if "{run-id}" in config.run_dir and not run_id:
        raise ConfigError(f"run config: 'run-dir' {config.run_dir!r} needs the run's id (deployed ServerApp only)")
    folder = Path(config.run_dir.replace("{run-id}", run_id))
    if not config.resume and (folder / "checkpoints").exists():
        raise ConfigError(f"run config: {folder} holds another run's checkpoints: give a new 'run-dir', or "
                          "resume=true to continue that run")
    return folder


def recalibrated_test_figures(clinical: list[dict[str, np.ndarray]], progress: RunProgress,
                              config: RunConfig) -> dict[str, Any]:
    """The test figures recalibrated on the selected round's pooled validation score table, or why not."""
    if config.recalibration == "none":
        return {"method": "none", "error": "not computed: the run option 'recalibration' is none"}
    if progress.best_validation_scores is None:
        return {"method": config.recalibration,
                "error": f"no pooled validation score table of the selected round {progress.best_round}: its "
                         "validation returned no tables, or the run resumed from a checkpoint written before "
                         "recalibration was kept"}
    return recalibrated_clinical_figures(clinical, [score_table_arrays(progress.best_validation_scores)],
                                         config.recalibration)


def run_federated_training(grid: Any, run_config_raw: Mapping[str, Any], run_id: str = "") -> dict[str, Any]:
    """Train (or resume), evaluate and save; returns what it wrote to ``federated.json``.

    Beside it, the coordinator writes ``metrics.json`` and ``report.html`` (server/run_summary.py, the
    same report as a simulation's, without an oracle row) and logs the pooled test figures."""
    config = RunConfig.from_mapping(run_config_raw)
    run_dir = run_folder(config, run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    audited = AuditingGrid(grid, run_dir / "messages_audit.jsonl")
    expected = roster_sites(config)
    roster = Roster(expected, min_sites(config, expected))
    roster.wait(audited, config.roster_wait_s)  # identify every node; refuse unknown and duplicated site ids
    grid = ReleaseCollectingGrid(RosterGrid(audited, roster, config.reply_timeout_s))
    n_sites = len(roster.nodes)  # the sites present: the plan needs each one's fingerprint
    plan, fingerprints = agree_plan(grid, config, n_sites)  # before anything is trained: every site accepts
    atomic_write_text(run_dir / "plan.json", json.dumps({"plan": json.loads(plan.to_json()),
                                                         "fingerprints": fingerprints}, indent=2))
    model = model_from_run_config(config, len(IMAGE_CHANNELS), len(clinical_feature_names()))
    if config.pretrained_encoder:  # the sites receive these weights with round 1, like any initial model
        from hccfed.common.models.pretrain import load_pretrained_encoder

        LOG.info("encoder initialised from %s (%s)", config.pretrained_encoder,
                 load_pretrained_encoder(model, config.pretrained_encoder))
    evaluation = PooledEvaluation()
    strategy = make_strategy(config, roster.minimum, evaluation)  # sampling never waits for more sites than that
    arrays = ArrayRecord(model.state_dict())
    progress = RunProgress(run_token=uuid.uuid4().hex[:12])
    progress.node_sites.update(roster.nodes)
    start_round = 1
    checkpoint = load_checkpoint(run_dir) if config.resume else None
    if checkpoint is not None:
        check_resumable(run_dir, config)
        arrays, start_round = checkpoint["arrays"], checkpoint["round"] + 1
        restore_strategy_state(strategy, checkpoint["strategy_state"])
        progress = RunProgress(**checkpoint["progress"])
        evaluation.history = list(progress.validation_history)
        LOG.info("resuming %s after round %d", run_dir, checkpoint["round"])
    train_config = train_config_for(config, progress, plan)
    aggregator = (SecureAggregator(n_sites, reconstruction_threshold=config.secagg_reconstruction_threshold)
                  if config.secagg else None)
    if aggregator is not None and config.strategy == "fedprox":
        train_config["proximal-mu"] = config.proximal_mu  # FedProx's configure_train is bypassed
    started = time.time()
    cv: dict[str, Any] | None = None
    if config.cv_folds:
        cv = cross_validate(grid, roster, audited, config, plan, arrays, progress)
        progress.best_round = cv["selected_round"]
        progress.best_auc = cv["history"][progress.best_round - 1]["auc"]
        progress.best_validation_scores = cv["score_table"]
        progress.validation_history = list(cv["history"])
        first = config.cv_folds * config.num_server_rounds
        selected, strategy, evaluation = train_final(grid, roster, audited, config, plan, arrays, progress,
                                                     progress.best_round, first, run_dir)
        test_round = first + progress.best_round + 1
    else:
        for server_round in range(start_round, config.num_server_rounds + 1):
            LOG.info("[ROUND %d/%d]", server_round, config.num_server_rounds)
            if aggregator is not None:
                # a restarted SuperNode is identified again and rejoins
                roster.wait(audited, config.roster_wait_s)
                arrays, train_metrics = secure_train_round(aggregator, grid, server_round, arrays, train_config)
            else:
                arrays, train_metrics = train_round_with_retries(strategy, grid, roster, audited, server_round,
                                                                 arrays, train_config, progress, config)
            if train_metrics is not None:
                progress.train_history[server_round] = dict(train_metrics)
            pooled_before = len(evaluation.history)
            evaluate_round_on_sites(strategy, grid, server_round, arrays,
                                    ConfigRecord({"split": "val", "run-token": progress.run_token,
                                                  "model-round": server_round, "plan": plan.to_json()}))
            progress.validation_history = list(evaluation.history)
            # None: no tables
            validation = evaluation.last_contents if len(evaluation.history) > pooled_before else None
            progress.update_best(server_round, evaluation.history[-1].get("auc", np.nan) if evaluation.history
                                 else np.nan, validation)
            save_checkpoint(run_dir, server_round, arrays, config, strategy_state(strategy), vars(progress))
        best = load_checkpoint(run_dir, progress.best_round) if progress.best_round else None
        selected = best["arrays"] if best is not None else arrays
        test_round = config.num_server_rounds + 1
    # Final evaluation of the selected global model on every site's test split.
    roster.wait(audited, config.roster_wait_s)
    pooled_before = len(evaluation.history)
    replies = grid.send_and_receive(messages=strategy.configure_evaluate(
        test_round, selected, ConfigRecord({"split": "test", "run-token": progress.run_token,
                                            "model-round": progress.best_round, "figures": "clinical",
                                            "plan": plan.to_json()}), grid))
    strategy.aggregate_evaluate(test_round, replies)
    if len(evaluation.history) <= pooled_before:  # no site's test tables were pooled
        reasons = [reason for _, reason in filter(None, map(refusal_of, replies))]
        raise ConfigError(f"no site returned test evaluation tables ({len(replies)} replies)"
                          + (": " + "; ".join(reasons) if reasons else ""))
    test_figures = evaluation.history.pop()
    contents = evaluation.last_contents
    per_site = {site: pooled_figures([summary])
                for site, summary in zip(site_ids_of(contents), summaries_of(contents))}
    clinical = [{k: c["clinical"][k].numpy() for k in c["clinical"]} for c in contents if "clinical" in c]
    recalibrated = recalibrated_test_figures(clinical, progress, config)
    LOG.info("recalibrated test risks: %s", recalibrated.get("description", recalibrated.get("error")))
    torch.save(selected.to_torch_state_dict(), run_dir / "global_model.pt")
    out = {
        "run_config": config.to_flwr(),
        "plan": json.loads(plan.to_json()),
        "rounds": config.num_server_rounds,
        # training rounds the sites ran (cross-validation: K folds x rounds, then the final model's)
        "training_rounds": config.num_server_rounds if cv is None else test_round - 1,
        "selected_round": progress.best_round,
        "seconds": time.time() - started,
        "resumed_after_round": start_round - 1,
        "validation_history": evaluation.history if cv is None else cv["history"],
        **({"cross_validation": cv} if cv is not None else {}),
        "train_history": progress.train_history,
        "rejected_replies": progress.rejected,
        "roster": {"expected": list(roster.expected), "min_sites": roster.minimum,
                   "admitted": {str(n): s for n, s in sorted(roster.nodes.items())},
                   "refused": {str(n): s for n, s in sorted(roster.refused.items())}, "events": roster.events},
        "test": test_figures,
        "test_per_site": per_site,
        "privacy": privacy_json(grid),
        "figures": pooled_clinical_figures(clinical),
        "recalibrated": recalibrated,
    }
    atomic_write_text(run_dir / "federated.json", json.dumps(out, indent=2, default=float))
    write_coordinator_report(run_dir, out, run_id or run_dir.name)
    return out
