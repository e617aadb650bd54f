"""Pooling of site summary documents (the work of `hccfed pool-summaries`): checks first, then figures.

Every document is checked before use (:func:`load_site_summary`): its
format version, its tables (finite ascending values, non-negative integer
counts, events <= patients), its declared totals against its tables, and
its models holding the same patients. Then across documents
(:func:`pool_report`): one protocol and one DP grid, the same models, each
site id once, no two documents with the same content (the same site sent
under two names), and every site at or above the minimum cell size. Every
error names the file and the field.

Then, per model: the pooled figures (:func:`server.pooled_figures.model_figures`,
at a threshold declared before pooling), the same per site, a
DerSimonian-Laird meta-analysis of the per-site AUCs, and the paired DeLong
tests between models with Holm-adjusted p-values when every site sent its
round-2 placement sums; otherwise the round-2 request of each site.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np

from hccfed.common.metrics.federated_delong import (check_placement_sums, delong_paired_from_sums,
                                                     placement_request, pool_placement_sums, pooled_fingerprint)
from hccfed.common.metrics.meta_analysis import dersimonian_laird
from hccfed.common.metrics.multiple_testing import holm_adjust
from hccfed.common.metrics.summaries import AUC_KEYS, check_summary, pool_summaries
from hccfed.common.metrics.summary_checks import (MinimumCells, check_minimum, check_totals, content_fingerprint,
                                                  refuse_duplicates, summary_totals)
from hccfed.common.metrics.summary_codec import SITE_FORMAT, decode_arrays
from hccfed.common.metrics.summary_dp_intervals import noise_aware_intervals
from hccfed.common.metrics.summary_dp import DPGrid
from hccfed.server.pooled_figures import jsonable, model_figures, try_figure

__all__ = ["load_site_summary", "pool_report"]

PROTOCOLS = ("exact", "dp-laplace")
ROUND2_HOW = ("run `hccfed site-summary --predictions <csv> --site-id <id> --pooled <out>/round2/<id>.json "
              "--out <json>` at every site, then pool those files again")


def _model_tables(name: str, m: str, d: Any, exact: bool) -> tuple[dict, dict]:
    where = f"{name} model '{m}'"
    if not isinstance(d, dict) or "tables" not in d or not isinstance(d.get("totals"), dict):
        raise ValueError(f"{where}: needs the fields 'tables' and 'totals'")
    tables = decode_arrays(d["tables"], where)
    check_summary(tables, where, exact=exact)
    check_totals(tables, d["totals"], where)
    return tables, d["totals"]


def load_site_summary(path: str | Path) -> dict:
    """Read and check one site summary JSON; its tables decoded to numpy. ValueError naming the file and field."""
    path = Path(path)
    name = path.name
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{name}: not valid JSON ({err})") from None
    fmt = data.get("format") if isinstance(data, dict) else None
    if fmt == "hccfed-site-summary/1":
        raise ValueError(f"{name}: written by an older hccfed (field 'format' is {fmt!r}: binned histograms, "
                         "not exact for every score); run `hccfed site-summary` again")
    if fmt != SITE_FORMAT:
        raise ValueError(f"{name}: not a site summary (field 'format' is {fmt!r}, expected {SITE_FORMAT!r})")
    site_id, protocol, models = data.get("site_id"), data.get("protocol"), data.get("models")
    if not isinstance(site_id, str) or not site_id:
        raise ValueError(f"{name}: field 'site_id' must be a non-empty text, got {site_id!r}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"{name}: field 'protocol' must be one of {PROTOCOLS}, got {protocol!r}")
    if not isinstance(models, dict) or not models:
        raise ValueError(f"{name}: field 'models' must name at least one model")
    tables = {m: _model_tables(name, m, d, protocol == "exact")[0] for m, d in models.items()}
    if protocol == "exact":  # one CSV: every model's tables count the same patients
        first = next(iter(tables))
        for m, t in tables.items():
            if summary_totals(t) != summary_totals(tables[first]):
                raise ValueError(f"{name}: model '{m}' counts {summary_totals(t)}, model '{first}' "
                                 f"{summary_totals(tables[first])}; one site's models must cover the same patients")
    privacy = data.get("privacy")
    grid = None
    if protocol == "dp-laplace":
        try:
            grid = DPGrid.from_dict(privacy["grid"])
            float(privacy["epsilon_total"]), float(privacy["epsilon_per_model"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{name}: field 'privacy' must give the DP grid and epsilons ({err})") from None
    return {"path": str(path), "name": name, "site_id": site_id, "protocol": protocol, "grid": grid,
            "models": tables, "prob_source": {m: d.get("prob_source") for m, d in models.items()},
            "placement_sums": data.get("placement_sums"), "privacy": privacy}


def _check_sites(sites: list[dict], minimum: MinimumCells) -> None:
    first = sites[0]
    for s in sites:
        if s["protocol"] != first["protocol"]:
            raise ValueError(f"{s['name']}: protocol {s['protocol']!r}, but {first['name']} is {first['protocol']!r}; "
                             "pool exact summaries with exact ones and DP summaries with DP ones")
        if s["grid"] != first["grid"]:
            raise ValueError(f"{s['name']}: its DP grid differs from {first['name']}'s; all sites must use one grid")
        if sorted(s["models"]) != sorted(first["models"]):
            raise ValueError(f"{s['name']}: models {sorted(s['models'])} differ from {first['name']}'s "
                             f"{sorted(first['models'])}")
    seen: dict[str, str] = {}
    for s in sites:
        if s["site_id"] in seen:
            raise ValueError(f"{s['name']}: site id {s['site_id']!r} is also that of {seen[s['site_id']]}; "
                             "site ids must be distinct (each site once, with its own --site-id)")
        seen[s["site_id"]] = s["name"]
    refuse_duplicates([content_fingerprint(s["models"]) for s in sites], [s["name"] for s in sites])
    for s in sites:
        for m, tables in s["models"].items():
            check_minimum(tables, minimum, f"{s['name']} (site {s['site_id']!r}, model '{m}')")


def _meta(site_figures: dict[str, dict]) -> dict:
    est, var, used = [], [], []
    for site, fig in site_figures.items():
        auc = fig["auc"]
        if "error" not in auc and auc["se"] > 0:
            est.append(auc["auc"])
            var.append(auc["se"] ** 2)
            used.append(site)
    return {"sites": used, **try_figure(lambda: dersimonian_laird(est, var))}


def _paired(sites: list[dict], pooled: dict[str, dict], models: list[str]) -> dict:
    if len(models) < 2:
        return {"status": "one model only: no paired test"}
    if sites[0]["protocol"] != "exact":
        return {"status": "not computed: summaries under differential privacy carry no exact placement sums"}
    answers = [s["placement_sums"] for s in sites]
    if any(a is None for a in answers):
        return {"status": f"not computed: the paired DeLong test needs a second round; {ROUND2_HOW}"}
    expected = pooled_fingerprint(pooled, sorted(models))
    if any(not isinstance(a, dict) or a.get("fingerprint") != expected for a in answers):
        return {"status": f"not computed: the placement sums were made against other pooled tables; {ROUND2_HOW}"}
    for s, a in zip(sites, answers):
        totals = summary_totals(next(iter(s["models"].values())))
        check_placement_sums(a, s["name"], sorted(models), totals["positives"], totals["negatives"])
    total = pool_placement_sums(answers, [s["name"] for s in sites])
    tests = [{"model_a": a, "model_b": b, **try_figure(lambda: delong_paired_from_sums(total, a, b))}
             for a, b in itertools.combinations(total["models"], 2)]
    return {"status": "computed", "tests": with_holm(tests)}


def _with_noise(figures: dict, sites: list[dict], model: str, pooled: dict, alpha: float) -> None:
    """DP summaries: the pooled AUC's interval widened by the Laplace noise's error, the C-index given the
    noise's interval (common/metrics/summary_dp_intervals.py); the sampling-only interval is kept beside."""
    epsilons = [float(s["privacy"]["epsilon_per_model"]) / 3.0 for s in sites]  # each cell's Laplace epsilon
    noisy = try_figure(lambda: noise_aware_intervals([s["models"][model] for s in sites], sites[0]["grid"],
                                                     epsilons, pooled, alpha))
    if "error" in noisy:
        figures["noise_intervals"] = noisy
        return
    auc, c_index = figures.get("auc", {}), figures.get("c_index", {})
    if "error" not in auc:
        auc.update({"ci_lower_sampling_only": auc["ci_lower"], "ci_upper_sampling_only": auc["ci_upper"],
                    "se_noise": noisy["auc"]["se_noise"], "ci_lower": noisy["auc"]["ci_lower"],
                    "ci_upper": noisy["auc"]["ci_upper"], "ci_accounts_for_noise": True})
    if "error" not in c_index:
        c_index.update({k: noisy["c_index"][k] for k in ("se_noise", "ci_lower", "ci_upper")})


def with_holm(tests: list[dict]) -> list[dict]:
    """The paired tests with ``p_holm``: Holm-adjusted over the family of tests given (missing p: None)."""
    p = np.array([t.get("p_value", np.nan) for t in tests], dtype=float)
    adjusted = holm_adjust(p) if p.size else p
    return [{**t, "p_holm": None if np.isnan(q) else float(q)} for t, q in zip(tests, adjusted)]


def pool_report(sites: list[dict], alpha: float = 0.05, thresholds: dict[str, float] | None = None,
                minimum: MinimumCells = MinimumCells()) -> tuple[dict, dict[str, dict]]:
    """(figures document, round-2 requests by site id) from loaded site summaries.

    ``thresholds``: model name -> declared score threshold of the operating
    point (key "*" for every model); a model without one gets no
    sensitivity / specificity block. Requests are made for exact summaries
    of two or more models.
    """
    if not sites:
        raise ValueError("no site summary given")
    _check_sites(sites, minimum)
    thresholds = thresholds or {}
    unknown = sorted(set(thresholds) - set(sites[0]["models"]) - {"*"})
    if unknown:
        raise ValueError(f"--threshold names model(s) {unknown}; the summaries hold {sorted(sites[0]['models'])}")
    exact = sites[0]["protocol"] == "exact"
    models = sorted(sites[0]["models"])
    names = [s["name"] for s in sites]
    pooled = {m: pool_summaries([s["models"][m] for s in sites], names, exact) for m in models}
    figures: dict[str, Any] = {
        "protocol": sites[0]["protocol"], "sites": [s["site_id"] for s in sites], "n_sites": len(sites),
        "minimum_cells": {"patients": minimum.patients, "per_class": minimum.per_class}, "models": {},
        "privacy": {s["site_id"]: s["privacy"] or "none (exact tables)" for s in sites}}
    for m in models:
        thr = thresholds.get(m, thresholds.get("*"))
        per_site = {s["site_id"]: model_figures(s["models"][m], thr, "declared before pooling", alpha)
                    for s in sites}
        pooled_figures = model_figures(pooled[m], thr, "declared before pooling", alpha)
        if not exact:
            _with_noise(pooled_figures, sites, m, pooled[m], alpha)
        figures["models"][m] = {"probabilities_from": sorted({str(s["prob_source"][m]) for s in sites}),
                                "pooled": pooled_figures,
                                "per_site": per_site, "meta_analysis_auc": _meta(per_site)}
    figures["paired_delong"] = _paired(sites, pooled, models)
    requests = {}
    if exact and len(models) >= 2:
        scores = {m: {k: pooled[m][k] for k in AUC_KEYS} for m in models}
        requests = {s["site_id"]: placement_request(scores, s["models"], s["site_id"]) for s in sites}
    return jsonable(figures), requests
