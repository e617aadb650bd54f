"""The first step of a federated run: the sites' fingerprints, the plan, and each site's answer to it.

Two query messages per site (record ``plan-request``): ``fingerprint`` (each site replies with its
aggregate fingerprint, ``hccfed.client.fingerprint``) and ``check`` (each site replies whether it can
prepare by the plan, with its reasons when not). Nothing is trained until every site has accepted;
a site that refuses stops the run here with its reasons, named by site.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict

from hccfed.common.plan import PLAN_RECORD, FederationPlan, PlanError, derive_plan
from hccfed.common.run_config import RunConfig

LOG = logging.getLogger("flwr")
QUERY = "query"


def wait_for_nodes(grid: Any, n_nodes: int, wait_s: float = 300.0) -> list[int]:
    """The connected node ids, once ``n_nodes`` are there (a clear error after ``wait_s``)."""
    deadline = time.time() + wait_s
    while True:
        nodes = sorted(int(n) for n in grid.get_node_ids())
        if len(nodes) >= n_nodes:
            return nodes
        if time.time() > deadline:
            raise PlanError(f"{len(nodes)} site(s) connected after {wait_s:.0f} s, the run expects {n_nodes}")
        time.sleep(1.0)


def _ask(grid: Any, nodes: list[int], step: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{site_id: reply record} of one plan step; a failed or doubled site stops the run."""
    messages = [Message(content=RecordDict({PLAN_RECORD: ConfigRecord(step)}), dst_node_id=node,
                        message_type=QUERY, group_id=f"plan-{step['step']}") for node in nodes]
    replies: dict[str, dict[str, Any]] = {}
    for msg in grid.send_and_receive(messages):
        node = int(msg.metadata.src_node_id)
        if msg.has_error():
            raise PlanError(f"node {node} failed at the plan's {step['step']} step: {msg.error.reason}")
        site = str(msg.content["site"]["site-id"])
        if site in replies:
            raise PlanError(f"two nodes answer for site {site} at the plan's {step['step']} step")
        replies[site] = dict(msg.content[PLAN_RECORD])
    return replies


def agree_plan(grid: Any, run: RunConfig, n_sites: int) -> tuple[FederationPlan, dict[str, dict[str, Any]]]:
    """The plan every site accepted, and the fingerprints it came from ({site_id: fingerprint})."""
    nodes = wait_for_nodes(grid, n_sites)
    fingerprints = {site: json.loads(r["fingerprint"]) for site, r in _ask(grid, nodes, {"step": "fingerprint"}).items()}
    plan = derive_plan(fingerprints, run)
    LOG.info("federation plan: %g mm voxels, %d-voxel crop (%.0f mm), %s normalisation, %g mm ring",
             plan.spacing_mm, plan.crop_voxels, plan.crop_mm, plan.normalisation, plan.ring_mm)
    for note in plan.notes:
        LOG.info("  plan: %s", note)
    answers = _ask(grid, nodes, {"step": "check", "plan": plan.to_json()})
    refusals = {site: json.loads(a["problems"]) for site, a in sorted(answers.items()) if not a["accepted"]}
    if refusals:
        raise PlanError("sites refuse the federation plan, nothing was trained: " + "; ".join(
            f"{site}: {' / '.join(problems)}" for site, problems in refusals.items()))
    return plan, fingerprints
