"""The ServerApp's ``pretrain`` job: federated self-supervised pretraining of the image encoder.

Run config ``job = "pretrain"``: the roster and the federation plan as in a training run (every site
prepares its crops alike, so the encoder fits the fine-tuning run that uses the same plan options),
then ``num-server-rounds`` rounds in which every site trains the encoder's self-supervised model (the
CNN's masked autoencoder, the ViT's DINO self-distillation, :mod:`hccfed.common.models.pretrain`) from
the global weights on the scans of its training split (client/pretraining.py: images only, no label)
and the server averages the replies weighted by each site's number of scans, in the order of the site
ids (:func:`~hccfed.common.models.pretrain.weighted_average`, the in-process protocol's function). The
replies are checked as a training round's are (server/update_validation.py), a round needs the
roster's ``min-sites`` and is retried as a training round is.

What leaves a site: the self-supervised model's weights and its number of scans, and its mean loss on
them where its policy allows exact metrics; a site whose policy requires DP-SGD refuses (pretraining has
no DP variant) and a run that asks for DP, SecAgg+, cross-validation or resume is refused before it
starts. The server writes under ``run-dir``: ``encoder.pt`` (the file ``pretrained-encoder`` reads),
``pretrain.json`` (the description, the loss per round and site, the roster and the sites' ledger
entries), ``plan.json`` and ``messages_audit.jsonl``.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

from hccfed.common.atomic_io import atomic_write_text
from hccfed.common.errors import ConfigError
from hccfed.common.models.pretrain import PRETRAIN_LEARNING_RATE, encoder_meta, pretraining_model, save_encoder, \
    weighted_average
from hccfed.common.run_config import RunConfig
from hccfed.common.schema import IMAGE_CHANNELS
from hccfed.server.audit import AuditingGrid
from hccfed.server.plan_step import agree_plan
from hccfed.server.privacy_releases import ReleaseCollectingGrid, privacy_json
from hccfed.server.roster import Roster, RosterGrid, min_sites, roster_sites
from hccfed.server.training_run import RunProgress, run_folder, train_round_with_retries
from hccfed.server.update_validation import reply_site_id

LOG = logging.getLogger("flwr")  # Flower's logger: shown in the run's log with its own lines
ENCODER_FILE, RESULTS_FILE = "encoder.pt", "pretrain.json"


class ScanWeightedAverage(FedAvg):
    """FedAvg over every site (no sampling), averaged by :func:`weighted_average` in the order of the
    replies it is given (train_one_round sorts them by site id); keeps each site's loss of the round."""

    def __init__(self, minimum: int) -> None:
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=minimum,
                         min_evaluate_nodes=minimum, min_available_nodes=minimum)
        self.losses: dict[str, float] = {}
        self.scans: dict[str, int] = {}

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if not replies:
            return None, None
        metrics = [r.content["metrics"] for r in replies]
        weights = [float(m["num-examples"]) for m in metrics]
        state = weighted_average([r.content["arrays"].to_torch_state_dict() for r in replies], weights)
        sites = [reply_site_id(r) for r in replies]
        self.losses = {s: float(m.get("loss", float("nan"))) for s, m in zip(sites, metrics)}
        self.scans = {s: int(w) for s, w in zip(sites, weights)}
        losses = [v for v in self.losses.values() if np.isfinite(v)]
        mean = float(np.average(losses, weights=[self.scans[s] for s, v in self.losses.items() if np.isfinite(v)])
                     ) if losses else float("nan")
        return ArrayRecord(state), MetricRecord({"num-examples": float(sum(weights)), "loss": mean})


def check_pretrain_config(config: RunConfig) -> None:
    """What a pretraining job does not do, refused before any site is asked."""
    if config.encoder not in ("cnn", "vit"):
        raise ConfigError(f"run config: job 'pretrain' pretrains the cnn (masked autoencoder) or vit (DINO) "
                          f"encoder, got encoder {config.encoder!r}")
    unsupported = {"dp-epsilon": config.dp_epsilon > 0, "central-dp-noise": config.central_dp_noise > 0,
                   "secagg": config.secagg, "cv-folds": config.cv_folds > 0, "resume": config.resume,
                   "strategy": config.strategy != "fedavg", "fraction-train": config.fraction_train < 1,
                   "pretrained-encoder": bool(config.pretrained_encoder)}
    asked = sorted(k for k, v in unsupported.items() if v)
    if asked:
        raise ConfigError(f"run config: job 'pretrain' is plain FedAvg over every site, without DP, SecAgg+, "
                          f"cross-validation, resume or a starting encoder; remove {asked}")


def pretrain_folder(config: RunConfig, run_id: str) -> Path:
    """``run-dir`` with ``{run-id}`` filled in (as a training run's); refused when it holds an encoder already."""
    folder = run_folder(config, run_id)
    if (folder / ENCODER_FILE).exists():
        raise ConfigError(f"run config: {folder} holds another pretraining's {ENCODER_FILE}: give a new 'run-dir'")
    return folder


def run_federated_pretraining(grid: Any, run_config_raw: Mapping[str, Any], run_id: str = "") -> dict[str, Any]:
    """Pretrain over the sites for ``num-server-rounds`` rounds; returns what it wrote to ``pretrain.json``."""
    config = RunConfig.from_mapping(run_config_raw)
    check_pretrain_config(config)
    run_dir = pretrain_folder(config, run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    audited = AuditingGrid(grid, run_dir / "messages_audit.jsonl")
    expected = roster_sites(config)
    roster = Roster(expected, min_sites(config, expected))
    roster.wait(audited, config.roster_wait_s)
    grid = ReleaseCollectingGrid(RosterGrid(audited, roster, config.reply_timeout_s))
    plan, fingerprints = agree_plan(grid, config, len(roster.nodes))
    atomic_write_text(run_dir / "plan.json", json.dumps({"plan": json.loads(plan.to_json()),
                                                         "fingerprints": fingerprints}, indent=2))
    model = pretraining_model(config, len(IMAGE_CHANNELS))
    arrays = ArrayRecord(model.state_dict())
    strategy = ScanWeightedAverage(roster.minimum)
    progress = RunProgress(run_token=uuid.uuid4().hex[:12])
    progress.node_sites.update(roster.nodes)
    train_config = ConfigRecord({"task": "pretrain", "lr": PRETRAIN_LEARNING_RATE, "run-token": progress.run_token,
                                 "plan": plan.to_json()})
    history: list[dict[str, Any]] = []
    scans: dict[str, int] = {}
    started = time.time()
    for server_round in range(1, config.num_server_rounds + 1):
        LOG.info("[PRETRAIN ROUND %d/%d] %s, %s", server_round, config.num_server_rounds, config.encoder,
                 "masked autoencoder" if config.encoder == "cnn" else "DINO")
        strategy.losses = {}
        arrays, _ = train_round_with_retries(strategy, grid, roster, audited, server_round, arrays, train_config,
                                             progress, config)
        history.append({"round": server_round, "loss": dict(strategy.losses)})
        scans.update(strategy.scans)
        LOG.info("pretraining round %d: loss %s", server_round,
                 ", ".join(f"{s} {v:.4f}" for s, v in sorted(strategy.losses.items())) or "no sound reply")
    model.load_state_dict(arrays.to_torch_state_dict())
    meta = {**encoder_meta(config, config.num_server_rounds, dict(sorted(scans.items())), time.time() - started),
            "plan": json.loads(plan.to_json())}
    save_encoder(model, meta, run_dir / ENCODER_FILE)
    out = {**meta, "history": history, "path": str(run_dir / ENCODER_FILE), "rejected_replies": progress.rejected,
           "roster": {"expected": list(roster.expected), "min_sites": roster.minimum,
                      "admitted": {str(n): s for n, s in sorted(roster.nodes.items())},
                      "refused": {str(n): s for n, s in sorted(roster.refused.items())}, "events": roster.events},
           "privacy": privacy_json(grid)}
    atomic_write_text(run_dir / RESULTS_FILE, json.dumps(out, indent=2, default=float))
    LOG.info("pretrained %s encoder written to %s (fine-tune with pretrained-encoder = that file)", config.encoder,
             run_dir / ENCODER_FILE)
    return out
