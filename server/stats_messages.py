"""Federated-statistics requests over Flower: ``send(request) -> [reply per site]`` on a Grid.

Each request becomes one ``query`` message per node: its arrays in the
``arrays`` ArrayRecord, its other fields in the ``config`` ConfigRecord
(:mod:`common.record_codec`), plus a ``setup`` ConfigRecord the sites build
their rows from (number of CV folds, radiomics parameters). Every reply is
checked: an error, a missing or malformed reply, or two replies from one site
stop the run with a message naming the site. Replies come back ordered by
site id so sums are added in a fixed order.

Replies are collected with ``push_messages`` / ``pull_messages`` and short
waits rather than ``Grid.send_and_receive``: the latter sleeps 3 s between
pulls, and a fit takes hundreds of rounds of statistics.
"""

from __future__ import annotations

import time
from typing import Any, Mapping

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from hccfed.common.record_codec import flatten, unflatten

MESSAGE_TYPE = "query"


def request_content(request: Mapping[str, Any], setup: Mapping[str, Any]) -> RecordDict:
    arrays, config = flatten(request)
    return RecordDict({"arrays": ArrayRecord(array_dict={k: Array(v) for k, v in arrays.items()}),
                       "config": ConfigRecord(config), "setup": ConfigRecord(dict(setup))})


def reply_of(msg: Message) -> dict[str, Any]:
    """The decoded reply of one message (``site_id`` included)."""
    content = msg.content
    return unflatten({k: v.numpy() for k, v in content["arrays"].items()}, dict(content["config"]))


class FlowerSend:
    """``send`` over a Flower Grid (wrap it in ``server.audit.AuditingGrid`` to log every reply).

    ``n_sites``: wait (up to ``wait_nodes_s``) until that many nodes are connected.
    """

    def __init__(self, grid: Any, setup: Mapping[str, Any], n_sites: int | None = None,
                 timeout_s: float = 900.0, wait_nodes_s: float = 120.0):
        self.grid, self.setup, self.timeout_s = grid, dict(setup), timeout_s
        self.node_ids = self._nodes(n_sites, wait_nodes_s)
        self.site_of: dict[int, str] = {}
        self.rounds = 0

    def _nodes(self, n_sites: int | None, wait_s: float) -> list[int]:
        deadline = time.time() + wait_s
        while True:
            nodes = sorted(int(n) for n in self.grid.get_node_ids())
            if nodes and (n_sites is None or len(nodes) >= n_sites):
                return nodes
            if time.time() > deadline:
                raise RuntimeError(f"federated statistics: {len(nodes)} site(s) connected after {wait_s:.0f} s, "
                                   f"expected {n_sites}")
            time.sleep(0.5)

    def _name(self, node_id: int) -> str:
        return f"site {self.site_of[node_id]} (node {node_id})" if node_id in self.site_of else f"node {node_id}"

    def __call__(self, request: dict) -> list[dict]:
        self.rounds += 1
        op = request.get("op")
        messages = [Message(content=request_content(request, self.setup), dst_node_id=node,
                            message_type=MESSAGE_TYPE, group_id=f"stats-{self.rounds}") for node in self.node_ids]
        pending = {mid: node for mid, node in zip(self.grid.push_messages(messages), self.node_ids)}
        received: list[Message] = []
        deadline, wait = time.time() + self.timeout_s, 0.002
        while pending:
            for msg in self.grid.pull_messages(list(pending)):
                pending.pop(msg.metadata.reply_to_message_id, None)
                received.append(msg)
            if pending:
                if time.time() > deadline:
                    raise RuntimeError(f"federated statistics: no reply to request {op!r} from "
                                       f"{', '.join(self._name(n) for n in pending.values())} in {self.timeout_s:.0f} s")
                time.sleep(wait)
                wait = min(wait * 1.5, 0.02)
        return self._check(received, op)

    def _check(self, received: list[Message], op: Any) -> list[dict]:
        replies: dict[str, dict] = {}
        for msg in received:
            node = int(msg.metadata.src_node_id)
            if msg.has_error():
                raise RuntimeError(f"federated statistics: {self._name(node)} failed on request {op!r}: "
                                   f"{msg.error.reason}")
            content = msg.content
            if "arrays" not in content or "config" not in content or "site" not in content:
                raise RuntimeError(f"federated statistics: {self._name(node)} sent a reply to {op!r} without "
                                   "its 'arrays', 'config' and 'site' records")
            site = str(content["site"]["site-id"])
            reply = reply_of(msg)
            if reply.get("site_id") != site:
                raise RuntimeError(f"federated statistics: site {site} (node {node}) answered {op!r} with "
                                   f"site_id {reply.get('site_id')!r}")
            if self.site_of.setdefault(node, site) != site or site in replies:
                raise RuntimeError(f"federated statistics: two nodes answer for site {site} (request {op!r})")
            replies[site] = reply
        return [replies[site] for site in sorted(replies)]
