"""The run's roster: which nodes serve which expected site, asked before anything else.

At the start of a run the server sends every connected node a light *identify* query (answered by
the ClientApp from its site YAML alone, nothing prepared). A node serving a site id outside the
roster, or a second node claiming a site id already present, is refused (logged with both node ids
and the site id) and gets no further message: :class:`RosterGrid` lists only the admitted nodes to
the strategies. The server waits, bounded by ``roster-wait-s``, for every site of the roster; it goes
on with fewer only when ``min-sites`` of them are present. A node that answers under a new node id
(a restarted SuperNode) is identified again by :meth:`Roster.refresh` and rejoins.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml
from flwr.app import ConfigRecord, Message, RecordDict

from hccfed.common.errors import ConfigError
from hccfed.common.run_config import RunConfig

LOG = logging.getLogger("flwr")
IDENTIFY_RECORD = "identify"
IDENTIFY_TIMEOUT_S = 60.0
POLL_S = 1.0


def roster_sites(config: RunConfig) -> tuple[str, ...]:
    """The expected site ids: ``sites``, or (simulation) the ``site_id`` of each ``site-configs`` YAML."""
    if config.sites:
        if len(set(config.sites)) != len(config.sites):
            raise ConfigError(f"run config: 'sites' lists a site id twice: {list(config.sites)}")
        return config.sites
    ids = []
    for path in config.site_configs:
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"run config: 'sites' is empty and site YAML {path} cannot be read ({exc}); "
                              "name the expected site ids in 'sites'") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("site_id"), str):
            raise ConfigError(f"{path}: key 'site_id' missing; name the expected site ids in 'sites'")
        ids.append(raw["site_id"])
    if len(set(ids)) != len(ids):
        raise ConfigError(f"run config: 'site-configs' serve a site id twice: {ids}")
    return tuple(ids)


def min_sites(config: RunConfig, expected: tuple[str, ...]) -> int:
    if config.min_sites > len(expected):
        raise ConfigError(f"run config: 'min-sites' is {config.min_sites} but the roster has {len(expected)} "
                          f"sites {list(expected)}")
    return config.min_sites or len(expected)


@dataclass
class Roster:
    """Admitted node id -> site id; refused node ids (never messaged again)."""

    expected: tuple[str, ...]
    minimum: int
    nodes: dict[int, str] = field(default_factory=dict)
    refused: dict[int, str] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)

    def site_of(self, node_id: int) -> str:
        return self.nodes.get(int(node_id), "unknown")

    def present(self) -> set[str]:
        return set(self.nodes.values())

    def missing(self) -> list[str]:
        return [s for s in self.expected if s not in self.present()]

    def admit(self, node_id: int, site_id: str | None, live: set[int]) -> None:
        """Admit or refuse one answering node; a site whose earlier node is gone is taken over."""
        if site_id is None:
            return
        if site_id not in self.expected:
            self._refuse(node_id, site_id, f"serves site id {site_id!r}, not in the roster {list(self.expected)}")
            return
        holder = next((n for n, s in self.nodes.items() if s == site_id), None)
        if holder is not None and holder != node_id:
            if holder in live:
                self._refuse(node_id, site_id, f"claims site id {site_id!r}, already served by node {holder}")
                return
            LOG.info("roster: site %s returns as node %d (was node %d)", site_id, node_id, holder)
            del self.nodes[holder]
        if self.nodes.get(node_id) != site_id:
            LOG.info("roster: node %d admitted as site %s", node_id, site_id)
            self.events.append({"event": "admitted", "node_id": node_id, "site_id": site_id})
        self.nodes[node_id] = site_id

    def _refuse(self, node_id: int, site_id: str, why: str) -> None:
        LOG.warning("roster: node %d refused: %s", node_id, why)
        self.refused[node_id] = site_id
        self.events.append({"event": "refused", "node_id": node_id, "site_id": site_id, "reason": why})

    def refresh(self, grid: Any) -> None:
        """Identify every connected node not yet known (new or restarted), drop the nodes that are gone."""
        live = {int(n) for n in grid.get_node_ids()}
        for gone in [n for n in self.nodes if n not in live]:
            LOG.warning("roster: site %s (node %d) is disconnected", self.nodes.pop(gone), gone)
        unknown = sorted(live - set(self.nodes) - set(self.refused))
        for node_id, site_id in identify(grid, unknown).items():
            self.admit(node_id, site_id, live)

    def wait(self, grid: Any, wait_s: float, need: int | None = None) -> None:
        """Refresh until every roster site is present, or ``wait_s`` has passed; then at least ``need``
        (default: ``min-sites``) must be, else a ConfigError names the missing sites."""
        need = self.minimum if need is None else need
        deadline = time.monotonic() + wait_s
        while True:
            self.refresh(grid)
            if not self.missing() or time.monotonic() >= deadline:
                break
            time.sleep(POLL_S)
        if self.missing():
            LOG.warning("roster: sites %s not connected after %.0f s", self.missing(), wait_s)
        if len(self.present()) < need:
            raise ConfigError(f"roster: {len(self.present())} of the {len(self.expected)} sites connected "
                              f"({sorted(self.present())}); at least {need} needed (min-sites); missing "
                              f"{self.missing()}")


def identify(grid: Any, node_ids: Iterable[int]) -> dict[int, str | None]:
    """Ask each node its site id; a node that does not answer (or answers with an error) maps to None."""
    node_ids = list(node_ids)
    if not node_ids:
        return {}
    messages = [Message(content=RecordDict({IDENTIFY_RECORD: ConfigRecord({"ask": "site-id"})}),
                        message_type="query", dst_node_id=n) for n in node_ids]
    answers: dict[int, str | None] = {n: None for n in node_ids}
    for reply in grid.send_and_receive(messages, timeout=IDENTIFY_TIMEOUT_S):
        node = int(reply.metadata.src_node_id)
        if reply.has_error():
            LOG.warning("roster: node %d could not identify itself: %s", node, reply.error.reason)
        elif IDENTIFY_RECORD in reply.content and "site-id" in reply.content[IDENTIFY_RECORD]:
            answers[node] = str(reply.content[IDENTIFY_RECORD]["site-id"])
    return answers


class RosterGrid:
    """The Grid the run uses: lists only the roster's admitted nodes, bounds every wait for replies."""

    def __init__(self, inner: Any, roster: Roster, timeout_s: float) -> None:
        self._inner, self.roster, self.timeout_s = inner, roster, timeout_s

    def get_node_ids(self) -> list[int]:
        return sorted(self.roster.nodes)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        messages = [m for m in messages if int(m.metadata.dst_node_id) not in self.roster.refused]
        replies = list(self._inner.send_and_receive(messages, timeout=self.timeout_s if timeout is None else timeout))
        return name_the_node(messages, replies, self.roster)


def name_the_node(messages: list[Message], replies: list[Message], roster: Roster) -> list[Message]:
    """An error reply the SuperLink writes for an unavailable node comes from the SuperLink itself; it is
    re-addressed from the node the message went to, so that the log and the audit name that site. A message
    that got no reply at all (the reply timeout) is logged by site."""
    destination = {m.metadata.__dict__.get("_message_id"): int(m.metadata.dst_node_id) for m in messages}
    answered = set()
    for reply in replies:
        node = destination.get(reply.metadata.reply_to_message_id)
        if node is None:
            continue
        answered.add(node)
        if int(reply.metadata.src_node_id) != node:
            reply.metadata.__dict__["_src_node_id"] = node
            if reply.has_error():
                LOG.warning("site %s (node %d) did not answer: %s", roster.site_of(node), node, reply.error.reason)
    for node in sorted(set(destination.values()) - answered):
        LOG.warning("site %s (node %d) sent no reply within the reply timeout", roster.site_of(node), node)
    return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
