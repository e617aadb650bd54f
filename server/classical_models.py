"""The seeds' classical models fitted federated, over a ``send`` callable (server side).

CR (clinical-radiological, seed 002): univariate federated logistic screening
of the clinical features (Wald p < ``p_enter``), then a multivariable model by
backward elimination (p < ``p_keep``).
R (radiomics, seeds 002 / 003 / 004): ICC > 0.9 between two readers (when the sites
have a second reader's radiomics from perturbed masks), federated Welch t-test
screen (p < ``p_screen``), greedy Pearson filter |r| > 0.8 walking features by p
value, then LASSO logistic regression with the penalty chosen by federated
cross-validation (:mod:`server.radiomics_selection`, which counts what survives each step).
RCR: logistic regression on the R model's score and the CR model's features.
Optionally the radiomics are first harmonised across sites by federated ComBat, keeping the
effects of the declared covariates (``PROTECTED``: age, sex): the estimate
travels with every later request and each site applies it to its rows, so no site keeps state
between requests (in a simulation, any worker process may answer for any site).

The sites are :class:`client.classical_site.ClassicalStatsSite` endpoints (in
process or behind Flower query messages): they fit on their training rows and
score their test rows themselves, returning only clinical summaries that
:func:`server.federated_eval.pooled_clinical_figures` pools. A model is a plain
dict ``{"name", "features", "intercept", "coef", "inputs"}`` (see the client module).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import stats

from hccfed.server import federated_stats as fs
from hccfed.server.federated_eval import pooled_clinical_figures, pooled_figures
from hccfed.server.federated_stats import Send
from hccfed.server.pooled_figures import jsonable
from hccfed.server.radiomics_selection import select_radiomics

R_SCORE = "R_score"
#: ICC threshold of the reproducibility filter (seeds 002 / 004: ICC > 0.9 over repeated segmentations).
ICC_MIN = 0.9
#: Clinical columns whose effects ComBat keeps (the study's declared covariates: age and sex).
PROTECTED = ("age_decades", "male")


def _wald_p(fit: dict) -> np.ndarray:
    z = fit["beta_std"][1:] / np.sqrt(np.diag(fit["cov_std"])[1:])
    return 2 * stats.norm.sf(np.abs(z))


def _model(name: str, features: list[str], intercept, coef, inputs: dict | None = None) -> dict:
    return {"name": name, "features": list(features), "intercept": float(intercept),
            "coef": np.asarray(coef, dtype=float), "inputs": inputs or {}}


def describe_sites(send: Send) -> dict:
    """The sites' common feature list, which columns are radiomics, and their split sizes (counts)."""
    replies = send({"op": "describe"})
    first = replies[0]
    for reply in replies[1:]:
        if list(reply["names"]) != list(first["names"]):
            raise ValueError(f"site {reply['site_id']}: its feature list differs from site {first['site_id']}'s; "
                             "extract radiomics with the same parameter file")
    return {"names": list(first["names"]), "radiomic": [j for j, r in enumerate(first["radiomic"]) if r],
            "n_train": {r["site_id"]: int(r["n_train"]) for r in replies},
            "n_test": {r["site_id"]: int(r["n_test"]) for r in replies},
            "second_reader": all(bool(r["second_reader"]) for r in replies)}


def _univariate_p(send: Send, column: int) -> float:
    """Wald p of one feature's logistic fit; 1 when its information matrix is singular (e.g. separation)."""
    try:
        return float(_wald_p(fs.federated_logistic(send, [column]))[0])
    except np.linalg.LinAlgError:
        return 1.0


def fit_cr(send: Send, names: list[str], candidates: list[int], p_enter: float = 0.05, p_keep: float = 0.05
           ) -> dict:
    """Univariate then multivariable (backward elimination) federated logistic regression."""
    sd = fs.federated_mean_sd(send, candidates, labelled=True)[1] if candidates else []
    usable = [j for j, s in zip(candidates, sd) if s > 0]
    p_uni = {j: _univariate_p(send, j) for j in usable}
    chosen = [j for j in usable if p_uni[j] < p_enter] or sorted(usable, key=p_uni.get)[:2]
    while True:
        fit = fs.federated_logistic(send, chosen)
        p = _wald_p(fit)
        if len(chosen) == 1 or p.max() < p_keep:
            break
        chosen = [j for k, j in enumerate(chosen) if k != int(np.argmax(p))]
    return _model("CR", [names[j] for j in chosen], fit["intercept"], fit["coef"])


def fit_r(send: Send, names: list[str], candidates: list[int], n_folds: int, p_screen: float = 0.05,
          r_max: float = 0.8, max_features: int = 60, icc_min: float | None = ICC_MIN) -> tuple[dict, dict]:
    """The R model and its selection record (:func:`server.radiomics_selection.select_radiomics`: ICC >
    ``icc_min`` when given, Welch t screen, correlation filter, LASSO with the penalty by federated CV)."""
    lasso, columns, selection = select_radiomics(send, names, candidates, n_folds, p_screen, r_max, max_features,
                                                 icc_min)
    selected = list(lasso["selected"])
    return _model("R", [names[columns[k]] for k in selected], lasso["intercept"], lasso["coef"][selected]), selection


def with_fields(send: Send, **fields) -> Send:
    """A ``send`` that adds ``fields`` to every request."""
    return lambda request: send({**request, **fields})


def with_score_input(send: Send, model: dict) -> Send:
    """A ``send`` whose sites answer with ``model``'s score prepended to their features (column 0)."""
    return with_fields(send, score_input=model)


def fit_rcr(send: Send, names: list[str], radiomics_model: dict, clinical_model: dict) -> dict:
    """Logistic regression on the R score and the CR features."""
    columns = [0] + [1 + names.index(f) for f in clinical_model["features"]]
    fit = fs.federated_logistic(with_score_input(send, radiomics_model), columns)
    return _model("RCR", [R_SCORE] + list(clinical_model["features"]), fit["intercept"], fit["coef"],
                  {R_SCORE: radiomics_model})


def estimate_radiomics_combat(send: Send, sites: dict, protect: Sequence[str] = PROTECTED) -> dict | None:
    """Federated ComBat of the radiomics columns that vary, keeping the effects of the clinical columns
    named in ``protect`` that the sites have: {"fit", "site_params", "columns", "covariates", ...}
    (None: no radiomics column varies).

    The sites apply it to the requests that carry it (field ``combat``), so no site keeps state between requests.
    """
    radiomic = sites["radiomic"]
    sd = fs.federated_mean_sd(send, radiomic)[1]
    columns = [j for j, s in zip(radiomic, sd) if s > 1e-12]
    covariates = [sites["names"].index(name) for name in protect if name in sites["names"]]
    return fs.estimate_combat(send, columns, covariates) if columns else None


def fit_classical_models(send: Send, sites: dict, n_folds: int = 5) -> tuple[dict, dict | None]:
    """({"CR", "R", "RCR": model dict} (R and RCR when radiomics exist) on ``describe_sites``' feature list,
    the R model's selection record or None). The ICC step runs when every site has a second reader."""
    names, radiomic = sites["names"], sites["radiomic"]
    clinical = [j for j in range(len(names)) if j not in radiomic]
    models, selection = {"CR": fit_cr(send, names, clinical)}, None
    if radiomic:
        icc_min = ICC_MIN if sites["second_reader"] else None
        models["R"], selection = fit_r(send, names, radiomic, n_folds, icc_min=icc_min)
        models["RCR"] = fit_rcr(send, names, models["R"], models["CR"])
    return models, selection


def evaluate_on_sites(send: Send, model: dict) -> dict:
    """Each site scores its test rows with ``model``; pooled figures from their clinical summaries only."""
    summaries = [{k: v for k, v in reply.items() if k != "site_id"}
                 for reply in send({"op": "clinical_summary", "model": model})]
    return {"summaries": summaries, "test": pooled_figures(summaries),
            "figures": pooled_clinical_figures(summaries)}


def run_classical_models(send: Send, n_folds: int = 5, harmonize: bool = False,
                         protect: Sequence[str] = PROTECTED) -> dict:
    """Fit CR / R / RCR federated (``harmonize``: on radiomics harmonised by ComBat, keeping the effects
    of the clinical columns in ``protect``) and evaluate each on the sites' test rows.

    Returns {"sites": describe_sites(...) + "harmonized_columns" + "protected_covariates", "combat": the
    ComBat estimate or None, "selection": the R model's selection record or None,
    "models": {name: {"model": model dict,
    "summaries": [...], "test": pooled_figures, "figures": pooled_clinical_figures}}}.
    """
    sites = describe_sites(send)
    combat = estimate_radiomics_combat(send, sites, protect) if harmonize and sites["radiomic"] else None
    sites["harmonized_columns"] = combat["columns"] if combat else []
    sites["protected_covariates"] = [sites["names"][j] for j in combat["covariates"]] if combat else []
    if combat:
        send = with_fields(send, combat=combat)
    models, selection = fit_classical_models(send, sites, n_folds)
    return {"sites": sites, "combat": combat, "selection": selection,
            "models": {key: {"model": model, **evaluate_on_sites(send, model)} for key, model in models.items()}}


def results_json(result: dict) -> dict:
    """JSON-ready results of :func:`run_classical_models`: per model its features, coefficients (raw
    feature scale; nested input models included), pooled test figures and clinical figures; per site its counts."""
    return jsonable({"sites": result["sites"], "selection": result.get("selection"),
                     "models": {key: {**r["model"], "test": r["test"], "figures": r["figures"]}
                                for key, r in result["models"].items()}})
