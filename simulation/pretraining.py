"""`hccfed pretrain`: federated self-supervised pretraining of an image encoder on the hospitals' scans.

Each round, every site trains the encoder's self-supervised model (:mod:`hccfed.common.models.pretrain`:
the CNN's masked autoencoder, the ViT's DINO self-distillation with register tokens) from the
global weights on its own scans (:func:`hccfed.client.pretraining.pretrain_local`: images only) and the
weights are averaged, weighted by each site's number of scans (FedAvg), as a training round is. This
module runs the protocol in one process over the sites' Site objects (each site's scans are read only
by its own local step); over Flower it is not wired yet. The encoder's weights go to a file that the
fusion model starts from (run option ``pretrained-encoder``: ``hccfed simulate --pretrained-encoder F``).
Which scans: each hospital's training split, plus its unlabelled archive when the cohort has one.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from hccfed.client.pretraining import pretrain_local
from hccfed.client.site import Site
from hccfed.client.training import TrainSettings
from hccfed.common.models.pretrain import PRETRAINING_OBJECTIVES, pretraining_model
from hccfed.common.run_config import RunConfig
from hccfed.common.schema import IMAGE_CHANNELS
from hccfed.common.seeds import derive_seed

log = logging.getLogger("hccfed.pretrain")


def weighted_average(states: list[OrderedDict], weights: list[float]) -> OrderedDict:
    """FedAvg of state dicts: each entry the weighted mean of the sites' entries."""
    total = float(sum(weights))
    return OrderedDict((k, sum(s[k].double() * (w / total) for s, w in zip(states, weights)).to(states[0][k].dtype))
                       for k in states[0])


def federated_pretraining(site_images: dict[str, torch.Tensor], run: RunConfig, rounds: int, out: Path,
                          learning_rate: float = 1e-3) -> dict[str, Any]:
    """``rounds`` FedAvg rounds of ``run.encoder``'s self-supervised objective over {site id: its scans
    (N, C, D, H, W)}; writes the encoder's weights to ``out`` ({"encoder": state, "meta": {...}}) and
    returns the history."""
    model = pretraining_model(run, len(IMAGE_CHANNELS))
    state = OrderedDict((k, v.detach().clone()) for k, v in model.state_dict().items())
    history = []
    started = time.time()
    for server_round in range(1, rounds + 1):
        states, weights, losses = [], [], {}
        for site_id, images in site_images.items():
            model.load_state_dict(state)
            settings = TrainSettings(epochs=run.local_epochs, learning_rate=learning_rate, batch_size=run.batch_size,
                                     seed=derive_seed(run.seed, server_round, site_id, "pretrain"),
                                     augment=run.augment)
            metrics = pretrain_local(model, images, settings)
            states.append(OrderedDict((k, v.detach().cpu().clone()) for k, v in model.state_dict().items()))
            weights.append(metrics["num-examples"])
            losses[site_id] = metrics["loss"]
        state = weighted_average(states, weights)
        history.append({"round": server_round, "loss": losses})
        log.info("%s pretraining round %d/%d: loss %s", run.encoder, server_round, rounds,
                 ", ".join(f"{s} {v:.4f}" for s, v in losses.items()))
    model.load_state_dict(state)
    meta = {"encoder": run.encoder, "width": run.encoder_width, "objective": PRETRAINING_OBJECTIVES[run.encoder],
            **({"vit_patch_size": run.vit_patch_size, "vit_depth": run.vit_depth, "vit_heads": run.vit_heads,
                "vit_registers": run.vit_registers} if run.encoder == "vit" else {}),
            "rounds": rounds, "seed": run.seed, "scans": {s: int(len(x)) for s, x in site_images.items()},
            "seconds": time.time() - started}
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"encoder": model.pretrained_encoder().state_dict(), "meta": meta}, out)
    return {**meta, "history": history, "path": str(out)}


def pretraining_scans(sites: list[Site], archives: list[Site] = ()) -> dict[str, torch.Tensor]:
    """Each hospital's scans for pretraining: its training split, and every scan of its archive."""
    from hccfed.client.site_data import ALL

    scans = {s.site_id: s.split("train").images for s in sites}
    for archive in archives:
        scans[archive.site_id] = torch.cat([scans[archive.site_id], archive.split(ALL).images])
    return scans


def pretrain_demo(settings, rounds: int, archive: int = 0, out: Path | None = None) -> dict[str, Any]:
    """`hccfed pretrain`: the synthetic hospitals (made when missing) and, with ``archive`` > 0, each
    hospital's archive of that many unlabelled scans; federated pretraining of ``rounds`` rounds; the
    encoder file (default ``<runs>/pretrain/encoder.pt``) for ``--pretrained-encoder``."""
    from hccfed.simulation.settings import effective_site_configs, ensure_cohort, extension_sites
    from hccfed.simulation.simulate import plan_sites

    run_dir = settings.runs_dir / (settings.run_id or "pretrain")
    ensure_cohort(settings)
    sites = plan_sites(settings, effective_site_configs(settings, run_dir))
    archives = extension_sites(settings, "archive", archive, sites[0].plan) if archive else []
    return federated_pretraining(pretraining_scans(sites, archives), settings.run, rounds,
                                 out or run_dir / "encoder.pt")
