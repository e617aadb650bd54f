"""A record of everything that reaches the server, for the data-protection officer.

``AuditingGrid`` wraps Flower's Grid and writes, for every reply a site sends,
its message type, sender, and the structure of its content: each record's
keys, each array's dtype and shape and each metric's name. The log lets anyone
check what left a hospital without reading weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

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
    }
    if msg.has_error():
        entry["error"] = msg.error.reason
        return entry
    content = msg.content
    for name, record in content.array_records.items():
        entry["array_records"][name] = {
            key: {"dtype": array.dtype, "shape": list(array.shape)} for key, array in record.items()
        }
    for name, record in content.metric_records.items():
        entry["metric_records"][name] = dict(record)
    for name, record in content.config_records.items():
        entry["config_records"][name] = sorted(record)
    return entry


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
