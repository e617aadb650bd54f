"""The server side of the federated statistics: orchestration over a ``send`` callable.

Every function takes ``send(request: dict) -> list[dict]`` (one reply per site,
the site side is :meth:`client.stats_site.StatsSite.handle`), so the same code
runs in-process in tests and over Flower query messages in a deployment. The
server only ever sees what the sites return: counts, sums, sums of squares and
cross-products, gradients and Hessians, per-time-bin risk-set sums.
Columns are indices into the sites' common feature list.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from hccfed.common.stats import combat, cox, icc, moments, regression, screening

Send = Callable[[dict], list[dict]]


def _total(replies: list[dict], key: str | None = None) -> dict[str, np.ndarray]:
    parts = [r if key is None else r[key] for r in replies]
    return moments.add_contributions([{k: v for k, v in p.items() if k != "site_id"} for p in parts])


# ------------------------------------------------------------------ moments and screening

def federated_mean_sd(send: Send, columns=None, labelled: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Pooled mean and SD (ddof=1) per feature, in two rounds (the second about the first's mean)."""
    rough, _ = moments.mean_var(_total(send({"op": "moments", "columns": columns, "labelled": labelled}), "all"))
    total = _total(send({"op": "moments", "columns": columns, "labelled": labelled, "shift": rough}), "all")
    mean, var = moments.mean_var(total, shift=rough)
    sd = np.sqrt(var)
    return mean, np.where(sd > 0, sd, 1.0)


def federated_ttests(send: Send, columns=None, equal_var: bool = True) -> dict[str, np.ndarray]:
    """Per-feature t test (Student or Welch) of label 1 vs 0 over all sites' labelled patients:
    t, p, df, and the class means mean_pos / mean_neg (p,)."""
    shift, _ = federated_mean_sd(send, columns, labelled=True)
    replies = send({"op": "moments", "columns": columns, "labelled": True, "by_label": True, "shift": shift})
    out = screening.two_sample_tests(_total(replies, "pos"), _total(replies, "neg"), equal_var)
    return {**out, "mean_pos": out["mean_pos"] + shift, "mean_neg": out["mean_neg"] + shift}  # sums were about shift


def federated_correlation(send: Send, columns=None, labelled: bool = False) -> np.ndarray:
    """Pooled Pearson correlation matrix (p, p) from per-site centred cross-products."""
    shift, _ = federated_mean_sd(send, columns, labelled)
    replies = send({"op": "moments", "columns": columns, "labelled": labelled, "shift": shift, "cross": True})
    return moments.correlation(_total(replies, "all"))


def federated_correlation_filter(send: Send, columns, order, threshold: float = 0.8) -> np.ndarray:
    """Columns kept by the greedy |r| <= threshold filter (seed 003), walking ``order`` (positions in columns)."""
    corr = federated_correlation(send, columns, labelled=True)
    kept = screening.correlation_filter(corr, order, threshold)
    return np.asarray(columns)[kept] if columns is not None else kept


# ------------------------------------------------------------------ logistic regression

def _logistic_round(send: Send, beta, columns, mean, scale, fold=None, part="train") -> dict[str, np.ndarray]:
    return _total(send({"op": "logistic", "beta": beta, "columns": columns, "mean": mean, "scale": scale,
                        "fold": fold, "part": part}))


def federated_logistic(send: Send, columns=None, names: list[str] | None = None, tol: float = 1e-10,
                       max_iter: int = 50) -> dict:
    """Unpenalised logistic regression by Newton / IRLS on pooled gradients and Hessians.

    Returns intercept and coef (raw feature scale), se (raw scale, intercept first), cov (raw scale,
    (p+1, p+1), intercept first), table (per row: coef, SE, z, Wald p, odds ratio with its 95% CI,
    per unit of the raw feature), beta_std (standardised, intercept first), cov_std (inverse pooled
    Hessian), loglik, n_iter, n (labelled patients), mean and scale used.
    """
    mean, scale = federated_mean_sd(send, columns, labelled=True)
    beta = np.zeros(len(mean) + 1)
    total = _logistic_round(send, beta, columns, mean, scale)
    for iteration in range(1, max_iter + 1):
        step = np.linalg.solve(total["hess"], total["grad"])
        t = 1.0
        while True:
            candidate = _logistic_round(send, beta + t * step, columns, mean, scale)
            if candidate["loglik"] >= total["loglik"] - 1e-12 or t < 1e-6:
                break
            t /= 2
        beta, total = beta + t * step, candidate
        if np.max(np.abs(t * step)) < tol:
            break
    intercept, coef = regression.to_raw_scale(beta, mean, scale)
    cov_std = np.linalg.inv(total["hess"])
    a = regression.raw_scale_map(mean, scale)
    cov = a @ cov_std @ a.T
    names = names or [f"x{j}" for j in range(len(coef))]
    return {"intercept": intercept, "coef": coef, "se": np.sqrt(np.diag(cov)), "cov": cov,
            "table": regression.odds_ratio_table(np.concatenate([[intercept], coef]), cov, names),
            "beta_std": beta, "cov_std": cov_std, "loglik": float(total["loglik"]), "n_iter": iteration,
            "n": float(total["n"]), "mean": mean, "scale": scale}


def _objective(total, beta, lam, l1_ratio) -> float:
    return -float(total["loglik"]) / float(total["n"]) + regression.penalty(beta, lam, l1_ratio)


def fit_elastic_net(send: Send, lam: float, l1_ratio: float, columns, mean, scale, fold=None,
                    beta0=None, tol: float = 1e-10, max_iter: int = 100) -> np.ndarray:
    """Penalised logistic fit (standardised coefficients, intercept first) by proximal Newton.

    Each iteration: sites send gradient and Hessian at beta; the server minimises
    the penalised quadratic model by coordinate descent and backtracks on the
    true objective (one more round per trial point).
    """
    beta = np.zeros(len(mean) + 1) if beta0 is None else np.asarray(beta0, dtype=float).copy()
    total = _logistic_round(send, beta, columns, mean, scale, fold)
    objective = _objective(total, beta, lam, l1_ratio)
    for _ in range(max_iter):
        direction = regression.penalised_quadratic_step(total, beta, lam, l1_ratio) - beta
        t = 1.0
        while True:
            candidate = _logistic_round(send, beta + t * direction, columns, mean, scale, fold)
            cand_obj = _objective(candidate, beta + t * direction, lam, l1_ratio)
            if cand_obj <= objective + 1e-15 or t < 1e-8:
                break
            t /= 2
        beta, total, objective = beta + t * direction, candidate, cand_obj
        if np.max(np.abs(t * direction)) < tol:
            break
    return beta


def federated_elastic_net_cv(send: Send, columns=None, l1_ratio: float = 1.0, n_lambdas: int = 12,
                             lambda_ratio: float = 0.02, n_folds: int = 5) -> dict:
    """LASSO / elastic-net logistic regression with the penalty chosen by federated K-fold CV.

    Each site holds its own folds (``StatsSite.n_folds`` must equal ``n_folds``);
    for each fold and penalty the model is fitted on the other folds of every
    site and scored by the summed validation deviance of that fold. Features are
    standardised once with the pooled labelled means / SDs. Returns the path,
    mean CV deviance per penalty, the chosen ``lam``, and the refit on all rows.
    """
    mean, scale = federated_mean_sd(send, columns, labelled=True)
    p = len(mean)
    # intercept-only fit gives the gradient that sets lambda_max
    beta0 = fit_elastic_net(send, 1e9, 1.0, columns, mean, scale)
    lam_max = regression.lambda_max(_logistic_round(send, beta0, columns, mean, scale), l1_ratio)
    lambdas = lam_max * np.logspace(0.0, np.log10(lambda_ratio), n_lambdas)
    deviance = np.zeros(n_lambdas)
    n_valid = 0.0
    for fold in range(n_folds):
        beta = np.zeros(p + 1)
        for k, lam in enumerate(lambdas):
            beta = fit_elastic_net(send, lam, l1_ratio, columns, mean, scale, fold=fold, beta0=beta)
            valid = _logistic_round(send, beta, columns, mean, scale, fold, part="valid")
            deviance[k] += -2.0 * float(valid["loglik"])
            n_valid += float(valid["n"]) if k == 0 else 0.0
    best = int(np.argmin(deviance))
    beta = np.zeros(p + 1)
    for lam in lambdas[: best + 1]:  # warm-started path down to the chosen penalty
        beta = fit_elastic_net(send, lam, l1_ratio, columns, mean, scale, beta0=beta)
    intercept, coef = regression.to_raw_scale(beta, mean, scale)
    return {"lambdas": lambdas, "cv_deviance": deviance / n_valid, "lam": float(lambdas[best]),
            "beta_std": beta, "intercept": intercept, "coef": coef, "mean": mean, "scale": scale,
            "selected": np.flatnonzero(beta[1:] != 0)}


# ------------------------------------------------------------------ Cox regression

def federated_event_grid(send: Send, width: float = 0.1, max_months: float = 240.0) -> np.ndarray:
    """Grid bins (integers, time = bin * width) holding at least one event at some site."""
    counts = np.sum([r["counts"] for r in send({"op": "event_histogram", "width": width,
                                                "max_months": max_months})], axis=0)
    return np.flatnonzero(counts > 0)


def federated_cox(send: Send, columns=None, names: list[str] | None = None, ties: str = "efron",
                  width: float = 0.1, max_months: float = 240.0, tol: float = 1e-10, max_iter: int = 50) -> dict:
    """Cox model by Newton on pooled per-event-time risk-set sums; Efron (lifelines' default) or Breslow ties.

    Returns coef / se on the raw feature scale, the hazard-ratio table (HR, 95% CI, p),
    the log partial likelihood and the number of Newton iterations.
    """
    grid = federated_event_grid(send, width, max_months)
    mean, scale = federated_mean_sd(send, columns)

    def evaluate(beta):
        replies = send({"op": "cox", "beta": beta, "columns": columns, "mean": mean, "scale": scale,
                        "grid": grid, "width": width})
        return cox.partial_likelihood(_total(replies), beta, ties)

    beta = np.zeros(len(mean))
    loglik, grad, hess = evaluate(beta)
    for iteration in range(1, max_iter + 1):
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while True:
            new = evaluate(beta + t * step)
            if new[0] >= loglik - 1e-12 or t < 1e-6:
                break
            t /= 2
        beta = beta + t * step
        loglik, grad, hess = new
        if np.max(np.abs(t * step)) < tol:
            break
    coef = beta / scale
    cov = np.linalg.inv(hess) / np.outer(scale, scale)
    names = names or [f"x{j}" for j in range(len(coef))]
    return {"coef": coef, "se": np.sqrt(np.diag(cov)), "cov": cov, "loglik": loglik, "n_iter": iteration,
            "table": cox.hazard_ratio_table(coef, cov, names), "n_event_times": len(grid)}


# ------------------------------------------------------------------ reproducibility and harmonisation

def federated_icc(send: Send, columns=None, kind: str = "icc3", threshold: float = 0.75) -> dict:
    """ICC per feature between the sites' two readers (original / perturbed mask); kept = ICC > threshold."""
    shift, _ = federated_mean_sd(send, columns)
    values = icc.icc_from_sums(_total(send({"op": "icc", "columns": columns, "shift": shift})), kind)
    return {"icc": values, "kept": np.flatnonzero(values > threshold)}


def estimate_combat(send: Send, columns=None, covariates=None, parametric: bool = True, mean_only: bool = False,
                    eb: bool = True, reference: str | None = None, tol: float = 1e-4) -> dict:
    """ComBat of the sites' features (``columns``: those only; indices; default every column but the
    covariates) from per-site sums, as
    neuroCombat computes it on the pooled rows (:mod:`common.stats.combat`); nothing changes at the sites.

    ``covariates``: column indices of the protected covariates (numeric; categorical ones one-hot
    without their first level), whose effects are kept. ``parametric`` / ``mean_only`` / ``eb``:
    neuroCombat's variants. ``reference``: the site id whose rows stay unchanged and define the grand
    mean and scale. Returns {"fit": grand (p,), beta (q, p), sigma (p,), covariate_shift (q,),
    "site_params": {site_id: gamma*, delta* (p,)}, "columns", "covariates", "reference", "method"}.
    """
    covariates = [int(c) for c in covariates] if covariates else []
    if columns is None:  # every feature but the covariates
        columns = [j for j in range(len(federated_mean_sd(send)[0])) if j not in covariates]
    overlap = sorted(set(columns) & set(covariates))
    if overlap:
        raise ValueError(f"ComBat: column(s) {overlap} are both harmonised and protected covariates")
    shift, _ = federated_mean_sd(send, columns)
    covariate_shift = federated_mean_sd(send, covariates)[0] if covariates else None
    location = send({"op": "combat_location", "shift": shift, "columns": columns, "covariates": covariates,
                     "covariate_shift": covariate_shift})
    site_ids = [str(r["site_id"]) for r in location]
    if reference is not None and reference not in site_ids:
        raise ValueError(f"ComBat reference site {reference!r} is not among the sites {site_ids}")
    fit = combat.fit_location([{k: v for k, v in r.items() if k != "site_id"} for r in location], shift,
                              covariate_shift, None if reference is None else site_ids.index(reference))
    params = {}
    for reply in send({"op": "combat_moments", "fit": fit, "columns": columns, "covariates": covariates}):
        site = str(reply["site_id"])
        if site == reference:
            p = len(fit["sigma"])
            params[site] = {"gamma": np.zeros(p), "delta": np.ones(p)}
            continue
        gamma, delta = combat.site_adjustment(float(reply["n"]), reply["sum_z"], reply["sum_z2"], parametric,
                                              mean_only, eb, tol)
        params[site] = {"gamma": np.asarray(gamma), "delta": np.asarray(delta)}
    return {"fit": fit, "site_params": params, "columns": columns, "covariates": covariates, "reference": reference,
            "method": {"parametric": bool(parametric), "mean_only": bool(mean_only), "eb": bool(eb)}}


def federated_combat(send: Send, columns=None, covariates=None, parametric: bool = True, mean_only: bool = False,
                     eb: bool = True, reference: str | None = None, tol: float = 1e-4) -> dict:
    """Harmonise every site's features (``columns``: those only) in place with ComBat
    (:func:`estimate_combat`'s options); returns the estimate."""
    estimate = estimate_combat(send, columns, covariates, parametric, mean_only, eb, reference, tol)
    send({"op": "combat_apply", **estimate})
    return estimate
