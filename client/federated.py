"""A site's part of a federated run, as plain functions of the run's :class:`~hccfed.client.site.Site`.

The ClientApp (``hccfed.client.client_app``) finds this node's Site for the run
(``hccfed.client.site.SiteCache``: built once per run, its preparation kept) and
calls :func:`train_round` / :func:`evaluate_round` with it.

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
from hccfed.client.site import Site
from hccfed.client.privacy import PrivacyBudget, PrivateTraining, epsilon_spent, noise_multiplier_for, sample_rate, \
    steps_per_epoch
from hccfed.client.privacy_guard import check_exact_release, check_training
from hccfed.client.privacy_ledger import NEIGHBOURS, PrivacyLedger
from hccfed.client.training import TrainSettings, detect_device, predict, train_local
from hccfed.common.atomic_io import atomic_write
from hccfed.common.run_config import RunConfig
from hccfed.common.seeds import derive_seed
from hccfed.common.models.fusion import model_from_run_config, norm_parameter_names
from hccfed.common.schema import IMAGE_CHANNELS, clinical_feature_names


def round_seed(seed: int, server_round: int, site_id: str) -> int:
    return derive_seed(seed, server_round, site_id, nbytes=4)


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
    def for_run(cls, site: Site, run_config: RunConfig, run_token: str) -> "SiteState":
        """The folder of this run at this site: <cache_dir>/federated/<hash of run-dir and run token>
        (the token is the server's, kept across a resumed run)."""
        key = hashlib.sha256(f"{Path(run_config.run_dir).resolve()}:{run_token}".encode()).hexdigest()[:16]
        return cls(site.config.cache_dir / "federated" / key)

    def save(self, server_round: int, norm: Mapping[str, torch.Tensor] | None, dp_steps: int) -> None:
        state = {"norm": None if norm is None else dict(norm), "dp_steps": int(dp_steps)}
        atomic_write(self.folder / f"round-{server_round:05d}.pt", lambda tmp: torch.save(state, tmp))

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


def train_round(site: Site, state: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                run_config: RunConfig) -> tuple[OrderedDict, dict[str, float]]:
    """Local training from the global weights on the site's training split (or the split the server
    names in config "train-split": a cross-validation fold's training part, or "dev"); returns new
    weights and aggregate metrics.

    With DP, a site whose budget would be exceeded by this round returns the
    received weights unchanged, with ``dp-budget-exhausted`` = 1.

    The site's privacy policy decides first (PolicyRefusal beyond it), and each
    release is written to its ledger before it leaves. In a DP run no site sends
    its exact mean training loss (the key is absent); a site whose policy forbids
    exact metrics sends NaN in its place.
    """
    server_round = int(config.get("server-round", 0))
    seed = round_seed(run_config.seed, server_round, site.site_id)
    torch.manual_seed(seed)
    data = site.split(str(config.get("train-split", "train")))
    budget = _dp_budget(run_config, site.site_id)
    policy = site.config.privacy
    check_training(policy, budget)
    needs_state = run_config.local_norm or budget is not None
    store = SiteState.for_run(site, run_config, str(config.get("run-token", ""))) if needs_state else None
    previous = store.latest(server_round - 1) if store else {"norm": None, "dp_steps": 0}
    model = model_for(run_config, _with_local_norm(state, previous["norm"] if run_config.local_norm else None))
    settings = TrainSettings(epochs=run_config.local_epochs, learning_rate=run_config.learning_rate,
                             batch_size=run_config.batch_size, seed=seed, augment=run_config.augment,
                             proximal_mu=float(config.get("proximal-mu", 0.0)),
                             positive_weight=run_config.dp_positive_weight if budget is not None else None)
    dp_steps, sigma, rate, exhausted = int(previous["dp_steps"]), 0.0, 0.0, False
    privacy = None
    if budget is not None:
        per_round = run_config.local_epochs * steps_per_epoch(len(data), run_config.batch_size)
        rate = sample_rate(len(data), run_config.batch_size)
        sigma = noise_multiplier_for(budget, len(data), run_config.batch_size, run_config.num_server_rounds * per_round)
        exhausted = dp_steps + per_round > run_config.num_server_rounds * per_round
        privacy = PrivateTraining(sigma, budget.max_grad_norm)
    if exhausted:
        metrics = {"num-examples": float(len(data))}  # a DP run: no loss key from any site
        new_state = OrderedDict((k, v.detach().cpu()) for k, v in state.items())
    else:
        metrics = train_local(model, data, settings, detect_device(), privacy)
        round_steps = int(metrics.pop("dp-steps", 0))
        dp_steps += round_steps
        new_state = OrderedDict((k, v.detach().cpu()) for k, v in model.state_dict().items())
        _record_training(site, str(config.get("run-token", "")), server_round, budget, sigma, rate, round_steps,
                         metrics, run_config)
    if store is not None:
        norm = {k: new_state[k] for k in norm_parameter_names(model)} if run_config.local_norm else None
        if exhausted and run_config.local_norm:
            norm = previous["norm"]
        store.save(server_round, norm, dp_steps)
    metrics.update(_dp_metrics(run_config, budget, sigma, rate, dp_steps, exhausted))
    return new_state, metrics


def _record_training(site: Site, run_id: str, server_round: int, budget: PrivacyBudget | None, sigma: float,
                     rate: float, steps: int, metrics: dict[str, float], run_config: RunConfig) -> None:
    """Write this round's releases to the ledger (PolicyRefusal beyond the lifetime budget) and take the
    exact loss out of ``metrics`` where it may not leave."""
    policy, ledger = site.config.privacy, PrivacyLedger(site.config.cache_dir)
    if budget is not None:
        ledger.record(policy, run_id, server_round, "model-update", "dp-sgd", delta=budget.delta,
                      guarantee=f"(epsilon, delta)-DP, {NEIGHBOURS}, DP-SGD (Opacus, RDP accountant, composed "
                                f"over this run's rounds); clipping {budget.max_grad_norm:g}",
                      rdp={"noise_multiplier": sigma, "sample_rate": rate, "steps": steps},
                      planned_run_epsilon=budget.epsilon)
    else:
        ledger.record(policy, run_id, server_round, "model-update", "none")
    if run_config.dp_epsilon > 0:
        metrics.pop("loss", None)  # a DP run: no site sends the exact loss of the patients it trained on
    elif policy.allow_nonprivate_metrics:
        ledger.record(policy, run_id, server_round, "training-loss", "none")
    else:
        metrics["loss"] = float("nan")


def evaluate_round(site: Site, state: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                   run_config: RunConfig) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Evaluate on the split the server names; counts and histograms only.

    With config "figures" = "clinical" the summary also holds the arrays of
    :func:`client.evaluation.clinical_summary`, keys prefixed ``clinical/``.

    With ``local-norm`` the site's own norm parameters of the round the model
    comes from (config "model-round", else "server-round") replace the received ones.
    """
    data = site.split(str(config.get("split", "val")))
    check_exact_release(site.config.privacy, "evaluation tables", len(data))
    if run_config.local_norm:
        store = SiteState.for_run(site, run_config, str(config.get("run-token", "")))
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
    PrivacyLedger(site.config.cache_dir).record(site.config.privacy, str(config.get("run-token", "")),
                                                int(config.get("server-round", config.get("model-round", 0))),
                                                f"evaluation-tables ({config.get('split', 'val')})", "none")
    return metrics, summary
