"""What the coordinator learns of each site's privacy ledger and refusals, from the sites' replies.

Each site enforces its own privacy policy and keeps its ledger (client side);
every reply carries its ledger entries for the run (record
:data:`~hccfed.common.privacy_policy.LEDGER_RECORD`), and a refused request
comes back as a Flower error of code :data:`~hccfed.common.privacy_policy.REFUSAL_CODE`
whose reason names the site and the rule. :class:`ReleaseCollectingGrid` wraps
the run's Grid (as ``server.audit.AuditingGrid`` does), logs every refusal with
the site's name, and keeps both, so the run's JSON and the report's privacy
section list every release of every site with its guarantee (:func:`privacy_json`).
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Iterable

from flwr.app import Message

from hccfed.common.privacy_policy import LEDGER_RECORD, REFUSAL_CODE

LOG = logging.getLogger("flwr")
_SITE = re.compile(r"^site (\S+) refuses: ")
_RAISED = re.compile(r"PolicyRefusal: (site (\S+) refuses: [^\n]*)")  # in the traceback of a ClientApp error


def refusal_of(msg: Message) -> tuple[str, str] | None:
    """(site id, reason) of a privacy refusal reply, else None: a reply of code REFUSAL_CODE, or (inside a
    SecAgg+ round, where the site can only fail) a ClientApp error raised by the site's PolicyRefusal."""
    if not msg.has_error():
        return None
    reason = str(msg.error.reason)
    if msg.error.code != REFUSAL_CODE and "PolicyRefusal" not in reason:
        return None
    raised = _RAISED.search(reason)
    if raised:
        return raised.group(2), raised.group(1).strip()
    match = _SITE.match(reason)
    return (match.group(1) if match else f"node {msg.metadata.src_node_id}"), reason


class ReleaseCollectingGrid:
    """Delegates to a Grid; keeps each site's ledger entries per run and every refusal."""

    def __init__(self, grid: Any):
        self._grid = grid
        self.ledgers: dict[str, dict[str, list[dict[str, Any]]]] = {}
        self.refusals: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def _collect(self, replies: Iterable[Message]) -> list[Message]:
        replies = list(replies)
        for msg in replies:
            refused = refusal_of(msg)
            if refused is not None:
                site, reason = refused
                LOG.warning("%s (message type %s); the run goes on without this reply", reason,
                            msg.metadata.message_type)
                self.refusals.append({"site_id": site, "message_type": msg.metadata.message_type,
                                      "group_id": msg.metadata.group_id, "reason": reason})
                continue
            if msg.has_error() or LEDGER_RECORD not in msg.content.config_records:
                continue
            record = msg.content.config_records[LEDGER_RECORD]
            site = str(msg.content["site"]["site-id"]) if "site" in msg.content.config_records else \
                f"node {msg.metadata.src_node_id}"
            self.ledgers.setdefault(site, {})[str(record["run-id"])] = json.loads(str(record["entries"]))
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return self._collect(self._grid.send_and_receive(messages, timeout=timeout))

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return self._collect(self._grid.pull_messages(message_ids))


def privacy_json(grid: ReleaseCollectingGrid) -> dict[str, Any]:
    """{"releases": {site: [entry, ...]}, "refusals": [...]}: what the sites reported of their ledgers."""
    releases = {site: [entry for run in runs.values() for entry in run] for site, runs in sorted(grid.ledgers.items())}
    return {"releases": releases, "refusals": list(grid.refusals)}
