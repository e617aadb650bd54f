"""Small formatting pieces shared by the run report and the pooled-summaries report."""

from __future__ import annotations

import html
import math
from typing import Any

STYLE = ("body{font-family:sans-serif;max-width:64em;margin:2em auto;color:#222}"
         "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:.3em .7em;"
         "text-align:left}th{background:#eef}p.note{color:#555;font-size:.9em}img{max-width:100%}")


def fmt(value: Any, digits: int = 3) -> str:
    """A number with ``digits`` decimals; "-" for missing, NaN or non-numbers."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "-"
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def fmt_p(value: Any) -> str:
    """A p-value as a reader expects it: 3 significant digits, "<0.001" below."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "-"
    if math.isnan(value):
        return "-"
    return "<0.001" if value < 0.001 else f"{value:.3g}"


def markdown_table(rows: list[dict[str, str]]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row[h] for h in header) + " |" for row in rows]
    return "\n".join(lines)


def html_table(rows: list[dict[str, str]]) -> str:
    header = "".join(f"<th>{html.escape(h)}</th>" for h in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row.values()) + "</tr>" for row in rows)
    return f"<table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>"


def html_page(title: str, parts: list[str]) -> str:
    """A self-contained HTML page."""
    return "\n".join([f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                      f"<style>{STYLE}</style></head><body>", f"<h1>{html.escape(title)}</h1>", *parts,
                      "</body></html>"])


def html_image(title: str, uri: str) -> list[str]:
    return [f"<h2>{html.escape(title)}</h2>", f"<img alt='{html.escape(title)}' src='{uri}'>"]
