"""Logistic regression from additive site contributions: Newton / IRLS and penalised proximal Newton.

Design: features are standardised with pooled means / SDs (sent by the server)
and an intercept column is put first, so a coefficient vector has shape
(p + 1,) with the intercept at index 0. A site's contribution at ``beta`` is
the log-likelihood, its gradient (p+1,) and the negative Hessian
X^T W X (p+1, p+1), which add up over sites to the pooled ones exactly.

Penalty (glmnet / scikit-learn ``saga`` convention, intercept not penalised):
    objective(beta) = -loglik(beta) / N + lam * (l1_ratio * |w|_1 + (1 - l1_ratio) / 2 * |w|_2^2)
which is scikit-learn's ``LogisticRegression(C=1 / (N * lam), l1_ratio=...)``.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray


def design(x: ArrayLike, mean: ArrayLike, scale: ArrayLike) -> NDArray:
    """Intercept column then standardised features: (n, p) -> (n, p + 1)."""
    x = (np.asarray(x, dtype=float) - np.asarray(mean, dtype=float)) / np.asarray(scale, dtype=float)
    return np.column_stack([np.ones(len(x)), x])


def logistic_contribution(xd: NDArray, y: ArrayLike, beta: ArrayLike) -> dict[str, NDArray]:
    """Log-likelihood, gradient and negative Hessian of rows ``xd`` (n, p+1) with labels y in {0, 1}."""
    y = np.asarray(y, dtype=float)
    eta = xd @ np.asarray(beta, dtype=float)
    prob = 1.0 / (1.0 + np.exp(-eta))
    loglik = float(np.sum(y * eta - np.logaddexp(0.0, eta)))
    w = prob * (1.0 - prob)
    return {"n": np.array(float(len(y))), "loglik": np.array(loglik), "grad": xd.T @ (y - prob),
            "hess": (xd * w[:, None]).T @ xd}


def newton_step(total: dict[str, NDArray], beta: NDArray) -> NDArray:
    """The unpenalised Newton (IRLS) update from pooled gradient and negative Hessian."""
    return beta + np.linalg.solve(total["hess"], total["grad"])


def penalty(beta: NDArray, lam: float, l1_ratio: float) -> float:
    w = beta[1:]
    return float(lam * (l1_ratio * np.abs(w).sum() + 0.5 * (1.0 - l1_ratio) * (w ** 2).sum()))


def penalised_quadratic_step(total: dict[str, NDArray], beta: NDArray, lam: float, l1_ratio: float,
                             tol: float = 1e-13, max_sweeps: int = 10_000) -> NDArray:
    """Minimise the quadratic model of the objective around ``beta`` by coordinate descent.

    The quadratic model: -(grad)^T d / N + d^T H d / (2N) + penalty(beta + d), with
    the pooled ``grad``, ``hess`` and ``n``. Returns the minimiser beta + d.
    """
    n = float(total["n"])
    a = total["hess"] / n
    c = -total["grad"] / n
    new = beta.astype(float).copy()
    diag = np.diag(a)
    l1, l2 = lam * l1_ratio, lam * (1.0 - l1_ratio)
    for _ in range(max_sweeps):
        largest = 0.0
        for j in range(len(new)):
            slope = c[j] + a[j] @ (new - beta) - diag[j] * new[j]  # derivative without the j-th diagonal term
            if j == 0:
                value = -slope / diag[j]
            else:
                value = np.sign(-slope) * max(abs(slope) - l1, 0.0) / (diag[j] + l2)
            largest = max(largest, abs(value - new[j]))
            new[j] = value
        if largest < tol:
            break
    return new


def lambda_max(total_at_intercept: dict[str, NDArray], l1_ratio: float) -> float:
    """Smallest L1 penalty giving all-zero weights, from the gradient at the intercept-only fit."""
    return float(np.max(np.abs(total_at_intercept["grad"][1:])) / float(total_at_intercept["n"])
                 / max(l1_ratio, 1e-3))


def to_raw_scale(beta: NDArray, mean: NDArray, scale: NDArray) -> tuple[float, NDArray]:
    """Intercept and weights on the original feature scale from standardised coefficients."""
    w = beta[1:] / scale
    return float(beta[0] - w @ mean), w


def raw_scale_map(mean: ArrayLike, scale: ArrayLike) -> NDArray:
    """The linear map A (p+1, p+1) from standardised to raw coefficients (intercept first):
    raw = A @ beta_std, so cov_raw = A cov_std A^T."""
    mean, scale = np.asarray(mean, dtype=float), np.asarray(scale, dtype=float)
    a = np.zeros((len(mean) + 1, len(mean) + 1))
    a[0, 0] = 1.0
    a[0, 1:] = -mean / scale
    a[1:, 1:] = np.diag(1.0 / scale)
    return a


def odds_ratio_table(coef: NDArray, cov: NDArray, names: list[str], z: float = 1.959963984540054) -> list[dict]:
    """Rows of coefficient, SE, z, two-sided Wald p, odds ratio and its 95% CI, on the raw feature scale.

    ``coef`` (p+1,) and ``cov`` (p+1, p+1) with the intercept first; its row is named "(intercept)"
    and its "odds ratio" is the odds at all features 0. An odds ratio is per unit of the feature."""
    from scipy import stats

    se = np.sqrt(np.diag(cov))
    rows = []
    for name, b, s in zip(["(intercept)", *names], coef, se):
        rows.append({"feature": name, "coef": float(b), "se": float(s), "z": float(b / s),
                     "p": float(2 * stats.norm.sf(abs(b / s))), "odds_ratio": float(np.exp(b)),
                     "or_lower": float(np.exp(b - z * s)), "or_upper": float(np.exp(b + z * s))})
    return rows
