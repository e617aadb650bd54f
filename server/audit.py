"""A record of everything that reaches the server, for the data-protection officer.

``AuditingGrid`` wraps Flower's Grid and writes, for every reply a site sends,
its message type, sender, and the structure of its content: each record's
keys, each array's dtype, shape and size in bytes (``nbytes``, and the
message's total ``array_nbytes``) and each metric's name. The log lets anyone
check what left a hospital without reading weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from flwr.app import Message


def describe_message(msg: Message) -> dict[str, Any]:
    """Structure of one received message (no values of arrays)."""
    entry: dict[str, Any] = {
        "message_type": msg.metadata.message_type,
        "src_node_id": msg.metadata.src_node_id,
        "has_error": msg.has_error(),
        "array_records": {},
        "metric_records": {},
        "config_records": {},
        "array_nbytes": 0,
    }
    if msg.has_error():
        entry["error"] = msg.error.reason
        return entry
    content = msg.content
    for name, record in content.array_records.items():
        entry["array_records"][name] = {
            key: {"dtype": array.dtype, "shape": list(array.shape), "nbytes": _nbytes(array)}
            for key, array in record.items()
        }
        entry["array_nbytes"] += sum(v["nbytes"] for v in entry["array_records"][name].values())
    for name, record in content.metric_records.items():
        entry["metric_records"][name] = dict(record)
    for name, record in content.config_records.items():
        entry["config_records"][name] = sorted(record)
    # Bytes inside config records (SecAgg+ sends its masked vectors and key shares there).
    entry["config_nbytes"] = sum(len(v) if isinstance(v, bytes) else sum(len(x) for x in v if isinstance(x, bytes))
                                 for record in content.config_records.values() for v in record.values()
                                 if isinstance(v, (bytes, list)))
    if "site" in content.config_records and "site-id" in content.config_records["site"]:
        entry["site_id"] = str(content.config_records["site"]["site-id"])
    return entry


def _nbytes(array: Any) -> int:
    """Bytes of the array's values (as numpy's nbytes), from its dtype and shape."""
    return int(np.prod(array.shape, dtype=np.int64)) * np.dtype(array.dtype).itemsize


class AuditingGrid:
    """Delegates to a Grid and appends one JSON line per received message."""

    def __init__(self, grid: Any, log_path: Path):
        self._grid = grid
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def _record(self, replies: Iterable[Message]) -> list[Message]:
        replies = list(replies)
        with self.log_path.open("a") as log:
            for msg in replies:
                log.write(json.dumps(describe_message(msg), default=str) + "\n")
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return self._record(self._grid.send_and_receive(messages, timeout=timeout))

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return self._record(self._grid.pull_messages(message_ids))


def read_audit(log_path: Path) -> list[dict[str, Any]]:
    """The audit log as a list of entries."""
    return [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]


def train_bytes_per_site(entries: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Bytes each site sent in its training replies (arrays + bytes in config records), per reply.

    Sites are named by the ``site-id`` of their replies (else by node id). With
    plain aggregation a site sends one train reply per round it trained; a
    SecAgg+ round takes four (one per protocol stage).
    """
    names: dict[Any, str] = {}
    for entry in entries:
        site = entry.get("site_id")
        if site:
            names[entry["src_node_id"]] = site
    out: dict[str, list[int]] = {}
    for entry in entries:
        if entry["message_type"] == "train" and not entry["has_error"]:
            name = names.get(entry["src_node_id"], f"node-{entry['src_node_id']}")
            out.setdefault(name, []).append(int(entry.get("array_nbytes", 0)) + int(entry.get("config_nbytes", 0)))
    return out
