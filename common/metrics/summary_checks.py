"""Integrity checks of site summaries before pooling: declared totals, minimum cell size, duplicates.

The tables themselves are checked by :func:`common.metrics.summaries.check_summary`
(finite ascending values, non-negative integer counts, events <= patients).
Here: the totals a site declares must be what its tables add up to; a site
below a minimum cell size is refused, so that no single patient's score,
time and event can be read back from its summary (default 10 patients, and
5 per class for the AUC figures); and the same content under two site ids
is refused. Every error names the site (or file) and the field.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from hccfed.common.metrics.summaries import table_groups

__all__ = ["MinimumCells", "NO_MINIMUM", "summary_totals", "check_totals", "check_minimum",
           "content_fingerprint", "refuse_duplicates"]


@dataclass(frozen=True)
class MinimumCells:
    """The smallest site a summary may describe: ``patients`` in all, ``per_class`` positives and negatives."""

    patients: int = 10
    per_class: int = 5

    def __post_init__(self) -> None:
        for name in ("patients", "per_class"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"minimum {name} must be a non-negative integer, got {value!r}")


#: No minimum: for synthetic cohorts, whose patients nobody can be re-identified from.
NO_MINIMUM = MinimumCells(0, 0)


def summary_totals(m: dict) -> dict[str, int]:
    """What the tables of one model summary add up to: patients, events, positives, negatives."""
    groups = table_groups(m)
    out = {}
    if "cidx" in groups:
        out["patients"] = int(np.sum(m["cidx_all"]))
        out["events"] = int(np.sum(m["cidx_event"]))
    prefix = "auc" if "auc" in groups else "prob" if "prob" in groups else None
    if prefix:
        out["positives"] = int(np.sum(m[f"{prefix}_pos"]))
        out["negatives"] = int(np.sum(m[f"{prefix}_neg"]))
    return out


def check_totals(m: dict, declared: dict, where: str) -> None:
    """The declared totals equal the tables' sums; events and labelled patients do not exceed patients."""
    counted = summary_totals(m)
    for key, value in declared.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{where}: declared '{key}' must be a non-negative integer, got {value!r}")
        if key in counted and counted[key] != value:
            raise ValueError(f"{where}: declares {value} {key} but its tables add up to {counted[key]}")
    if "patients" in counted and "positives" in counted:
        labelled = counted["positives"] + counted["negatives"]
        if labelled > counted["patients"]:
            raise ValueError(f"{where}: {labelled} patients with a label but only {counted['patients']} patients")


def check_minimum(m: dict, minimum: MinimumCells, where: str) -> None:
    """Refuse a summary of fewer patients (or of fewer per class) than ``minimum``."""
    counted = summary_totals(m)
    n = counted.get("patients", counted.get("positives", 0) + counted.get("negatives", 0))
    if n < minimum.patients:
        raise ValueError(f"{where}: {n} patients, below the minimum cell size of {minimum.patients} "
                         "(a summary of so few patients gives their scores, times and events away)")
    for cls in ("positives", "negatives"):
        if cls in counted and counted[cls] < minimum.per_class:
            raise ValueError(f"{where}: {counted[cls]} {cls}, below the minimum of {minimum.per_class} per class "
                             "for AUC figures")


def content_fingerprint(models: dict[str, dict]) -> str:
    """SHA-256 of every table of every model (sorted names): equal for equal content."""
    h = hashlib.sha256()
    for name in sorted(models):
        h.update(name.encode() + b"\0")
        for key in sorted(models[name]):
            a = np.asarray(models[name][key])
            h.update(key.encode() + b"\0" + str(a.dtype).encode() + np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def refuse_duplicates(fingerprints: list[str], names: list[str]) -> None:
    """ValueError when two summaries (named ``names``) have the same content."""
    seen: dict[str, str] = {}
    for fp, name in zip(fingerprints, names):
        if fp in seen:
            raise ValueError(f"{name} has the same content as {seen[fp]}: the same site sent twice "
                             "(under another site id?); pool each site once")
        seen[fp] = name
