"""One federated training run as the coordinator sees it.

FedAvg (Flower's ``flwr.serverapp.strategy.FedAvg``) weighted by each site's
number of training patients; after every round the sites evaluate the global
model on their validation split and the server pools their histograms into an
AUC and C-index; the round with the best pooled validation AUC is kept and,
after the last round, evaluated on the sites' test splits. The server
writes the global model, the figures and an audit of every received message
under the run's ``run-dir``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from common.config import RunConfig
from common.models.fusion import build_model
from common.schema import IMAGE_CHANNELS, clinical_feature_names
from server.audit import AuditingGrid
from server.federated_eval import SUMMARY_KEYS, pooled_figures


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


class BestRoundFedAvg(FedAvg):
    """FedAvg that remembers the global model of the round with the best pooled validation AUC.

    Each round's aggregate is evaluated by the sites on their validation
    splits; the model that is finally tested is the best one so far (the
    earliest on ties), i.e. early stopping on a federated validation figure.
    """

    def __init__(self, evaluation: PooledEvaluation, **kwargs: Any):
        super().__init__(evaluate_metrics_aggr_fn=evaluation, **kwargs)
        self.evaluation = evaluation
        self.latest_arrays: ArrayRecord | None = None
        self.best_arrays: ArrayRecord | None = None
        self.best_round = 0
        self.best_auc = -np.inf

    def aggregate_train(self, server_round: int, replies: Any) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            self.latest_arrays = arrays
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Any) -> MetricRecord | None:
        metrics = super().aggregate_evaluate(server_round, replies)
        auc = self.evaluation.history[-1].get("auc", np.nan) if self.evaluation.history else np.nan
        if self.latest_arrays is not None and (self.best_arrays is None or auc > self.best_auc):
            self.best_arrays, self.best_round = self.latest_arrays, server_round
            self.best_auc = auc if np.isfinite(auc) else self.best_auc
        return metrics


def run_federated_training(grid: Any, run_config_raw: Mapping[str, Any]) -> dict[str, Any]:
    """Train, evaluate and save; returns what it wrote to ``federated.json``."""
    config = RunConfig.from_mapping(run_config_raw)
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    grid = AuditingGrid(grid, run_dir / "messages_audit.jsonl")
    n_sites = max(1, len(config.site_configs))
    model = build_model(config.encoder, len(IMAGE_CHANNELS), len(clinical_feature_names()),
                        width=config.encoder_width, seed=config.seed)
    evaluation = PooledEvaluation()
    strategy = BestRoundFedAvg(evaluation, fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=n_sites,
                               min_evaluate_nodes=n_sites, min_available_nodes=n_sites)
    started = time.time()
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()),
                            num_rounds=config.num_server_rounds,
                            train_config=ConfigRecord({"lr": config.learning_rate}),
                            evaluate_config=ConfigRecord({"split": "val"}))
    arrays = strategy.best_arrays if strategy.best_arrays is not None else result.arrays
    # Final evaluation of the selected global model on every site's test split.
    replies = grid.send_and_receive(
        messages=strategy.configure_evaluate(config.num_server_rounds + 1, arrays,
                                             ConfigRecord({"split": "test"}), grid))
    FedAvg.aggregate_evaluate(strategy, config.num_server_rounds + 1, replies)
    test_figures = evaluation.history.pop()
    contents = evaluation.last_contents
    per_site = {site: pooled_figures([summary])
                for site, summary in zip(site_ids_of(contents), summaries_of(contents))}
    torch.save(arrays.to_torch_state_dict(), run_dir / "global_model.pt")
    train_history = {int(r): dict(m) for r, m in result.train_metrics_clientapp.items()}
    out = {
        "run_config": config.to_flwr(),
        "rounds": config.num_server_rounds,
        "selected_round": strategy.best_round,
        "seconds": time.time() - started,
        "validation_history": evaluation.history,
        "train_history": train_history,
        "test": test_figures,
        "test_per_site": per_site,
    }
    (run_dir / "federated.json").write_text(json.dumps(out, indent=2, default=float))
    return out
