"""A readable report of a run, as Markdown and self-contained HTML, from its metrics dict.

The HTML embeds its plots (PNG data URIs), so the one file can be mailed to a
clinician; ``metrics.json`` beside it holds every figure it shows.
"""

from __future__ import annotations

import html
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from hccfed.server import clinical_report, privacy_report
from hccfed.server.radiomics_selection import report_sections
from hccfed.server.report_format import fmt, html_page, html_table, markdown_table

#: Packages whose versions a report records (a result is only reproducible with them).
VERSIONED_PACKAGES = ("hccfed", "flwr", "torch", "monai", "numpy", "scipy", "scikit-learn", "lifelines",
                      "SimpleITK", "pyradiomics", "opacus")

ORDER = ("oracle", "centralized", "federated")


def _auc_with_ci(figures: dict[str, Any]) -> str:
    auc = fmt(figures.get("auc"))
    if auc == "-":
        return "- (one class only)"
    return f"{auc} ({fmt(figures.get('auc_ci_lower'))}-{fmt(figures.get('auc_ci_upper'))})"


def model_rows(metrics: dict[str, Any]) -> list[dict[str, str]]:
    """One row per model: name, AUC with 95% CI, C-index, test counts, training patients."""
    entries = [("oracle (true risk, not a model)", metrics["oracle"])] if "oracle" in metrics else []
    models = metrics["models"]
    names = [n for n in ORDER if n in models] + sorted(n for n in models if n not in ORDER)
    entries += [(name, models[name]) for name in names]
    rows = []
    for name, entry in entries:
        test = entry["test"]
        rows.append({
            "model": name,
            "AUC (95% CI)": _auc_with_ci(test),
            "C-index": fmt(test.get("c_index")),
            "test patients (ER+/ER-)": f"{int(test.get('n_patients', 0))} "
                                       f"({int(test.get('n_positive', 0))}/{int(test.get('n_negative', 0))})",
            "training patients": str(entry.get("train_patients", "-")),
            "selected round": str(entry.get("selected_round", "-")),
        })
    return rows


def _per_site_rows(metrics: dict[str, Any]) -> list[dict[str, str]]:
    federated = metrics["models"].get("federated", {})
    external = metrics.get("evaluation", {}).get("kind") == "external"
    blocks = [("all patients (external)" if external else "test split", federated.get("test_per_site", {})),
              ("test split (training hospital)", federated.get("internal_test", {}).get("test_per_site", {}))]
    rows = []
    for tested_on, per_site in blocks:
        for site, figures in per_site.items():
            rows.append({"site": site, "tested on": tested_on, "test AUC (95% CI)": _auc_with_ci(figures),
                         "C-index": fmt(figures.get("c_index")),
                         "patients (train/val/test)": "/".join(str(metrics.get("sites", {}).get(site, {}).get(s, "-"))
                                                               for s in ("train", "val", "test"))})
    return rows


def _history_line(metrics: dict[str, Any]) -> str:
    history = metrics["models"].get("federated", {}).get("validation_history", [])
    return ", ".join(f"{i + 1}: {fmt(h.get('auc'), 2)}" for i, h in enumerate(history))


NOTES = (
    "AUC: early recurrence (within 24 months) from the recurrence head, 95% CI by DeLong; "
    "patients censored before 24 months without recurrence have no label and are excluded from the AUC. "
    "C-index: Harrell's, from the Cox risk head, all test patients. "
    "All figures are computed from per-site tables of the test predictions (each distinct prediction with its "
    "counts: the federated path, exact); no per-patient row reaches the server."
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


def _model_figures(metrics: dict[str, Any]) -> dict[str, dict]:
    """``{row name: pooled clinical figures}`` for the oracle and every model that has them."""
    out = {}
    if "figures" in metrics.get("oracle", {}):
        out["oracle (true risk)"] = metrics["oracle"]["figures"]
    models = metrics["models"]
    for name in [n for n in ORDER if n in models] + sorted(n for n in models if n not in ORDER):
        if "figures" in models[name]:
            out[name] = {**models[name]["figures"], "recalibrated": models[name].get("recalibrated")}
    return out


def _definition_list(mapping: dict[str, Any]) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                   for k, v in mapping.items())
    return f"<table>{rows}</table>"


def _privacy_rows(metrics: dict[str, Any]) -> list[dict[str, str]]:
    """Per federated model and site: what the site sent each round and the DP budget it spent."""
    rows = []
    for model, run in (metrics.get("privacy") or {}).get("runs", {}).items():
        dp, central = run.get("dp_sgd"), run.get("central_dp")
        for site, entry in run.get("sites", {}).items():
            spent = entry.get("dp_sgd_epsilon_spent")
            rows.append({
                "model": model,
                "site": site,
                "sent per round (MB)": fmt(entry.get("bytes_sent_per_round", 0) / 1e6, 3),
                "DP-SGD epsilon spent (target), delta": (
                    f"{fmt(spent, 2)} ({fmt(dp['target_epsilon'], 2)}), {dp['delta']:g}" if dp else "off"),
                "central DP": (f"noise {central['noise_multiplier']:g}, clip {central['clipping_norm']:g}"
                               if central else "off"),
                "secure aggregation": run.get("secure_aggregation") or "off",
            })
    return rows


PRIVACY_NOTE = (
    "What left each hospital: model weights in each training round, and at evaluation tables of its "
    "predictions (each distinct prediction with its counts, unlinked from ids and from each other; at most one "
    "row per patient). Epsilon is the DP-SGD budget each site's accountant reported in its last round (RDP "
    "accountant, Opacus); a site stops training when it is spent. It covers the weights only: the evaluation "
    "tables, the fingerprint, the statistics (and, without DP, the training loss) are exact releases, listed "
    "per site in the next section; the DP model's radiomics inputs were chosen by the exact (non-private) "
    "federated LASSO."
)


def write_report(metrics: dict[str, Any], run_dir: Path) -> Path:
    """Write report.md and report.html into ``run_dir``; returns the HTML path.

    The same report for a simulation (with the oracle row: the cohort's true risk) and for a deployed
    ServerApp (server/run_summary.py: no oracle, the federated model only)."""
    rows = model_rows(metrics)
    site_rows = _per_site_rows(metrics)
    history = _history_line(metrics)
    clinical_md, clinical_html = clinical_report.sections(_model_figures(metrics), metrics.get("paired_delong"))
    evaluation = metrics.get("evaluation", {}).get("description")
    tested_on = [f"Tested on {evaluation}."] if evaluation else []
    md = ["## Models on the same test patients", "", *tested_on, "", markdown_table(rows), "", NOTES, ""]
    parts = ["<h2>Models on the same test patients</h2>", *[f"<p><b>{html.escape(t)}</b></p>" for t in tested_on],
             html_table(rows), f"<p class='note'>{html.escape(NOTES)}</p>"]
    if site_rows:
        md += ["## Federated model per hospital", "", markdown_table(site_rows), ""]
        parts += ["<h2>Federated model per hospital</h2>", html_table(site_rows)]
    if history:
        cv = metrics["models"].get("federated", {}).get("cross_validation")
        title = ("Federated validation AUC by round" if not cv else
                 f"Federated out-of-fold AUC by round ({cv['folds']}-fold cross-validation over the training and "
                 f"validation splits; the final model trained {cv['selected_round']} rounds on all of them)")
        md += [f"## {title}", "", history, ""]
        parts += [f"<h2>{html.escape(title)}</h2>", f"<p>{html.escape(history)}</p>"]
    md += clinical_md
    parts += clinical_html
    selection_md, selection_html = report_sections(metrics.get("models", {}))
    md += selection_md
    parts += selection_html
    privacy_rows = _privacy_rows(metrics)
    if privacy_rows:
        md += ["## Privacy: what each hospital sent and spent", "", markdown_table(privacy_rows), "", PRIVACY_NOTE, ""]
        parts += ["<h2>Privacy: what each hospital sent and spent</h2>", html_table(privacy_rows),
                  f"<p class='note'>{html.escape(PRIVACY_NOTE)}</p>"]
    releases_md, releases_html = privacy_report.sections(metrics.get("privacy"))
    md += releases_md
    parts += releases_html
    run_config = metrics.get("models", {}).get("federated", {}).get("run_config")
    if run_config:
        parts += ["<h2>Run configuration</h2>", _definition_list(run_config)]
    parts += ["<h2>Software</h2>", _definition_list(metrics.get("versions") or package_versions())]
    title = f"hccfed run {metrics['run_id']}"
    (run_dir / "report.md").write_text("\n".join([f"# {title}", "", *md]))
    out = run_dir / "report.html"
    out.write_text(html_page(title, parts))
    return out
