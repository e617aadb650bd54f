"""One federated model of a simulation: a Flower run on a local SuperLink, its test figures, and
what each site sent (bytes per round, DP-SGD epsilon spent) read from the server's message audit."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from hccfed.client.federated import model_for
from hccfed.client.site import Site
from hccfed.common.run_config import RunConfig
from hccfed.server.audit import read_audit, train_bytes_per_site
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


def bytes_sent_per_round(audit_path: Path, rounds: int) -> dict[str, float]:
    """Mean bytes each site sent in its training replies per round, from the server's audit log."""
    per_site = train_bytes_per_site(read_audit(audit_path))
    return {site: sum(values) / rounds for site, values in sorted(per_site.items())}


def dp_spent_per_site(audit_path: Path) -> dict[str, float]:
    """The last epsilon each site reported in its training replies (from the server's audit log)."""
    entries = read_audit(audit_path)
    names = {e["src_node_id"]: e["site_id"] for e in entries if e.get("site_id")}
    spent: dict[str, float] = {}
    for entry in entries:
        metrics = entry["metric_records"].get("metrics", {})
        if entry["message_type"] == "train" and "dp-epsilon" in metrics:
            spent[names.get(entry["src_node_id"], str(entry["src_node_id"]))] = float(metrics["dp-epsilon"])
    return dict(sorted(spent.items()))


def privacy_summary(models: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per federated model and site: what the site sent and the DP-SGD budget it spent (the report's
    privacy table). Read from each run's saved config and the server's audit figures."""
    runs, releases, refusals, other = {}, {}, {}, []
    for name, entry in models.items():
        if name.endswith("(federated)") and "features" in entry and "run_config" not in entry:
            other.append(name)  # the seeds' classical models: exact statistics, in this process (no Flower run)
        config = entry.get("run_config")
        if config is None or "bytes_sent_per_round" not in entry:
            continue
        run = RunConfig.from_mapping(config)
        reported = entry.get("privacy") or {}
        releases[name], refusals[name] = reported.get("releases", {}), reported.get("refusals", [])
        spent = dict(entry.get("dp_epsilon_spent_per_site", {}))
        for site, entries in releases[name].items():  # under SecAgg+ no metric is sent: the ledger's figure
            dp = [e["epsilon"] for e in entries if e["mechanism"] == "dp-sgd" and e.get("epsilon") is not None]
            if dp and site not in spent:
                spent[site] = max(dp)
        runs[name] = {
            "dp_sgd": {"target_epsilon": run.dp_epsilon, "delta": run.dp_delta, "max_grad_norm": run.dp_max_grad_norm}
            if run.dp_epsilon > 0 else None,
            "central_dp": {"noise_multiplier": run.central_dp_noise, "clipping_norm": run.central_dp_clipping_norm}
            if run.central_dp_noise > 0 else None,
            "secure_aggregation": "SecAgg+" if run.secagg else None,
            "sites": {site: {"bytes_sent_per_round": sent, "dp_sgd_epsilon_spent": spent.get(site)}
                      for site, sent in entry["bytes_sent_per_round"].items()}}
    sites = sorted({site for by_site in releases.values() for site in by_site})
    other_releases = [{"job": job, "site": site, "release": "statistics (sums, gradients, Hessians, ComBat moments, "
                       "test tables)", "mechanism": "none", "guarantee": "none: exact aggregates, computed in this "
                       "process by the simulation (no Flower message, so not in the site's ledger)"}
                      for job in other for site in sites]
    return {"runs": runs, "releases": releases, "refusals": refusals, "other_releases": other_releases,
            "evaluation_summaries": "exact tables of the distinct test predictions with their counts (no patient id, no row)"}


def federated_run(run: RunConfig, name: str, train_sites: list[Site], sets: EvaluationSets,
                  external: str | None, book: TestPredictions) -> dict[str, Any]:
    """One federated training through Flower on a local SuperLink, its figures on ``sets``, what each site
    sent per round and (under DP-SGD) the epsilon each spent. Its scores go into ``book``."""
    folder = Path(run.run_dir)
    log.info(f"{name}: {len(train_sites)} sites, {run.num_server_rounds} rounds, encoder {run.encoder}, "
         f"strategy {run.strategy}{describe_privacy(run)} (Flower simulation)")
    t0 = time.time()
    flwr_run(REPO_ROOT, run.to_flwr(), folder.parent / f".flwr-{folder.name}", num_supernodes=len(train_sites),
             log_path=folder.parent / f"flower-{folder.name}.log",
             echo=lambda line: log.info("  %s", line.split(":", 1)[-1].strip()))
    result = json.loads((folder / "federated.json").read_text())
    if not run.local_norm:  # with local norms each site tests its own variant: no single model to hold
        internal = {k: result[k] for k in ("test", "test_per_site", "figures") if k in result}
        tested = evaluate_on_test(federated_model(run), sets, name, book)
        if external is None and "figures" in result:  # the operating point at the validation threshold
            result["figures"]["threshold"] = tested["figures"]["threshold"]
        if external is not None:
            result["internal_test"] = internal
            result.update(tested)
    log.info(f"{name}: test AUC {result['test']['auc']:.3f}, C-index {result['test']['c_index']:.3f} "
         f"({time.time() - t0:.0f} s)")
    audit = folder / "messages_audit.jsonl"
    result["bytes_sent_per_round"] = bytes_sent_per_round(audit, run.num_server_rounds)
    log.info("bytes each site sends per round: " + ", ".join(
        f"{site} {n / 1e6:.3f} MB" for site, n in result["bytes_sent_per_round"].items()))
    if run.dp_epsilon > 0:
        result["dp_epsilon_spent_per_site"] = dp_spent_per_site(audit)
        log.info(f"DP-SGD at the sites (target epsilon {run.dp_epsilon}, delta {run.dp_delta}), spent: " + ", ".join(
            f"{site} {eps:.2f}" for site, eps in result["dp_epsilon_spent_per_site"].items()))
    result["train_patients"] = sum(len(s.split_indices["train"]) for s in train_sites)
    return result


def federated_model(run: RunConfig) -> torch.nn.Module:
    """The federated run's selected global model (``global_model.pt``), as a site loads it."""
    state = torch.load(Path(run.run_dir) / "global_model.pt", weights_only=True)
    return model_for(run, state)


