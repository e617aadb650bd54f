"""Checks on each site's training reply before it is aggregated.

A reply is aggregated only if it carries exactly the arrays the server sent
(same keys, shapes and dtypes), every value finite, and a finite positive
``num-examples`` weight. A bad reply is logged with its node and site and left
out; the round completes with the others (an error reply is left out the same way).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, Message

LOG = logging.getLogger("flwr")  # Flower's logger: shown in the run's log with its own lines


@dataclass(frozen=True)
class RejectedReply:
    """One training reply left out of aggregation, and why."""

    node_id: int
    site_id: str
    reason: str


def reply_site_id(msg: Message) -> str:
    """The site id a reply names (train and evaluate replies carry it), else "unknown"."""
    if msg.has_error() or "site" not in msg.content.config_records:
        return "unknown"
    return str(msg.content.config_records["site"].get("site-id", "unknown"))


def check_train_reply(msg: Message, reference: ArrayRecord, arrays_key: str = "arrays",
                      weight_key: str = "num-examples") -> str | None:
    """Why ``msg`` must not be aggregated, or None when it is sound."""
    if msg.has_error():
        return f"error reply: {msg.error.reason}"
    content = msg.content
    if arrays_key not in content.array_records or len(content.array_records) != 1:
        return f"expected one ArrayRecord '{arrays_key}', got {sorted(content.array_records)}"
    arrays = content.array_records[arrays_key]
    missing, extra = sorted(set(reference) - set(arrays)), sorted(set(arrays) - set(reference))
    if missing or extra:
        return f"wrong array keys: missing {missing[:5]}, unexpected {extra[:5]}"
    for key, expected in reference.items():
        got = arrays[key]
        if tuple(got.shape) != tuple(expected.shape) or got.dtype != expected.dtype:
            return (f"array '{key}' is {got.dtype}{list(got.shape)}, "
                    f"expected {expected.dtype}{list(expected.shape)}")
        values = got.numpy()
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            return f"array '{key}' has non-finite values"
    metrics = content.metric_records.get("metrics")
    weight = None if metrics is None else metrics.get(weight_key)
    if not isinstance(weight, (int, float)) or not np.isfinite(weight) or weight <= 0:
        return f"metric '{weight_key}' must be a finite positive number, got {weight!r}"
    return None


def validate_train_replies(replies: Iterable[Message], reference: ArrayRecord,
                           node_sites: Mapping[int, str] | None = None
                           ) -> tuple[list[Message], list[RejectedReply]]:
    """(replies to aggregate, rejected ones); each rejection is logged with node and site."""
    node_sites = node_sites or {}
    accepted, rejected = [], []
    for msg in replies:
        reason = check_train_reply(msg, reference)
        if reason is None:
            accepted.append(msg)
            continue
        node = int(msg.metadata.src_node_id)
        site = reply_site_id(msg)
        site = node_sites.get(node, site) if site == "unknown" else site
        rejected.append(RejectedReply(node, site, reason))
        LOG.warning("rejected the training reply of node %d (site %s): %s", node, site, reason)
    return accepted, rejected
