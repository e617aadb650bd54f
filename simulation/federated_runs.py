"""One federated model of a simulation: a Flower run on a local SuperLink, its test figures, and
what each site sent (bytes per round, DP-SGD epsilon spent), read from the server's message audit
(server/run_summary.py, which the deployed ServerApp uses too)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from hccfed.client.federated import model_for
from hccfed.client.site import Site
from hccfed.client.site_data import split_rows
from hccfed.common.run_config import RunConfig
from hccfed.common.splits import fitted_split
from hccfed.server.federated_eval import score_table_arrays
from hccfed.server.run_summary import bytes_sent_per_round, dp_spent_per_site
from hccfed.simulation.evaluation import EvaluationSets, TestPredictions, evaluate_on_test
from hccfed.simulation.flower_runner import flwr_run
from hccfed.simulation.settings import REPO_ROOT

log = logging.getLogger("hccfed.simulate")


def describe_privacy(run: RunConfig) -> str:
    parts = []
    if run.dp_epsilon > 0:
        parts.append(f"DP-SGD (epsilon {run.dp_epsilon}, delta {run.dp_delta})")
    if run.central_dp_noise > 0:
        parts.append(f"central DP (noise {run.central_dp_noise})")
    if run.secagg:
        parts.append("SecAgg+")
    return (", " + ", ".join(parts)) if parts else ""


def federated_run(run: RunConfig, name: str, train_sites: list[Site], sets: EvaluationSets,
                  external: str | None, book: TestPredictions) -> dict[str, Any]:
    """One federated training through Flower on a local SuperLink, its figures on ``sets``, what each site
    sent per round and (under DP-SGD) the epsilon each spent. Its scores go into ``book``.

    ``external``: None when ``sets`` are the training hospitals' test splits (the run's own test figures
    stand); otherwise what ``sets`` are (a held-out hospital, held-out cohorts): their figures replace
    the run's, which are kept as ``internal_test``."""
    folder = Path(run.run_dir)
    log.info(f"{name}: {len(train_sites)} sites, {run.num_server_rounds} rounds, encoder {run.encoder}, "
         f"strategy {run.strategy}{describe_privacy(run)} (Flower simulation)")
    t0 = time.time()
    flwr_run(REPO_ROOT, run.to_flwr(), folder.parent / f".flwr-{folder.name}", num_supernodes=len(train_sites),
             log_path=folder.parent / f"flower-{folder.name}.log",
             echo=lambda line: log.info("  %s", line.split(":", 1)[-1].strip()))
    result = json.loads((folder / "federated.json").read_text())
    if not run.local_norm:  # with local norms each site tests its own variant: no single model to hold
        internal = {k: result[k] for k in ("test", "test_per_site", "figures", "recalibrated") if k in result}
        cv = result.get("cross_validation")
        tested = evaluate_on_test(federated_model(run), sets, name, book, run.recalibration,
                                  None if cv is None else [score_table_arrays(cv["score_table"])])
        if external is None and "figures" in result:  # the operating point at the validation threshold
            result["figures"]["threshold"] = tested["figures"]["threshold"]
        if external is not None:
            result["internal_test"] = internal
            result.update(tested)
    log.info(f"{name}: test AUC {result['test']['auc']:.3f}, C-index {result['test']['c_index']:.3f} "
         f"({time.time() - t0:.0f} s)")
    audit = folder / "messages_audit.jsonl"
    result["bytes_sent_per_round"] = bytes_sent_per_round(audit, int(result.get("training_rounds",
                                                                               run.num_server_rounds)))
    log.info("bytes each site sends per round: " + ", ".join(
        f"{site} {n / 1e6:.3f} MB" for site, n in result["bytes_sent_per_round"].items()))
    if run.dp_epsilon > 0:
        result["dp_epsilon_spent_per_site"] = dp_spent_per_site(audit)
        log.info(f"DP-SGD at the sites (target epsilon {run.dp_epsilon}, delta {run.dp_delta}), spent: " + ", ".join(
            f"{site} {eps:.2f}" for site, eps in result["dp_epsilon_spent_per_site"].items()))
    result["train_patients"] = sum(len(split_rows(s.rows, fitted_split(run.cv_folds), s.seed)) for s in train_sites)
    return result


def federated_model(run: RunConfig) -> torch.nn.Module:
    """The federated run's selected global model (``global_model.pt``), as a site loads it."""
    state = torch.load(Path(run.run_dir) / "global_model.pt", weights_only=True)
    return model_for(run, state)


