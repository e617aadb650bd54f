"""A site's round of self-supervised pretraining: the encoder's objective (the CNN's masked autoencoder,
the ViT's DINO self-distillation) trained on its own scans.

Only the scans are read (no label, no outcome, no lab), so a hospital can pretrain on every scan it
holds, labelled or not; what leaves the site is the model's weights, as in a training round.
"""

from __future__ import annotations

import numpy as np
import torch

from hccfed.client.training import TrainSettings, _shuffled_batches, augment_batch, autocast_for, local_setup


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
