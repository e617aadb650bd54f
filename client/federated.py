"""A site's part of a federated run, as plain functions of typed values.

Which site this node is: a deployed SuperNode names its YAML with
``--node-config "site-config=/path/site.yaml"``; in a local simulation the node
with ``partition-id`` i serves the i-th entry of the run's ``site-configs``.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any, Mapping

import numpy as np
import torch

from client.evaluation import evaluation_summary
from client.prepare import PreparedSite, prepare_site
from client.site_data import site_split
from client.training import TrainSettings, detect_device, predict, train_local
from common.config import ConfigError, RunConfig, load_site_config
from common.models.fusion import build_model
from common.schema import IMAGE_CHANNELS, clinical_feature_names


def site_config_path(run_config: RunConfig, node_config: Mapping[str, Any]) -> str:
    """The YAML this node serves (see the module docstring)."""
    if "site-config" in node_config:
        return str(node_config["site-config"])
    if "partition-id" not in node_config:
        raise ConfigError("node config: set 'site-config' to this hospital's YAML")
    index = int(node_config["partition-id"])
    if index >= len(run_config.site_configs):
        raise ConfigError(
            f"run config: 'site-configs' lists {len(run_config.site_configs)} sites, "
            f"but this is simulated node {index}"
        )
    return run_config.site_configs[index]


def load_site(run_config: RunConfig, node_config: Mapping[str, Any]) -> PreparedSite:
    """This node's prepared data (from the cache when `hccfed prepare` already ran)."""
    return prepare_site(load_site_config(site_config_path(run_config, node_config)), progress=False)


def round_seed(seed: int, server_round: int, site_id: str) -> int:
    digest = hashlib.sha256(f"{seed}:{server_round}:{site_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def model_for(run_config: RunConfig, state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    model = build_model(run_config.encoder, len(IMAGE_CHANNELS), len(clinical_feature_names()),
                        width=run_config.encoder_width, seed=run_config.seed)
    model.load_state_dict(OrderedDict(state))
    return model


def train_round(state: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                run_config_raw: Mapping[str, Any], node_config: Mapping[str, Any]
                ) -> tuple[OrderedDict, dict[str, float]]:
    """Local training from the global weights; returns new weights and aggregate metrics."""
    run_config = RunConfig.from_mapping(run_config_raw)
    site = load_site(run_config, node_config)
    server_round = int(config.get("server-round", 0))
    torch.manual_seed(round_seed(run_config.seed, server_round, site.site_id))
    model = model_for(run_config, state)
    settings = TrainSettings(epochs=run_config.local_epochs, learning_rate=run_config.learning_rate,
                             batch_size=run_config.batch_size,
                             seed=round_seed(run_config.seed, server_round, site.site_id))
    metrics = train_local(model, site_split(site, "train", run_config.seed), settings, detect_device())
    return OrderedDict((k, v.detach().cpu()) for k, v in model.state_dict().items()), metrics


def evaluate_round(state: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                   run_config_raw: Mapping[str, Any], node_config: Mapping[str, Any]
                   ) -> tuple[dict[str, float], dict[str, np.ndarray], str]:
    """Evaluate on the split the server names; counts and histograms only."""
    run_config = RunConfig.from_mapping(run_config_raw)
    site = load_site(run_config, node_config)
    split = str(config.get("split", "val"))
    data = site_split(site, split, run_config.seed)
    logits, log_risk = predict(model_for(run_config, state), data, detect_device())
    labels = data.labels.numpy()
    summary = evaluation_summary(logits, log_risk, labels, data.times.numpy(), data.events.numpy())
    metrics = {
        "num-examples": float(len(data)),
        "num-positive": float((labels == 1).sum()),
        "num-negative": float((labels == 0).sum()),
        "num-events": float(data.events.sum()),
    }
    return metrics, summary, site.site_id
