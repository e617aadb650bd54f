"""The clinical figures of several models, as tables and plots (from ``model_figures`` dicts).

Input: ``{model name: figures}`` where figures is what
:func:`server.pooled_figures.model_figures` returns for the pooled summary
(AUC with DeLong CI, ROC points, C-index, the operating point at a declared
or validation threshold, Brier,
calibration, Hosmer-Lemeshow, net benefit, Kaplan-Meier by risk group with
log-rank, time-dependent AUC at 24 months). A figure that could not be
computed is ``{"error": ...}`` and shows as "-". Used by the run report of
`hccfed simulate` and by `hccfed pool-summaries`.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from hccfed.server import report_plots
from hccfed.server.report_format import fmt, fmt_p, html_image, html_page, html_table, markdown_table


def _ok(block: Any) -> dict:
    return block if isinstance(block, dict) and "error" not in block else {}


def auc_text(auc: dict) -> str:
    auc = _ok(auc)
    if not auc:
        return "-"
    return f"{fmt(auc.get('auc'))} ({fmt(auc.get('ci_lower'))}-{fmt(auc.get('ci_upper'))})"


def discrimination_rows(models: dict[str, dict]) -> list[dict[str, str]]:
    """Per model: AUC (CI), C-index, time-dependent AUC at 24 months, Brier, calibration, HL."""
    rows = []
    for name, f in models.items():
        calibration, hl = _ok(f.get("calibration")), _ok(f.get("hosmer_lemeshow"))
        rows.append({
            "model": name,
            "AUC (95% CI)": auc_text(f.get("auc")),
            "C-index": fmt(_ok(f.get("c_index")).get("c_index")),
            "AUC(24 mo), IPCW": fmt(_ok(f.get("time_dependent_auc_24m")).get("auc")),
            "Brier": fmt(f.get("brier") if not isinstance(f.get("brier"), dict) else None),
            "calibration slope / intercept": f"{fmt(calibration.get('slope'), 2)} / {fmt(calibration.get('intercept'), 2)}",
            "Hosmer-Lemeshow p": fmt_p(hl.get("p_value")),
            "recalibrated on validation: slope / intercept, Brier": recalibrated_text(f.get("recalibrated")),
        })
    return rows


def recalibrated_text(block: Any) -> str:
    """The test calibration after the recalibration fitted on the validation patients, or why there is none."""
    if not isinstance(block, dict):
        return "-"
    if "error" in block:
        return f"- ({block['error']})"
    figures = block.get("figures") or {}
    calibration = _ok(figures.get("calibration"))
    brier = figures.get("brier") if not isinstance(figures.get("brier"), dict) else None
    return (f"{fmt(calibration.get('slope'), 2)} / {fmt(calibration.get('intercept'), 2)}, {fmt(brier)} "
            f"({block.get('method')}, {int(_ok(block.get('fitted_on')).get('n_patients', 0))} patients)")


def threshold_rows(models: dict[str, dict]) -> list[dict[str, str]]:
    """Per model: the threshold (score units), where it was chosen, and the metrics at it."""
    rows = []
    for name, f in models.items():
        t = _ok(f.get("threshold"))
        rows.append({"model": name, "threshold (score)": fmt(t.get("threshold"), 2),
                     "chosen on": str(t.get("chosen_on", "- (no threshold given)")),
                     **{key: fmt(t.get(key)) for key in ("accuracy", "sensitivity", "specificity", "ppv", "npv")}})
    return rows


def paired_rows(paired: dict | None) -> list[dict[str, str]]:
    """Paired DeLong tests, when computed."""
    if not paired or paired.get("status") != "computed":
        return []
    return [{"model A": t["model_a"], "model B": t["model_b"],
             "AUC A": fmt(t.get("auc_a")), "AUC B": fmt(t.get("auc_b")), "difference": fmt(t.get("diff")),
             "z": fmt(t.get("z"), 2), "p": fmt_p(t.get("p_value")), "p (Holm)": fmt_p(t.get("p_holm"))}
            for t in paired.get("tests", [])]


def plots(models: dict[str, dict]) -> list[tuple[str, str]]:
    """(title, PNG data URI) of the ROC, calibration, decision and Kaplan-Meier plots."""
    roc = {n: _ok(f.get("roc")) for n, f in models.items() if _ok(f.get("roc"))}
    calibration = {}
    for name, f in models.items():
        curve = _ok(f.get("calibration_curve"))
        if curve:
            pairs = [(p, o) for p, o in zip(curve["mean_predicted"], curve["observed_rate"])
                     if p is not None and o is not None]
            calibration[name] = {"predicted": [p for p, _ in pairs], "observed": [o for _, o in pairs]}
    decision = {n: {"threshold": _ok(f.get("net_benefit"))["thresholds"],
                    "net_benefit": _ok(f.get("net_benefit"))["model"],
                    "treat_all": _ok(f.get("net_benefit"))["treat_all"]}
                for n, f in models.items() if _ok(f.get("net_benefit"))}
    out = [("ROC curves", report_plots.roc_plot(roc)),
           ("Calibration", report_plots.calibration_plot(calibration)),
           ("Decision curves", report_plots.decision_plot(decision))]
    for name, f in models.items():
        groups = _ok(f.get("risk_groups"))
        if not groups:
            continue
        p_value = _ok(groups.get("logrank")).get("p_value")
        curves = {f"{c['group']} risk (n={int(c['n'])})": {"time": [0.0, *c["times"]], "survival": [1.0, *c["survival"]]}
                  for c in groups["kaplan_meier"]}
        title = f"{name}: median split of the score, log-rank p = {fmt_p(p_value)}"
        out.append((f"Kaplan-Meier: {name}", report_plots.km_plot(curves, title)))
    return [(title, uri) for title, uri in out if uri]


def sections(models: dict[str, dict], paired: dict | None = None) -> tuple[list[str], list[str]]:
    """(Markdown lines, HTML parts) of the clinical figures of ``models``."""
    md, parts = [], []
    for title, rows in (("Discrimination and calibration", discrimination_rows(models)),
                        ("Operating point (threshold chosen before testing, e.g. Youden on validation)",
                         threshold_rows(models)),
                        ("Paired DeLong tests", paired_rows(paired))):
        if rows:
            md += [f"## {title}", "", markdown_table(rows), ""]
            parts += [f"<h2>{html.escape(title)}</h2>", html_table(rows)]
    if paired and paired.get("status") != "computed":
        md += [f"Paired DeLong tests: {paired.get('status')}", ""]
        parts.append(f"<p class='note'>Paired DeLong tests: {html.escape(str(paired.get('status')))}</p>")
    for title, uri in plots(models):
        parts += html_image(title, uri)
    return md, parts


def write_pooled_report(figures: dict, out_dir: Path) -> Path:
    """report.html / report.md of `hccfed pool-summaries` from its figures.json document."""
    pooled = {name: m["pooled"] for name, m in figures["models"].items()}
    md, parts = sections(pooled, figures.get("paired_delong"))
    site_rows = []
    for name, m in figures["models"].items():
        for site, f in m["per_site"].items():
            site_rows.append({"model": name, "site": site, "AUC (95% CI)": auc_text(f.get("auc")),
                              "C-index": fmt(_ok(f.get("c_index")).get("c_index"))})
        meta = _ok(m.get("meta_analysis_auc"))
        if meta:
            site_rows.append({"model": name, "site": f"random effects (I2 = {fmt(meta.get('i2'), 2)})",
                              "AUC (95% CI)": f"{fmt(meta.get('estimate'))} ({fmt(meta.get('ci_lower'))}-"
                                              f"{fmt(meta.get('ci_upper'))})", "C-index": "-"})
    title = f"hccfed pooled evaluation of {figures['n_sites']} sites"
    exact = figures.get("protocol", "exact") == "exact"
    intro = ("All figures are computed from the sites' summary tables (each distinct score, risk and "
             "(time, score) with its counts); no patient row was pooled. "
             + ("The tables are exact: every figure equals the per-patient figure of the pooled rows."
                if exact else "The tables are noisy (differential privacy): the figures carry that noise, and the pooled "
                "AUC's and C-index's intervals account for it (a parametric bootstrap over the Laplace noise, "
                "combined with DeLong's sampling variance for the AUC)."))
    if site_rows:
        md += ["## Per site", "", markdown_table(site_rows), ""]
        parts += ["<h2>Per site</h2>", html_table(site_rows)]
    privacy_rows = [{"site": site, "differential privacy": (f"epsilon {fmt(p['epsilon_total'], 2)} in all "
                                                            f"({fmt(p['epsilon_per_model'], 2)} per model), delta "
                                                            f"{p.get('delta', 0.0):g}, {p.get('neighbouring', 'add / remove one patient')}; "
                                                            f"{p['mechanism']}; noise: {p.get('noise_source', 'not stated')}"
                                                            if isinstance(p, dict) else str(p))}
                    for site, p in figures.get("privacy", {}).items()]
    if privacy_rows:
        md += ["## Privacy of the site summaries", "", markdown_table(privacy_rows), ""]
        parts += ["<h2>Privacy of the site summaries</h2>", html_table(privacy_rows)]
    (out_dir / "report.md").write_text("\n".join([f"# {title}", "", intro, "", *md]))
    out = out_dir / "report.html"
    out.write_text(html_page(title, [f"<p class='note'>{html.escape(intro)}</p>", *parts,
                                     f"<p class='note'>Sites: {html.escape(json.dumps(figures['sites']))}</p>"]))
    return out
