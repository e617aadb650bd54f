"""The seeds' radiomics selection, federated, with what survives each step (server side).

Steps, over the sites' training rows, each from aggregates only (:mod:`server.federated_stats`):

1. candidates: the radiomics columns that vary (pooled SD > 0);
2. reproducible: ICC(3,1) between each site's own segmentation and a second reader's (a perturbed
   mask) above ``icc_min`` (0.9, seeds 002 / 004); skipped when the sites have no second reader;
3. screened: Welch t test of early recurrence yes / no, p < ``p_screen`` (seed 002), at most
   ``max_features`` by p (the 5 smallest p when none passes, and the selection says so);
4. decorrelated: the greedy Pearson filter |r| <= ``r_max`` walking by p (seed 003);
5. LASSO: non-zero coefficients at the penalty chosen by federated cross-validation (the largest
   coefficient when the chosen penalty keeps none, and the selection says so).

:func:`select_radiomics` returns the LASSO fit and a JSON-ready ``selection``: the step labels, per
"<phase> <region>" group the number of features left after each step, and the names surviving each
step after the first. :func:`report_sections` turns the selections in a run's models into the report's
section (a count table per phase and region, then the names surviving each step).
"""

from __future__ import annotations

import numpy as np

from hccfed.common.schema import PHASES
from hccfed.server import federated_stats as fs
from hccfed.server.federated_stats import Send
from hccfed.server.report_format import html_table, markdown_table

#: How many names the report lists per step (the counts are always complete).
MAX_LISTED = 60


def group_of(name: str) -> str:
    """"<phase> <region>" of a radiomics name ``<phase>_<region>_<pyradiomics name>``."""
    parts = name.split("_", 2)
    return f"{parts[0]} {parts[1]}" if len(parts) == 3 and parts[0] in PHASES else "other"


def _step(selection: dict, label: str, names: list[str], kept: list[int]) -> None:
    selection["steps"].append(label)
    survivors = [names[j] for j in kept]
    for group, counts in selection["groups"].items():
        counts.append(sum(group_of(n) == group for n in survivors))
    selection["survivors"][label] = survivors


def select_radiomics(send: Send, names: list[str], candidates: list[int], n_folds: int, p_screen: float = 0.05,
                     r_max: float = 0.8, max_features: int = 60, icc_min: float | None = 0.9
                     ) -> tuple[dict, list[int], dict]:
    """(LASSO fit of :func:`federated_elastic_net_cv` on the decorrelated columns, those columns,
    the selection record). ``candidates``: radiomics column indices; ``icc_min`` None: no ICC step."""
    sd = fs.federated_mean_sd(send, candidates, labelled=True)[1]
    candidates = [j for j, s in zip(candidates, sd) if s > 1e-12]
    selection: dict = {"steps": [], "groups": {g: [] for g in dict.fromkeys(group_of(names[j]) for j in candidates)},
                       "survivors": {}, "notes": []}
    _step(selection, "candidates", names, candidates)
    if icc_min is not None:
        icc = fs.federated_icc(send, candidates, "icc3", icc_min)
        candidates = [candidates[k] for k in icc["kept"]]
        _step(selection, f"ICC(3,1) > {icc_min:g}", names, candidates)
        if not candidates:
            raise ValueError(f"no radiomics feature has ICC > {icc_min:g} between the two readers")
    tests = fs.federated_ttests(send, candidates, equal_var=False)
    order = np.argsort(tests["p"])
    passed = [int(k) for k in order if tests["p"][k] < p_screen][:max_features]
    if not passed:
        passed = [int(k) for k in order[:5]]
        selection["notes"].append(f"no feature had p < {p_screen:g}: the 5 smallest p were kept")
    _step(selection, f"Welch t test p < {p_screen:g}", names, [candidates[k] for k in passed])
    kept = fs.federated_correlation_filter(send, [candidates[k] for k in passed], np.arange(len(passed)), r_max)
    columns = [int(c) for c in kept]
    _step(selection, f"|r| <= {r_max:g}", names, columns)
    lasso = fs.federated_elastic_net_cv(send, columns, l1_ratio=1.0, n_folds=n_folds)
    if not len(lasso["selected"]):
        lasso["selected"] = np.array([int(np.argmax(np.abs(lasso["beta_std"][1:])))])
        selection["notes"].append("LASSO's chosen penalty kept no feature: the largest coefficient was kept")
    _step(selection, "LASSO (federated CV)", names, [columns[k] for k in lasso["selected"]])
    return lasso, columns, selection


def selection_rows(selection: dict) -> list[dict[str, str]]:
    """One row per phase / region with the count after each step, then a total row."""
    steps = selection["steps"]
    rows = [{"phase, region": group, **{step: str(n) for step, n in zip(steps, counts)}}
            for group, counts in selection["groups"].items()]
    totals = np.sum([counts for counts in selection["groups"].values()], axis=0)
    rows.append({"phase, region": "all", **{step: str(int(n)) for step, n in zip(steps, totals)}})
    return rows


def survivor_lines(selection: dict) -> list[str]:
    """"<step>: name, name, ..." for every step after the first (at most MAX_LISTED names each)."""
    lines = []
    for step in selection["steps"][1:]:
        names = selection["survivors"][step]
        more = f" ... and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
        lines.append(f"{step} ({len(names)}): {', '.join(names[:MAX_LISTED])}{more}")
    return lines + [f"note: {n}" for n in selection.get("notes", [])]


SELECTION_NOTE = ("Features left after each step of the radiomics selection, per phase and region, computed "
                  "from the sites' aggregates on their training patients: reproducibility between the site's "
                  "segmentation and a second reader's (perturbed masks), Welch t test of early recurrence, "
                  "Pearson filter, LASSO with the penalty chosen by federated cross-validation.")


def report_sections(models: dict) -> tuple[list[str], list[str]]:
    """(Markdown lines, HTML parts) of a "Radiomics selection" section for every model entry holding a
    "selection" (empty when none does)."""
    import html

    md, parts = [], []
    for name, entry in models.items():
        selection = entry.get("selection")
        if not selection:
            continue
        rows, lines = selection_rows(selection), survivor_lines(selection)
        protected = entry.get("protected_covariates")
        extra = [f"ComBat kept the effects of: {', '.join(protected)}."] if protected else []
        md += [f"## Radiomics selection: {name}", "", markdown_table(rows), "", SELECTION_NOTE, *extra, "",
               *[f"- {line}" for line in lines], ""]
        parts += [f"<h2>Radiomics selection: {html.escape(name)}</h2>", html_table(rows),
                  f"<p class='note'>{html.escape(' '.join([SELECTION_NOTE, *extra]))}</p>",
                  "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ul>"]
    return md, parts
