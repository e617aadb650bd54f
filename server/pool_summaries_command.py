"""`hccfed pool-summaries`: site summary JSONs -> pooled clinical figures (figures.json).

Reads the aggregate-only files written by `hccfed site-summary` at each
hospital, adds their arrays and computes, per model: AUC with DeLong CI,
C-index, Youden threshold with its threshold metrics, Brier score,
calibration curve / intercept / slope, Hosmer-Lemeshow test, net-benefit
curve, Kaplan-Meier curves of two risk groups split at the pooled median
score with their log-rank test, and the time-dependent AUC at 24 months.
It also gives the same figures per site, a DerSimonian-Laird meta-analysis
of the per-site AUCs, and pairwise paired DeLong tests between models when
every site sent round-2 placement sums (otherwise it says how to get them).
It writes `pooled_histograms.json` (per-class score histograms, the input
of round 2) next to figures.json. A figure that is undefined on the data
(e.g. one class only) is reported as {"error": "..."}.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hccfed.common.metrics import federated_clinical as F
from hccfed.common.metrics import federated_survival as FS
from hccfed.common.metrics.federated_delong import delong_paired_from_sums, histogram_fingerprint, pool_placement_sums
from hccfed.common.metrics.meta_analysis import dersimonian_laird
from hccfed.common.metrics.summaries import roc_curve_from_summary
from hccfed.common.metrics.summary_codec import decode_arrays, encode_arrays
from hccfed.server.clinical_report import write_pooled_report

SITE_FORMAT = "hccfed-site-summary/1"
POOLED_FORMAT = "hccfed-pooled-histograms/1"
HORIZON_MONTHS = 24.0
NET_BENEFIT_THRESHOLDS = np.round(np.arange(0.01, 1.0, 0.01), 2)


def load_site_summary(path: str | Path) -> dict:
    """Read and check one site summary JSON; arrays decoded to numpy."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path.name}: not valid JSON ({err})") from None
    if data.get("format") != SITE_FORMAT:
        raise ValueError(f"{path.name}: not a site summary (format {data.get('format')!r}, expected {SITE_FORMAT!r})")
    try:
        models = {m: decode_arrays(d["arrays"], f"{path.name} model '{m}'") for m, d in data["models"].items()}
        return {"path": str(path), "site_id": str(data["site_id"]), "grid": F.ClinicalGrid.from_dict(data["grid"]),
                "models": models, "prob_source": {m: d.get("prob_source") for m, d in data["models"].items()},
                "placement_sums": data.get("placement_sums"), "privacy": data.get("privacy")}
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{path.name}: malformed site summary (missing or bad entry {err})") from None


def _try(f: Callable[[], Any]) -> Any:
    try:
        return f()
    except ValueError as err:
        return {"error": str(err)}


def jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else float(x)
    return x


def model_figures(m: dict, grid: F.ClinicalGrid, alpha: float = 0.05) -> dict:
    """Every figure of one model from its (pooled or one site's) summary arrays."""
    def threshold_block() -> dict:
        thr = F.youden_threshold_from_summary(m, grid)
        return {"youden_threshold": thr, **F.threshold_metrics_from_summary(m, thr, grid)}

    def survival_block() -> dict:
        cut = FS.score_quantile_cutpoints(m, (0.5,), grid)
        curves = FS.kaplan_meier_by_group_from_summary(m, cut, grid)
        return {"cutpoints": cut, "rule": "high risk iff score >= cutpoint (pooled median, on the grid)",
                "kaplan_meier": [{"group": ("low", "high")[g], **c} for g, c in enumerate(curves)],
                "logrank": _try(lambda: FS.logrank_from_summary(m, cut, grid))}

    return {
        "auc": _try(lambda: F.auc_ci_from_model_summary(m, alpha)),
        "roc": _try(lambda: {k: v for k, v in roc_curve_from_summary(m, grid.base).items() if k != "threshold"}),
        "c_index": _try(lambda: F.cindex_from_model_summary(m)),
        "threshold": _try(threshold_block),
        "brier": _try(lambda: F.brier_from_summary(m)),
        "calibration_curve": _try(lambda: F.calibration_curve_from_summary(m, 10, grid)),
        "calibration": _try(lambda: F.calibration_intercept_slope_from_summary(m)),
        "hosmer_lemeshow": _try(lambda: F.hosmer_lemeshow_from_summary(m, 10, grid)),
        "net_benefit": _try(lambda: F.net_benefit_from_summary(m, NET_BENEFIT_THRESHOLDS, grid)),
        "risk_groups": _try(survival_block),
        "time_dependent_auc_24m": _try(lambda: FS.time_dependent_auc_from_summary(m, HORIZON_MONTHS, grid)),
    }


def _meta(site_figures: dict[str, dict]) -> dict:
    est, var, used = [], [], []
    for site, fig in site_figures.items():
        auc = fig["auc"]
        if "error" not in auc and auc["se"] > 0:
            est.append(auc["auc"])
            var.append(auc["se"] ** 2)
            used.append(site)
    result = _try(lambda: dersimonian_laird(est, var))
    return {"sites": used, **result}


def _paired(sites: list[dict], pooled: dict[str, dict], models: list[str]) -> dict:
    answers = [s["placement_sums"] for s in sites]
    how = ("run `hccfed site-summary --predictions <csv> --pooled pooled_histograms.json --out <json>` "
           "at every site, then pool those files again")
    if len(models) < 2:
        return {"status": "one model only: no paired test"}
    if any(a is None for a in answers):
        return {"status": f"not computed: the paired DeLong test needs a second round; {how}"}
    expected = histogram_fingerprint(pooled, sorted(models))
    if any(a.get("fingerprint") != expected for a in answers):
        return {"status": f"not computed: the placement sums were made against other pooled histograms; {how}"}
    try:
        total = pool_placement_sums(answers)
    except (KeyError, TypeError, ValueError) as err:
        return {"status": f"not computed: malformed placement sums ({err}); {how}"}
    return {"status": "computed", "tests": [{"model_a": a, "model_b": b, **_try(lambda: delong_paired_from_sums(total, a, b))}
                                            for a, b in itertools.combinations(total["models"], 2)]}


def pool_report(sites: list[dict], alpha: float = 0.05) -> tuple[dict, dict]:
    """(figures, pooled_histograms) documents from loaded site summaries."""
    if not sites:
        raise ValueError("no site summary given")
    grid = sites[0]["grid"]
    models = list(sites[0]["models"])
    for s in sites:
        if s["grid"] != grid:
            raise ValueError(f"{s['path']}: its grid differs from {sites[0]['path']}'s; all sites must use one grid")
        if sorted(s["models"]) != sorted(models):
            raise ValueError(f"{s['path']}: models {sorted(s['models'])} differ from {sorted(models)}")
    ids = [s["site_id"] for s in sites]
    if len(set(ids)) != len(ids):
        raise ValueError(f"site ids must be distinct, got {ids} (use --site-id)")
    pooled = {m: F.pool_model_summaries([s["models"][m] for s in sites]) for m in models}
    figures: dict[str, Any] = {"sites": ids, "n_sites": len(sites), "grid": grid.to_dict(), "models": {},
                               "privacy": {s["site_id"]: s["privacy"] or "none (exact counts)" for s in sites}}
    for m in models:
        per_site = {s["site_id"]: model_figures(s["models"][m], grid, alpha) for s in sites}
        figures["models"][m] = {"probabilities_from": sorted({str(s["prob_source"][m]) for s in sites}),
                                "pooled": model_figures(pooled[m], grid, alpha), "per_site": per_site,
                                "meta_analysis_auc": _meta(per_site)}
    figures["paired_delong"] = _paired(sites, pooled, models)
    histograms = {"format": POOLED_FORMAT, "grid": grid.to_dict(),
                  "models": {m: encode_arrays({k: pooled[m][k] for k in ("auc_pos", "auc_neg")}) for m in models}}
    return jsonable(figures), histograms


def write_pool_report(paths: list[str | Path], out_dir: str | Path, alpha: float = 0.05) -> Path:
    """Load the site summaries at ``paths``; write figures.json, pooled_histograms.json and
report.html / report.md (tables and plots of the same figures) to ``out_dir``."""
    figures, histograms = pool_report([load_site_summary(p) for p in paths], alpha)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "figures.json").write_text(json.dumps(figures, indent=1))
    (out / "pooled_histograms.json").write_text(json.dumps(histograms))
    write_pooled_report(figures, out)
    return out / "figures.json"
