"""ComBat harmonisation (Johnson et al. 2007, parametric empirical Bayes) from summary statistics.

Step 1 (pooled location / scale): each site sends, about a shift, n, sum_y (p,),
sum_y2 (p,), and for covariates C (n, q): sum_c (q,), C^T C (q, q), C^T y (q, p).
The server fits y = alpha_site + C beta by least squares on these sums, takes
the grand mean = sum_s n_s alpha_s / N and the pooled residual variance.
Step 2 (site effects): each site standardises z = (y - grand - C beta) / sigma and
sends n, sum z, sum z^2 (p,). The server turns them into gamma_hat / delta_hat
and shrinks them with the priors ComBat estimates across features within each
site; the site applies y* = sigma (z - gamma*) / sqrt(delta*) + grand + C beta.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray


def location_contribution(y: ArrayLike, covariates: ArrayLike | None, shift: ArrayLike) -> dict[str, NDArray]:
    y = np.asarray(y, dtype=float) - np.asarray(shift, dtype=float)
    c = np.zeros((len(y), 0)) if covariates is None else np.asarray(covariates, dtype=float)
    return {"n": np.array(float(len(y))), "sum_y": y.sum(axis=0), "sum_y2": (y ** 2).sum(axis=0),
            "sum_c": c.sum(axis=0), "ctc": c.T @ c, "cty": c.T @ y}


def fit_location(parts: list[dict[str, NDArray]], shift: ArrayLike) -> dict[str, NDArray]:
    """Grand mean (p,), covariate effects (q, p) and pooled SD (p,) from the sites' location sums."""
    s = len(parts)
    q = parts[0]["ctc"].shape[0]
    dim = s + q
    dtd = np.zeros((dim, dim))
    dty = np.zeros((dim, len(parts[0]["sum_y"])))
    n_s = np.array([float(p["n"]) for p in parts])
    for i, part in enumerate(parts):
        dtd[i, i] = n_s[i]
        dtd[i, s:] = dtd[s:, i] = part["sum_c"]
        dtd[s:, s:] += part["ctc"]
        dty[i] = part["sum_y"]
        dty[s:] += part["cty"]
    coef = np.linalg.solve(dtd, dty)  # (s + q, p)
    n = n_s.sum()
    sum_y2 = np.sum([p["sum_y2"] for p in parts], axis=0)
    rss = sum_y2 - 2 * np.einsum("ip,ip->p", coef, dty) + np.einsum("ip,ij,jp->p", coef, dtd, coef)
    grand = n_s @ coef[:s] / n
    return {"grand": grand + np.asarray(shift, dtype=float), "beta": coef[s:],
            "sigma": np.sqrt(np.maximum(rss / n, 1e-300))}


def standardise(y: ArrayLike, covariates: ArrayLike | None, fit: dict[str, NDArray]) -> NDArray:
    y = np.asarray(y, dtype=float)
    fitted = fit["grand"] + (0.0 if covariates is None else np.asarray(covariates, dtype=float) @ fit["beta"])
    return (y - fitted) / fit["sigma"]


def _aprior(delta: NDArray) -> float:
    m, s2 = delta.mean(), delta.var(ddof=1)
    return (2 * s2 + m ** 2) / s2


def _bprior(delta: NDArray) -> float:
    m, s2 = delta.mean(), delta.var(ddof=1)
    return (m * s2 + m ** 3) / s2


def empirical_bayes(n: float, sum_z: NDArray, sum_z2: NDArray, tol: float = 1e-4, max_iter: int = 1000
                    ) -> tuple[NDArray, NDArray]:
    """ComBat's shrunk site location gamma* and scale delta* (p,) from one site's sums of z."""
    gamma_hat = sum_z / n
    delta_hat = (sum_z2 - n * gamma_hat ** 2) / (n - 1)
    gamma_bar, tau2 = gamma_hat.mean(), gamma_hat.var(ddof=1)
    a, b = _aprior(delta_hat), _bprior(delta_hat)
    gamma, delta = gamma_hat.copy(), delta_hat.copy()
    for _ in range(max_iter):
        gamma_new = (n * tau2 * gamma_hat + delta * gamma_bar) / (n * tau2 + delta)
        ss = sum_z2 - 2 * gamma_new * sum_z + n * gamma_new ** 2
        delta_new = (b + 0.5 * ss) / (n / 2.0 + a - 1.0)
        change = max(np.max(np.abs(gamma_new - gamma) / np.abs(gamma).clip(1e-12)),
                     np.max(np.abs(delta_new - delta) / delta))
        gamma, delta = gamma_new, delta_new
        if change < tol:
            break
    return gamma, delta


def apply_combat(y: ArrayLike, covariates: ArrayLike | None, fit: dict[str, NDArray], gamma: NDArray,
                 delta: NDArray) -> NDArray:
    """Harmonised rows of one site."""
    z = standardise(y, covariates, fit)
    fitted = fit["grand"] + (0.0 if covariates is None else np.asarray(covariates, dtype=float) @ fit["beta"])
    return fit["sigma"] * (z - gamma) / np.sqrt(delta) + fitted
