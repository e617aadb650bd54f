"""The report's privacy section: every release of every site, with its guarantee, as the sites reported it.

Input: ``metrics["privacy"]["releases"]``, ``{model: {site: [ledger entry, ...]}}``
(each site's ledger entries for that run, carried by its replies:
server/privacy_releases.py), ``metrics["privacy"]["refusals"]`` and
``metrics["privacy"]["other_releases"]`` (releases made outside a Flower run,
e.g. the demo's in-process statistics). Entries of one kind are grouped per
model and site: how many releases, which rounds, the run's epsilon (RDP over
its DP-SGD rounds: the last entry's figure) and delta, and the guarantee in words.
"""

from __future__ import annotations

import html
from typing import Any

from hccfed.server.report_format import fmt, html_table, markdown_table

NOTE = (
    "Each row is a kind of release a site made in a run, from the entries of its own privacy ledger "
    "(<cache_dir>/privacy_ledger.jsonl at the site), which its replies carried. Mechanism 'none' means "
    "exact values, not differentially private: they are protected only by aggregation, the minimum cell "
    "size and the absence of ids and rows. DP-SGD epsilon is the run's total at the site (RDP accountant "
    "over its rounds, add / remove one patient); across runs and mechanisms a site's epsilons add up "
    "(basic composition), and the site refuses a release beyond its lifetime budget."
)


def _rounds(entries: list[dict[str, Any]]) -> str:
    rounds = sorted({int(e.get("round", 0)) for e in entries})
    if not rounds or rounds == [0]:
        return "-"
    return str(rounds[0]) if len(rounds) == 1 else f"{rounds[0]}-{rounds[-1]}"


def release_rows(privacy: dict[str, Any]) -> list[dict[str, str]]:
    """One row per (model, site, kind of release, mechanism)."""
    rows = []
    for model, sites in (privacy.get("releases") or {}).items():
        for site, entries in sorted(sites.items()):
            groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
            for entry in entries:
                kind = str(entry["kind"]).split(" ")[0] if entry["kind"].startswith("statistics") else entry["kind"]
                groups.setdefault((kind, entry["mechanism"]), []).append(entry)
            for (kind, mechanism), group in groups.items():
                last = group[-1]
                rows.append({"model / job": model, "site": site, "release": kind, "mechanism": mechanism,
                             "releases": str(len(group)), "rounds": _rounds(group),
                             "epsilon": "-" if last.get("epsilon") is None else fmt(last["epsilon"], 3),
                             "delta": "-" if last.get("delta") is None else f"{last['delta']:g}",
                             "guarantee": str(last.get("guarantee", ""))})
    for other in privacy.get("other_releases") or []:
        rows.append({"model / job": other["job"], "site": other["site"], "release": other["release"],
                     "mechanism": other.get("mechanism", "none"), "releases": str(other.get("releases", "-")),
                     "rounds": "-", "epsilon": "-", "delta": "-", "guarantee": other["guarantee"]})
    return rows


def refusal_rows(privacy: dict[str, Any]) -> list[dict[str, str]]:
    return [{"model / job": model, "site": r["site_id"], "request": r["message_type"], "reason": r["reason"]}
            for model, refusals in (privacy.get("refusals") or {}).items() for r in refusals]


def sections(privacy: dict[str, Any] | None) -> tuple[list[str], list[str]]:
    """(Markdown lines, HTML parts) of the releases section; empty when nothing was reported."""
    privacy = privacy or {}
    rows, refused = release_rows(privacy), refusal_rows(privacy)
    if not rows and not refused:
        return [], []
    title = "Privacy: every release of every site, with its guarantee"
    md = [f"## {title}", "", markdown_table(rows) if rows else "(no release reported)", "", NOTE, ""]
    parts = [f"<h2>{html.escape(title)}</h2>", html_table(rows) if rows else "<p>(no release reported)</p>",
             f"<p class='note'>{html.escape(NOTE)}</p>"]
    if refused:
        md += ["### Requests the sites refused (their privacy policy)", "", markdown_table(refused), ""]
        parts += ["<h3>Requests the sites refused (their privacy policy)</h3>", html_table(refused)]
    return md, parts
