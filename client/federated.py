"""A site's part of a federated run, as plain functions of typed values.

Which site this node is: a deployed SuperNode names its YAML with
``--node-config "site-config=/path/site.yaml"``; in a local simulation the node
with ``partition-id`` i serves the i-th entry of the run's ``site-configs``.

What a site keeps between rounds (``SiteState``, files under its own
``cache_dir``, never sent): with ``local-norm`` its own GroupNorm / LayerNorm
parameters (FedBN: the averaged ones it receives are replaced by its own), and
with DP the number of DP-SGD steps taken so far (its privacy spending). One
file per round, so a resumed run reads exactly what the interrupted one had.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from hccfed.client.evaluation import CLINICAL_PREFIX, clinical_summary, evaluation_summary
from hccfed.client.prepare import PreparedSite, prepare_site
from hccfed.client.site_data import site_split
from hccfed.client.site_radiomics import attach_radiomics
from hccfed.client.privacy import PrivacyBudget, PrivateTraining, epsilon_spent, noise_multiplier_for, sample_rate, \
    steps_per_epoch
from hccfed.client.training import TrainSettings, detect_device, predict, train_local
from hccfed.common.errors import ConfigError
from hccfed.common.run_config import RunConfig
from hccfed.common.site_config import load_site_config
from hccfed.common.models.fusion import model_from_run_config, norm_parameter_names
from hccfed.common.schema import IMAGE_CHANNELS, clinical_feature_names


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


def site_id_of(run_config: RunConfig, node_config: Mapping[str, Any]) -> str:
    """The id of the site this node serves (from its YAML)."""
    return load_site_config(site_config_path(run_config, node_config)).site_id


def load_site(run_config: RunConfig, node_config: Mapping[str, Any]) -> PreparedSite:
    """This node's prepared data (from the cache when `hccfed prepare` already ran), with the
    radiomics the run's model takes (cached extraction, standardised at the site)."""
    config = load_site_config(site_config_path(run_config, node_config))
    site = prepare_site(config, progress=False)
    return attach_radiomics(site, config, run_config.radiomics_features, run_config.radiomics_params)


def round_seed(seed: int, server_round: int, site_id: str) -> int:
    digest = hashlib.sha256(f"{seed}:{server_round}:{site_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def model_for(run_config: RunConfig, state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    model = model_from_run_config(run_config, len(IMAGE_CHANNELS), len(clinical_feature_names()))
    model.load_state_dict(OrderedDict(state))
    return model


class SiteState:
    """What one site keeps between the rounds of one run: a file per round under ``folder``.

    Each file holds {"norm": {name: tensor} or None, "dp_steps": int}. ``latest(r)``
    is the newest file of a round <= r (empty before the first).
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    @classmethod
    def for_run(cls, run_config: RunConfig, node_config: Mapping[str, Any], run_token: str) -> "SiteState":
        """The folder of this run at this site: <cache_dir>/federated/<hash of run-dir and run token>."""
        site_config = load_site_config(site_config_path(run_config, node_config))
        key = hashlib.sha256(f"{Path(run_config.run_dir).resolve()}:{run_token}".encode()).hexdigest()[:16]
        return cls(site_config.cache_dir / "federated" / key)

    def save(self, server_round: int, norm: Mapping[str, torch.Tensor] | None, dp_steps: int) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"round-{server_round:05d}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save({"norm": None if norm is None else dict(norm), "dp_steps": int(dp_steps)}, tmp)
        tmp.replace(path)

    def latest(self, server_round: int) -> dict[str, Any]:
        rounds = sorted(int(p.stem.split("-")[1]) for p in self.folder.glob("round-*.pt")) if self.folder.exists() else []
        rounds = [r for r in rounds if r <= server_round]
        if not rounds:
            return {"norm": None, "dp_steps": 0}
        return torch.load(self.folder / f"round-{rounds[-1]:05d}.pt", weights_only=True)


def _with_local_norm(state: Mapping[str, torch.Tensor], local: Mapping[str, torch.Tensor] | None) -> OrderedDict:
    merged = OrderedDict(state)
    if local:
        merged.update(local)
    return merged


def _dp_budget(run_config: RunConfig, site_id: str) -> PrivacyBudget | None:
    if run_config.dp_epsilon <= 0 or (run_config.dp_sites and site_id not in run_config.dp_sites):
        return None
    return PrivacyBudget(run_config.dp_epsilon, run_config.dp_delta, run_config.dp_max_grad_norm)


def _dp_metrics(run_config: RunConfig, budget: PrivacyBudget | None, sigma: float, rate: float, steps: int,
                exhausted: bool) -> dict[str, float]:
    """The same keys from every site of a DP run (Flower requires it); epsilon is inf without DP."""
    if run_config.dp_epsilon <= 0:
        return {}
    spent = epsilon_spent(sigma, rate, steps, budget.delta) if budget else math.inf
    return {"dp-epsilon": spent, "dp-delta": budget.delta if budget else 0.0,
            "dp-budget-exhausted": float(exhausted)}


def train_round(state: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                run_config_raw: Mapping[str, Any], node_config: Mapping[str, Any]
                ) -> tuple[OrderedDict, dict[str, float]]:
    """Local training from the global weights; returns new weights and aggregate metrics.

    With DP, a site whose budget would be exceeded by this round returns the
    received weights unchanged, with ``dp-budget-exhausted`` = 1.
    """
    run_config = RunConfig.from_mapping(run_config_raw)
    site = load_site(run_config, node_config)
    server_round = int(config.get("server-round", 0))
    seed = round_seed(run_config.seed, server_round, site.site_id)
    torch.manual_seed(seed)
    data = site_split(site, "train", run_config.seed)
    budget = _dp_budget(run_config, site.site_id)
    needs_state = run_config.local_norm or budget is not None
    store = SiteState.for_run(run_config, node_config, str(config.get("run-token", ""))) if needs_state else None
    previous = store.latest(server_round - 1) if store else {"norm": None, "dp_steps": 0}
    model = model_for(run_config, _with_local_norm(state, previous["norm"] if run_config.local_norm else None))
    settings = TrainSettings(epochs=run_config.local_epochs, learning_rate=run_config.learning_rate,
                             batch_size=run_config.batch_size, seed=seed, augment=run_config.augment,
                             proximal_mu=float(config.get("proximal-mu", 0.0)))
    dp_steps, sigma, rate, exhausted = int(previous["dp_steps"]), 0.0, 0.0, False
    privacy = None
    if budget is not None:
        per_round = run_config.local_epochs * steps_per_epoch(len(data), run_config.batch_size)
        rate = sample_rate(len(data), run_config.batch_size)
        sigma = noise_multiplier_for(budget, len(data), run_config.batch_size, run_config.num_server_rounds * per_round)
        exhausted = dp_steps + per_round > run_config.num_server_rounds * per_round
        privacy = PrivateTraining(sigma, budget.max_grad_norm)
    if exhausted:
        metrics = {"loss": float("nan"), "num-examples": float(len(data))}
        new_state = OrderedDict((k, v.detach().cpu()) for k, v in state.items())
    else:
        metrics = train_local(model, data, settings, detect_device(), privacy)
        dp_steps += int(metrics.pop("dp-steps", 0))
        new_state = OrderedDict((k, v.detach().cpu()) for k, v in model.state_dict().items())
    if store is not None:
        norm = {k: new_state[k] for k in norm_parameter_names(model)} if run_config.local_norm else None
        if exhausted and run_config.local_norm:
            norm = previous["norm"]
        store.save(server_round, norm, dp_steps)
    metrics.update(_dp_metrics(run_config, budget, sigma, rate, dp_steps, exhausted))
    return new_state, metrics


def evaluate_round(state: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                   run_config_raw: Mapping[str, Any], node_config: Mapping[str, Any]
                   ) -> tuple[dict[str, float], dict[str, np.ndarray], str]:
    """Evaluate on the split the server names; counts and histograms only.

    With config "figures" = "clinical" the summary also holds the arrays of
    :func:`client.evaluation.clinical_summary`, keys prefixed ``clinical/``.

    With ``local-norm`` the site's own norm parameters of the round the model
    comes from (config "model-round", else "server-round") replace the received ones.
    """
    run_config = RunConfig.from_mapping(run_config_raw)
    site = load_site(run_config, node_config)
    split = str(config.get("split", "val"))
    data = site_split(site, split, run_config.seed)
    if run_config.local_norm:
        store = SiteState.for_run(run_config, node_config, str(config.get("run-token", "")))
        model_round = int(config.get("model-round", config.get("server-round", 0)))
        state = _with_local_norm(state, store.latest(model_round)["norm"])
    logits, log_risk = predict(model_for(run_config, state), data, detect_device())
    labels = data.labels.numpy()
    summary = evaluation_summary(logits, log_risk, labels, data.times.numpy(), data.events.numpy())
    if config.get("figures") == "clinical":  # the final test evaluation: every clinical figure
        clinical = clinical_summary(logits, log_risk, labels, data.times.numpy(), data.events.numpy())
        summary.update({f"{CLINICAL_PREFIX}{k}": v for k, v in clinical.items()})
    metrics = {
        "num-examples": float(len(data)),
        "num-positive": float((labels == 1).sum()),
        "num-negative": float((labels == 0).sum()),
        "num-events": float(data.events.sum()),
    }
    return metrics, summary, site.site_id
