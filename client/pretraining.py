"""A site's round of self-supervised pretraining: the encoder's objective (the CNN's masked autoencoder,
the ViT's DINO self-distillation) trained on its own scans.

Only the scans are read (no label, no outcome, no lab), so a hospital can pretrain on every scan it
holds, labelled or not (its training split's, and its archive's: the YAML's ``archive:`` section);
what leaves the site is the model's weights, as in a training round.
:func:`pretrain_round` is the ClientApp's handler of a ``pretrain`` job's message (server/pretrain_job.py);
the in-process protocol (simulation/pretraining.py) calls :func:`pretrain_local` with the same
:func:`pretrain_settings`, so both give the same weights.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping

import numpy as np
import torch

from hccfed.client.privacy_guard import check_training
from hccfed.client.privacy_ledger import PrivacyLedger
from hccfed.client.training import TrainSettings, _shuffled_batches, augment_batch, autocast_for, detect_device, \
    local_setup
from hccfed.common.models.pretrain import PRETRAIN_LEARNING_RATE, pretraining_model
from hccfed.common.run_config import RunConfig
from hccfed.common.schema import IMAGE_CHANNELS
from hccfed.common.seeds import derive_seed


def pretrain_local(model: torch.nn.Module, images: torch.Tensor, settings: TrainSettings,
                   device: torch.device | None = None) -> dict[str, float]:
    """``settings.epochs`` epochs of ``model``'s self-supervised loss (a model of
    :func:`hccfed.common.models.pretrain.pretraining_model`) over ``images`` (N, C, D, H, W), in place;
    masks, views and batches are drawn from ``settings.seed``. Returns {"loss": mean loss of the last
    epoch, "num-examples": N}."""
    if len(images) == 0:
        raise ValueError("no scans to pretrain on at this site")
    device, generator, optimizer = local_setup(model, settings, device)
    losses: list[float] = []
    for _ in range(settings.epochs):
        losses = []
        for idx in _shuffled_batches(len(images), settings.batch_size, generator):
            batch = augment_batch(images[idx], generator, settings).to(device)
            with autocast_for(device, settings.mixed_precision):
                loss = model.loss(batch, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.float().backward()
            optimizer.step()
            model.after_step()
            losses.append(float(loss.detach()))
    return {"loss": float(np.mean(losses)), "num-examples": float(len(images))}


def pretrain_settings(run: RunConfig, server_round: int, site_id: str,
                      learning_rate: float = PRETRAIN_LEARNING_RATE) -> TrainSettings:
    """A pretraining round's local settings at ``site_id``: the run's epochs, batch size and augmentation,
    the seed derived from the run's seed, the round and the site."""
    return TrainSettings(epochs=run.local_epochs, learning_rate=learning_rate, batch_size=run.batch_size,
                         seed=derive_seed(run.seed, server_round, site_id, "pretrain"), augment=run.augment)


def pretrain_round(site, state: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                   run_config: RunConfig) -> tuple[OrderedDict, dict[str, float]]:
    """One round of a ``pretrain`` job at this site: the received self-supervised model trained on the
    scans of the site's training split and of its archive, when its YAML has one (images only:
    :meth:`hccfed.client.site.Site.pretraining_images`); returns its weights and {"num-examples", "loss"}.

    The site's privacy policy decides first: a site that trains only under DP-SGD refuses (pretraining
    has no DP variant), and each release is written to its ledger before it leaves. The exact mean loss
    leaves only where the policy allows exact metrics (NaN otherwise); it is a loss on scans, no label.
    """
    policy = site.config.privacy
    check_training(policy, None)
    server_round = int(config.get("server-round", 0))
    model = pretraining_model(run_config, len(IMAGE_CHANNELS))
    model.load_state_dict(OrderedDict(state))
    settings = pretrain_settings(run_config, server_round, site.site_id,
                                 float(config.get("lr", PRETRAIN_LEARNING_RATE)))
    metrics = pretrain_local(model, site.pretraining_images(), settings, detect_device())
    new_state = OrderedDict((k, v.detach().cpu()) for k, v in model.state_dict().items())
    ledger, run_token = PrivacyLedger(site.config.cache_dir), str(config.get("run-token", ""))
    ledger.record(policy, run_token, server_round, "model-update (self-supervised pretraining, scans only)", "none")
    if policy.allow_nonprivate_metrics:
        ledger.record(policy, run_token, server_round, "pretraining-loss", "none")
    else:
        metrics["loss"] = float("nan")
    return new_state, metrics
