"""`hccfed pretrain`: federated self-supervised pretraining of an image encoder on the hospitals' scans.

Each round, every site trains the encoder's self-supervised model (:mod:`hccfed.common.models.pretrain`:
the CNN's masked autoencoder, the ViT's DINO self-distillation with register tokens) from the
global weights on its own scans (:func:`hccfed.client.pretraining.pretrain_local`: images only) and the
weights are averaged, weighted by each site's number of scans (FedAvg), as a training round is. This
module runs the protocol in one process over the sites' Site objects (each site's scans are read only
by its own local step), as the benchmark does; over Flower the ServerApp's ``pretrain`` job runs the same
protocol (server/pretrain_job.py; here :func:`flower_pretraining`, ``hccfed pretrain --flower``) and, from
the same scans, writes the same weights. The encoder's weights go to a file that the
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

from hccfed.client.pretraining import pretrain_local, pretrain_settings
from hccfed.client.site import Site
from hccfed.common.models.pretrain import PRETRAIN_LEARNING_RATE, encoder_meta, pretraining_model, save_encoder, \
    weighted_average
from hccfed.common.run_config import RunConfig
from hccfed.common.schema import IMAGE_CHANNELS

log = logging.getLogger("hccfed.pretrain")


def federated_pretraining(site_images: dict[str, torch.Tensor], run: RunConfig, rounds: int, out: Path,
                          learning_rate: float = PRETRAIN_LEARNING_RATE) -> dict[str, Any]:
    """``rounds`` FedAvg rounds of ``run.encoder``'s self-supervised objective over {site id: its scans
    (N, C, D, H, W)}, averaged in the order of the site ids; writes the encoder's weights to ``out``
    ({"encoder": state, "meta": {...}}) and returns the history."""
    model = pretraining_model(run, len(IMAGE_CHANNELS))
    state = OrderedDict((k, v.detach().clone()) for k, v in model.state_dict().items())
    history = []
    started = time.time()
    for server_round in range(1, rounds + 1):
        states, weights, losses = [], [], {}
        for site_id in sorted(site_images):
            model.load_state_dict(state)
            metrics = pretrain_local(model, site_images[site_id],
                                     pretrain_settings(run, server_round, site_id, learning_rate))
            states.append(OrderedDict((k, v.detach().cpu().clone()) for k, v in model.state_dict().items()))
            weights.append(metrics["num-examples"])
            losses[site_id] = metrics["loss"]
        state = weighted_average(states, weights)
        history.append({"round": server_round, "loss": losses})
        log.info("%s pretraining round %d/%d: loss %s", run.encoder, server_round, rounds,
                 ", ".join(f"{s} {v:.4f}" for s, v in losses.items()))
    model.load_state_dict(state)
    meta = encoder_meta(run, rounds, {s: len(x) for s, x in site_images.items()}, time.time() - started)
    save_encoder(model, meta, out)
    return {**meta, "history": history, "path": str(out)}


def pretraining_scans(sites: list[Site]) -> dict[str, torch.Tensor]:
    """Each hospital's scans for pretraining: its training split's, then its archive's
    (:meth:`hccfed.client.site.Site.pretraining_images`, as its ClientApp reads them)."""
    return {s.site_id: s.pretraining_images() for s in sites}


def flower_pretraining(settings, rounds: int, out: Path | None = None, archive: int = 0) -> dict[str, Any]:
    """`hccfed pretrain --flower`: the synthetic hospitals (made when missing; with ``archive`` > 0 each
    with an archive of that many unlabelled scans, named in its YAML), then the ServerApp's ``pretrain``
    job of ``rounds`` rounds on a local simulation SuperLink, one SuperNode per hospital, as a deployment
    runs it; returns the job's ``pretrain.json`` (with "path": its encoder file, copied to ``out`` when
    given). The folder is ``<runs>/<run-id>`` (default ``pretrain-flower-<time>``), with ``flower.log``."""
    import json
    import shutil
    from dataclasses import replace
    from datetime import datetime

    from hccfed.server.pretrain_job import ENCODER_FILE, RESULTS_FILE, check_pretrain_config
    from hccfed.simulation.flower_runner import flwr_run
    from hccfed.simulation.settings import REPO_ROOT, synthetic_archives, effective_site_configs, ensure_cohort

    run_dir = (settings.runs_dir / (settings.run_id or f"pretrain-flower-{datetime.now():%Y%m%d-%H%M%S}")).resolve()
    ensure_cohort(settings)
    yamls = effective_site_configs(settings, run_dir, synthetic_archives(settings, archive) if archive else None)
    run = replace(settings.run, job="pretrain", num_server_rounds=int(rounds),
                  site_configs=tuple(str(Path(p).resolve()) for p in yamls), run_dir=str(run_dir / "job"))
    check_pretrain_config(run)
    log.info("%s pretraining over Flower: %d sites, %d rounds (log: %s)", run.encoder, len(yamls), rounds,
             run_dir / "flower.log")
    flwr_run(REPO_ROOT, run.to_flwr(), run_dir / ".flwr", num_supernodes=len(yamls), log_path=run_dir / "flower.log",
             echo=lambda line: log.info("  %s", line.split(":", 1)[-1].strip()))
    results = run_dir / "job" / RESULTS_FILE
    if not results.exists():  # `flwr run` can exit 0 when the ServerApp raised
        lines = (run_dir / "flower.log").read_text(errors="replace").splitlines()
        reason = next((line for line in reversed(lines) if "Error" in line or "error" in line), "no error line")
        raise RuntimeError(f"the pretrain job wrote no {RESULTS_FILE}: {reason.strip()} (see {run_dir / 'flower.log'})")
    result = json.loads(results.read_text())
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_dir / "job" / ENCODER_FILE, out)
        result["path"] = str(out)
    return result


def pretrain_demo(settings, rounds: int, archive: int = 0, out: Path | None = None, flower: bool = False
                  ) -> dict[str, Any]:
    """`hccfed pretrain`: the synthetic hospitals (made when missing) and, with ``archive`` > 0, each
    hospital's archive of that many unlabelled scans (named in its YAML's ``archive:`` section, as a
    real site names its own); federated pretraining of ``rounds`` rounds; the encoder file (default
    ``<runs>/pretrain/encoder.pt``) for ``--pretrained-encoder``. With ``flower`` the ServerApp's
    pretrain job over Flower instead (:func:`flower_pretraining`), on the same scans."""
    if flower:
        return flower_pretraining(settings, rounds, out, archive)
    from hccfed.simulation.settings import synthetic_archives, effective_site_configs, ensure_cohort
    from hccfed.simulation.simulate import plan_sites

    run_dir = settings.runs_dir / (settings.run_id or "pretrain")
    ensure_cohort(settings)
    sites = plan_sites(settings, effective_site_configs(settings, run_dir,
                                                        synthetic_archives(settings, archive) if archive else None))
    return federated_pretraining(pretraining_scans(sites), settings.run, rounds, out or run_dir / "encoder.pt")
