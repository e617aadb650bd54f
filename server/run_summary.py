"""What a federated run's coordinator summarises for its report, from the run's own files.

Used by the deployed ServerApp (server/training_run.py writes ``metrics.json`` and
``report.html`` beside ``federated.json``) and by the simulation, so that both
reports are built by the same code: the bytes each site sent per round and the
DP-SGD epsilon each reported (from the message audit), the privacy section (from
the ledger entries the sites' replies carried), and the metrics dict that
server/report.py renders, with an oracle row only where one exists (a simulation).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hccfed.common.run_config import RunConfig
from hccfed.server.audit import read_audit, train_bytes_per_site

LOG = logging.getLogger("flwr")


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


def coordinator_metrics(result: dict[str, Any], run_id: str) -> dict[str, Any]:
    """The metrics dict of a deployed run (server/report.py's input): the federated model only, no oracle."""
    sites = sorted(result.get("test_per_site", {}))
    return {
        "run_id": run_id,
        "seconds": result.get("seconds"),
        "evaluation": {"kind": "internal", "description": f"the test split of each of the {len(sites)} sites "
                       f"({', '.join(sites)}), pooled from their summary tables"},
        "plan": result.get("plan"),
        "sites": {},
        "models": {"federated": result},
        "paired_delong": {"status": "not computed: a deployed run trains one model"},
        "privacy": privacy_summary({"federated": result}),
    }


def write_coordinator_report(run_dir: Path, result: dict[str, Any], run_id: str) -> Path:
    """``metrics.json`` and ``report.html`` / ``report.md`` of a deployed run in ``run_dir``; logs the pooled
    figures (so that ``flwr run --stream`` shows them). Returns the HTML path."""
    from hccfed.server.report import write_report  # matplotlib and the plots: only once the run is over

    audit = run_dir / "messages_audit.jsonl"
    rounds = max(1, int(result.get("training_rounds") or result.get("rounds") or 1))
    result = {**result, "bytes_sent_per_round": bytes_sent_per_round(audit, rounds)}
    config = RunConfig.from_mapping(result["run_config"])
    if config.dp_epsilon > 0:
        result["dp_epsilon_spent_per_site"] = dp_spent_per_site(audit)
    metrics = coordinator_metrics(result, run_id)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    report = write_report(metrics, run_dir)
    test = result.get("test", {})
    LOG.info("pooled test figures of the selected global model (round %s): AUC %.3f (95%% CI %.3f-%.3f), "
             "C-index %.3f, %d patients", result.get("selected_round"), test.get("auc", float("nan")),
             test.get("auc_ci_lower", float("nan")), test.get("auc_ci_upper", float("nan")),
             test.get("c_index", float("nan")), int(test.get("n_patients", 0)))
    for site, figures in sorted(result.get("test_per_site", {}).items()):
        LOG.info("  %s: AUC %.3f, C-index %.3f", site, figures.get("auc", float("nan")),
                 figures.get("c_index", float("nan")))
    LOG.info("report: %s", report.resolve())
    return report
