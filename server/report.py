"""A readable report of a run, as Markdown and self-contained HTML, from its metrics dict.

The HTML embeds its plots (PNG data URIs), so the one file can be mailed to a
clinician; ``metrics.json`` beside it holds every figure it shows.
"""

from __future__ import annotations

import html
import math
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from server import report_plots

#: Packages whose versions a report records (a result is only reproducible with them).
VERSIONED_PACKAGES = ("hccfed", "flwr", "torch", "monai", "numpy", "scipy", "scikit-learn", "lifelines",
                      "SimpleITK", "pyradiomics", "opacus")

ORDER = ("oracle", "centralized", "federated")


def _fmt(value: Any, digits: int = 3) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "-"
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def _auc_with_ci(figures: dict[str, Any]) -> str:
    auc = _fmt(figures.get("auc"))
    if auc == "-":
        return "- (one class only)"
    return f"{auc} ({_fmt(figures.get('auc_ci_lower'))}-{_fmt(figures.get('auc_ci_upper'))})"


def model_rows(metrics: dict[str, Any]) -> list[dict[str, str]]:
    """One row per model: name, AUC with 95% CI, C-index, test counts, training patients."""
    entries = [("oracle (true risk, not a model)", metrics["oracle"])]
    models = metrics["models"]
    names = [n for n in ORDER if n in models] + sorted(n for n in models if n not in ORDER)
    entries += [(name, models[name]) for name in names]
    rows = []
    for name, entry in entries:
        test = entry["test"]
        rows.append({
            "model": name,
            "AUC (95% CI)": _auc_with_ci(test),
            "C-index": _fmt(test.get("c_index")),
            "test patients (ER+/ER-)": f"{int(test.get('n_patients', 0))} "
                                       f"({int(test.get('n_positive', 0))}/{int(test.get('n_negative', 0))})",
            "training patients": str(entry.get("train_patients", "-")),
            "selected round": str(entry.get("selected_round", "-")),
        })
    return rows


def _markdown_table(rows: list[dict[str, str]]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row[h] for h in header) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(rows: list[dict[str, str]]) -> str:
    header = "".join(f"<th>{html.escape(h)}</th>" for h in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row.values()) + "</tr>" for row in rows)
    return f"<table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>"


def _per_site_rows(metrics: dict[str, Any]) -> list[dict[str, str]]:
    federated = metrics["models"].get("federated", {})
    rows = []
    for site, figures in federated.get("test_per_site", {}).items():
        rows.append({"site": site, "test AUC (95% CI)": _auc_with_ci(figures),
                     "C-index": _fmt(figures.get("c_index")),
                     "patients (train/val/test)": "/".join(str(metrics["sites"].get(site, {}).get(s, "-"))
                                                           for s in ("train", "val", "test"))})
    return rows


def _history_line(metrics: dict[str, Any]) -> str:
    history = metrics["models"].get("federated", {}).get("validation_history", [])
    return ", ".join(f"{i + 1}: {_fmt(h.get('auc'), 2)}" for i, h in enumerate(history))


NOTES = (
    "AUC: early recurrence (within 24 months) from the recurrence head, 95% CI by DeLong; "
    "patients censored before 24 months without recurrence have no label and are excluded from the AUC. "
    "C-index: Harrell's, from the Cox risk head, all test patients. "
    "All figures are computed from per-site histograms of the test predictions (the federated path), "
    "pooled over every hospital's test split; no per-patient row reaches the server."
)


def package_versions() -> dict[str, str]:
    """Python and the versions of the packages a result depends on ("not installed" when absent)."""
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _curves(metrics: dict[str, Any], kind: str) -> dict[str, Any]:
    """``{model: curve}`` for every model whose pooled test figures include curve ``kind``."""
    return {name: entry["curves"][kind] for name, entry in metrics["models"].items()
            if kind in entry.get("curves", {})}


def _plots(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """(title, data URI) of every plot the metrics allow."""
    plots = [("ROC curves", report_plots.roc_plot(_curves(metrics, "roc"))),
             ("Calibration", report_plots.calibration_plot(_curves(metrics, "calibration"))),
             ("Decision curves", report_plots.decision_plot(_curves(metrics, "decision")))]
    for name, km in _curves(metrics, "km").items():
        p_value = km.get("logrank_p")
        suffix = f" (log-rank p = {p_value:.3g})" if isinstance(p_value, float) else ""
        plots.append((f"Kaplan-Meier by risk group: {name}",
                      report_plots.km_plot(km["groups"], f"{name}: risk groups{suffix}")))
    return [(title, uri) for title, uri in plots if uri]


def _definition_list(mapping: dict[str, Any]) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                   for k, v in mapping.items())
    return f"<table>{rows}</table>"


def write_report(metrics: dict[str, Any], run_dir: Path) -> Path:
    """Write report.md and report.html into ``run_dir``; returns the HTML path."""
    rows = model_rows(metrics)
    site_rows = _per_site_rows(metrics)
    history = _history_line(metrics)
    md = [f"# hccfed run {metrics['run_id']}", "", "## Models on the same test patients", "",
          _markdown_table(rows), "", NOTES, ""]
    if site_rows:
        md += ["## Federated model per hospital", "", _markdown_table(site_rows), ""]
    if history:
        md += ["## Federated validation AUC by round", "", history, ""]
    (run_dir / "report.md").write_text("\n".join(md))
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:.3em .7em;"
             "text-align:left}th{background:#eef}p.note{color:#555;font-size:.9em}")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>hccfed run {html.escape(metrics['run_id'])}"
             f"</title><style>{style}</style></head><body>",
             f"<h1>hccfed run {html.escape(metrics['run_id'])}</h1>",
             "<h2>Models on the same test patients</h2>", _html_table(rows),
             f"<p class='note'>{html.escape(NOTES)}</p>"]
    if site_rows:
        parts += ["<h2>Federated model per hospital</h2>", _html_table(site_rows)]
    if history:
        parts += ["<h2>Federated validation AUC by round</h2>", f"<p>{html.escape(history)}</p>"]
    for title, uri in _plots(metrics):
        parts += [f"<h2>{html.escape(title)}</h2>", f"<img alt='{html.escape(title)}' src='{uri}'>"]
    run_config = metrics.get("models", {}).get("federated", {}).get("run_config")
    if run_config:
        parts += ["<h2>Run configuration</h2>", _definition_list(run_config)]
    parts += ["<h2>Software</h2>", _definition_list(metrics.get("versions") or package_versions())]
    parts.append("</body></html>")
    out = run_dir / "report.html"
    out.write_text("\n".join(parts))
    return out
