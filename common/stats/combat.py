"""ComBat harmonisation from summary statistics (Johnson et al. 2007; Fortin et al. 2018, neuroCombat).

The model, per feature: y = alpha_site + C beta + sigma (gamma_site + sqrt(delta_site) e), with
protected covariates C (n, q) (age, sex ... whose effects must survive harmonisation). It is
estimated in two rounds of site sums, with the same results as neuroCombat on the pooled rows:

1. location: each site sends, about a shift (the pooled mean of y, p,) and a covariate shift (the
   pooled mean of C, q,; only for the digits): n, sum_y (p,), sum_y2 (p,), sum_c (q,), C^T C (q, q),
   C^T y (q, p). The server solves the least-squares fit of y on [site indicators, C]; the grand
   mean is sum_s n_s alpha_s / N and sigma^2 the residual sum of squares / N (neuroCombat's
   ``var_pooled``); with a reference site, the grand mean is its alpha and sigma^2 its own residual
   sum of squares / n_ref.
2. site effects: each site standardises z = (y - grand - (C - c_shift) beta) / sigma and sends
   n, sum_z, sum_z2 (p,). The server estimates per site gamma_hat = mean z, delta_hat = var z
   (ddof 1) and shrinks them by empirical Bayes across the site's features: parametric (normal /
   inverse-gamma priors, iterated), non-parametric (the other features' estimates as an empirical
   prior, weighted by their likelihood), or none; ``mean_only`` fixes delta = 1.
   The site applies y* = sigma (z - gamma*) / sqrt(delta*) + grand + (C - c_shift) beta. A
   reference site's rows stay as they are (gamma* = 0, delta* = 1).

Choices kept from neuroCombat (and R's sva) so results can be compared with them: sigma^2 divides
by N; the parametric iteration stops when max(|change| / old value) < ``tol`` (signed denominators);
the parametric mean-only posterior uses n = 1 and delta = 1.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.special import logsumexp


def _covariates(covariates: ArrayLike | None, n: int, cshift: ArrayLike | None) -> NDArray:
    if covariates is None:
        return np.zeros((n, 0))
    c = np.asarray(covariates, dtype=float)
    if c.ndim != 2 or len(c) != n:
        raise ValueError(f"covariates must be (rows, covariates) with {n} rows, got shape {c.shape}")
    return c if cshift is None else c - np.asarray(cshift, dtype=float)


def location_contribution(y: ArrayLike, covariates: ArrayLike | None, shift: ArrayLike,
                          covariate_shift: ArrayLike | None = None) -> dict[str, NDArray]:
    """A site's sums for the location fit: rows ``y`` (n, p) about ``shift``, covariates (n, q) about theirs."""
    y = np.asarray(y, dtype=float) - np.asarray(shift, dtype=float)
    c = _covariates(covariates, len(y), covariate_shift)
    return {"n": np.array(float(len(y))), "sum_y": y.sum(axis=0), "sum_y2": (y ** 2).sum(axis=0),
            "sum_c": c.sum(axis=0), "ctc": c.T @ c, "cty": c.T @ y}


def _blocks(part: dict[str, NDArray], q: int, p: int) -> tuple[NDArray, NDArray]:
    """One site's [indicator, C] normal-equation blocks: D^T D (1 + q, 1 + q) and D^T y (1 + q, p)."""
    dtd = np.zeros((1 + q, 1 + q))
    dtd[0, 0] = float(part["n"])
    dtd[0, 1:] = dtd[1:, 0] = part["sum_c"]
    dtd[1:, 1:] = part["ctc"]
    return dtd, np.vstack([np.reshape(part["sum_y"], (1, p)), np.reshape(part["cty"], (q, p))])


def _rss(part: dict[str, NDArray], coef: NDArray, dtd: NDArray, dty: NDArray) -> NDArray:
    return part["sum_y2"] - 2 * np.einsum("ip,ip->p", coef, dty) + np.einsum("ip,ij,jp->p", coef, dtd, coef)


def fit_location(parts: list[dict[str, NDArray]], shift: ArrayLike, covariate_shift: ArrayLike | None = None,
                 reference: int | None = None) -> dict[str, NDArray]:
    """Grand mean (p,), covariate effects beta (q, p), sigma (p,) and the covariate shift (q,), from the
    sites' location sums (in site order; ``reference``: the index of the reference site)."""
    s, q, p = len(parts), np.shape(parts[0]["ctc"])[0], len(parts[0]["sum_y"])
    if reference is not None and not 0 <= reference < s:
        raise ValueError(f"reference site index {reference} is not among the {s} sites")
    dtd, dty = np.zeros((s + q, s + q)), np.zeros((s + q, p))
    blocks = [_blocks(part, q, p) for part in parts]
    for i, (d, y) in enumerate(blocks):
        index = [i, *range(s, s + q)]
        dtd[np.ix_(index, index)] += d
        dty[index] += y
    coef = np.linalg.solve(dtd, dty)  # (s + q, p): site intercepts, then beta
    n_s = np.array([float(part["n"]) for part in parts])
    if reference is None:
        grand = n_s @ coef[:s] / n_s.sum()
        rss, n = _rss({"sum_y2": np.sum([part["sum_y2"] for part in parts], axis=0)}, coef, dtd, dty), n_s.sum()
    else:
        grand = coef[reference]
        own = np.vstack([coef[reference], coef[s:]])
        rss, n = _rss(parts[reference], own, *blocks[reference]), n_s[reference]
    variance = rss / n
    level = np.abs(grand + np.asarray(shift, dtype=float))
    flat = np.flatnonzero(~((variance > 0) & (variance > 1e-28 * level ** 2)))  # constant up to rounding
    if len(flat):
        raise ValueError(f"ComBat: feature column(s) {flat.tolist()} have no residual variance "
                         f"{'at the reference site' if reference is not None else 'across the sites'}; leave them out")
    cshift = np.zeros(q) if covariate_shift is None else np.asarray(covariate_shift, dtype=float)
    return {"grand": grand + np.asarray(shift, dtype=float), "beta": coef[s:], "sigma": np.sqrt(variance),
            "covariate_shift": cshift}


def _fitted(n: int, covariates: ArrayLike | None, fit: dict[str, NDArray]) -> NDArray:
    c = _covariates(covariates, n, fit.get("covariate_shift"))
    return fit["grand"] + c @ np.asarray(fit["beta"], dtype=float).reshape(c.shape[1], len(fit["sigma"]))


def standardise(y: ArrayLike, covariates: ArrayLike | None, fit: dict[str, NDArray]) -> NDArray:
    """z = (y - grand - C beta) / sigma, rows (n, p)."""
    y = np.asarray(y, dtype=float)
    return (y - _fitted(len(y), covariates, fit)) / fit["sigma"]


def moments_contribution(z: NDArray) -> dict[str, NDArray]:
    """What a site sends for its site effects: n, sum z (p,), sum z^2 (p,)."""
    return {"n": np.array(float(len(z))), "sum_z": z.sum(axis=0), "sum_z2": (z ** 2).sum(axis=0)}


def _site_estimates(n: float, sum_z: NDArray, sum_z2: NDArray) -> tuple[NDArray, NDArray]:
    if n < 2:
        raise ValueError(f"ComBat needs at least 2 rows per site to estimate its scale, got {n:g}")
    gamma_hat = sum_z / n
    return gamma_hat, (sum_z2 - n * gamma_hat ** 2) / (n - 1)


def _inverse_gamma_prior(delta_hat: NDArray) -> tuple[float, float]:
    """neuroCombat's ``aprior`` and ``bprior`` (method of moments over the site's features)."""
    m, s2 = delta_hat.mean(), delta_hat.var(ddof=1)
    return (2 * s2 + m ** 2) / s2, (m * s2 + m ** 3) / s2


def parametric_eb(n: float, sum_z: NDArray, sum_z2: NDArray, mean_only: bool = False, tol: float = 1e-4,
                  max_iter: int = 10_000) -> tuple[NDArray, NDArray]:
    """ComBat's parametric shrunk site location gamma* and scale delta* (p,) from one site's sums of z."""
    gamma_hat, delta_hat = _site_estimates(n, sum_z, sum_z2)
    gamma_bar, tau2 = gamma_hat.mean(), gamma_hat.var(ddof=1)
    if mean_only:
        return (tau2 * gamma_hat + gamma_bar) / (tau2 + 1.0), np.ones_like(gamma_hat)
    a, b = _inverse_gamma_prior(delta_hat)
    gamma, delta = gamma_hat.copy(), delta_hat.copy()
    for _ in range(max_iter):
        gamma_new = (tau2 * n * gamma_hat + delta * gamma_bar) / (tau2 * n + delta)
        ss = sum_z2 - 2 * gamma_new * sum_z + n * gamma_new ** 2
        delta_new = (0.5 * ss + b) / (n / 2.0 + a - 1.0)
        change = max(np.max(np.abs(gamma_new - gamma) / gamma), np.max(np.abs(delta_new - delta) / delta))
        gamma, delta = gamma_new, delta_new
        if change <= tol:
            return gamma, delta
    raise RuntimeError(f"ComBat's parametric empirical Bayes did not converge in {max_iter} iterations")


def non_parametric_eb(n: float, sum_z: NDArray, sum_z2: NDArray, mean_only: bool = False
                      ) -> tuple[NDArray, NDArray]:
    """ComBat's non-parametric gamma*, delta* (p,): for each feature, the other features' (gamma_hat,
    delta_hat) weighted by the likelihood of this feature's z under them (in logs, so no underflow)."""
    gamma_hat, delta_hat = _site_estimates(n, sum_z, sum_z2)
    if mean_only:
        delta_hat = np.ones_like(delta_hat)
    # log likelihood of feature i's z under (gamma_j, delta_j): (p, p), rows i, columns j
    ss = sum_z2[:, None] - 2 * gamma_hat[None, :] * sum_z[:, None] + n * gamma_hat[None, :] ** 2
    loglik = -0.5 * n * np.log(2 * np.pi * delta_hat)[None, :] - ss / (2 * delta_hat[None, :])
    np.fill_diagonal(loglik, -np.inf)  # the feature's own estimate is not part of its prior
    weights = np.exp(loglik - logsumexp(loglik, axis=1, keepdims=True))
    return weights @ gamma_hat, weights @ delta_hat


def site_adjustment(n: float, sum_z: NDArray, sum_z2: NDArray, parametric: bool = True, mean_only: bool = False,
                    eb: bool = True, tol: float = 1e-4) -> tuple[NDArray, NDArray]:
    """One site's gamma*, delta* (p,): empirical Bayes (parametric or not) or, ``eb=False``, the raw estimates."""
    sum_z, sum_z2 = np.asarray(sum_z, dtype=float), np.asarray(sum_z2, dtype=float)
    if eb and len(sum_z) < 2:
        raise ValueError("ComBat's empirical Bayes pools information across features: it needs at least 2")
    if not eb:
        gamma_hat, delta_hat = _site_estimates(n, sum_z, sum_z2)
        return gamma_hat, np.ones_like(delta_hat) if mean_only else delta_hat
    if parametric:
        return parametric_eb(n, sum_z, sum_z2, mean_only, tol)
    return non_parametric_eb(n, sum_z, sum_z2, mean_only)


def apply_combat(y: ArrayLike, covariates: ArrayLike | None, fit: dict[str, NDArray], gamma: NDArray,
                 delta: NDArray) -> NDArray:
    """Harmonised rows (n, p) of one site."""
    y = np.asarray(y, dtype=float)
    fitted = _fitted(len(y), covariates, fit)
    z = (y - fitted) / fit["sigma"]
    return fit["sigma"] * (z - np.asarray(gamma)) / np.sqrt(np.asarray(delta)) + fitted
