"""The federated-statistics job of the ServerApp (run-config ``job = "stats"`` or ``"stats-combat"``).

The seeds' classical models (CR / R / RCR, :mod:`server.classical_models`)
are fitted over Flower query messages to every site, then each site scores
its own test rows and sends only a clinical summary. ``stats-combat`` first
harmonises the radiomics across sites with federated ComBat. The server writes
``federated_stats.json`` (models, selected features, coefficients, pooled test
figures) and an audit of every received message under ``run-dir``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Mapping

from hccfed.common.run_config import RunConfig
from hccfed.common.stats.icc import ICC_PATIENTS_PER_SITE, PERTURBED_READER_SEED
from hccfed.server.audit import AuditingGrid
from hccfed.server.classical_models import results_json, run_classical_models
from hccfed.server.privacy_releases import ReleaseCollectingGrid, privacy_json
from hccfed.server.stats_messages import FlowerSend

LOG = logging.getLogger("flwr")
RESULTS_FILE = "federated_stats.json"
N_FOLDS = 5
#: What the sites build their rows from: radiomics with the fast parameter file when they have volumes,
#: and the perturbed-mask second reader's for the ICC filter (as the simulation's demo does).
SETUP = {"n-folds": N_FOLDS, "radiomics": "auto", "second-reader": PERTURBED_READER_SEED,
         "icc-patients": ICC_PATIENTS_PER_SITE}


def run_federated_stats(grid: Any, run_config_raw: Mapping[str, Any], run_id: str = "") -> dict[str, Any]:
    """Fit and evaluate CR / R / RCR over the grid's sites; returns what it wrote to ``federated_stats.json``."""
    config = RunConfig.from_mapping(run_config_raw)
    run_dir = Path(config.run_dir.replace("{run-id}", run_id or "stats"))
    run_dir.mkdir(parents=True, exist_ok=True)
    harmonize = config.job == "stats-combat"
    grid = ReleaseCollectingGrid(AuditingGrid(grid, run_dir / "messages_audit.jsonl"))
    send = FlowerSend(grid, SETUP, n_sites=len(config.site_configs) or None)
    LOG.info("federated statistics: CR / R / RCR over %d sites%s", len(send.node_ids),
             ", radiomics harmonised by ComBat" if harmonize else "")
    started = time.time()
    try:
        result = run_classical_models(send, N_FOLDS, harmonize)
    except RuntimeError:
        if grid.refusals:  # a site's privacy policy forbids exact statistics: the job cannot be exact without it
            (run_dir / RESULTS_FILE).write_text(json.dumps({"run_config": config.to_flwr(),
                                                            "privacy": privacy_json(grid)}, indent=2))
            LOG.error("federated statistics stopped: %s", "; ".join(r["reason"] for r in grid.refusals))
        raise
    out = {"run_config": config.to_flwr(), "harmonize": harmonize, "seconds": time.time() - started,
           "requests": send.rounds, **results_json(result), "privacy": privacy_json(grid)}
    for key, model in out["models"].items():
        LOG.info("federated statistics: %s test AUC %s, features %s", key, model["test"].get("auc"), model["features"])
    (run_dir / RESULTS_FILE).write_text(json.dumps(out, indent=2))
    return out
