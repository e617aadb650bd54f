"""Pooled ComBat on all rows at once, the slow obvious reference the federated ComBat is tested against.

The algorithm of Johnson, Li & Rabinovic (Biostatistics 2007) as neuroCombat (Fortin et al.,
NeuroImage 2018; the Python package, v0.2.12) implements it, written out here step by step on the
pooled rows (n, p) with the design matrix, the residuals and the per-site likelihoods computed
directly, never from sums:

- design = [one-hot site, protected covariates]; with a reference site its indicator column is
  all ones (an intercept), so its coefficient is the reference site's intercept;
- grand mean = sum_s n_s / N * B_site (or the reference's), stand_mean = grand + C B_cov;
  var_pooled = mean of squared residuals over all rows (or over the reference site's rows);
- z = (y - stand_mean) / sqrt(var_pooled); gamma_hat by least squares of z on the site design,
  delta_hat = var(z, ddof=1) per site (1 when mean only);
- parametric EB: gamma_bar, tau^2 = var(gamma_hat, ddof=1); inverse-gamma a, b by moments of
  delta_hat; iterate postmean / postvar while max(|new - old| / old) > tol;
  mean only: postmean with n = 1 and delta = 1, as neuroCombat and sva do;
- non-parametric EB: per feature, the other features' (gamma_hat, delta_hat) weighted by the
  normal likelihood of the feature's z;
- adjusted = (z - gamma*) / sqrt(delta*) * sqrt(var_pooled) + stand_mean; a reference site's rows
  are returned unchanged.
"""

from __future__ import annotations

import math

import numpy as np


def pooled_combat(y, site, covariates=None, parametric=True, mean_only=False, eb=True, reference=None,
                  tol=1e-4, order=None):
    """Harmonised rows (n, p). ``site`` (n,) labels; ``order`` the site order (default sorted)."""
    y = np.asarray(y, dtype=float)
    site = np.asarray(site)
    levels = list(order) if order is not None else sorted(set(site.tolist()))
    n, p = y.shape
    onehot = np.column_stack([(site == level).astype(float) for level in levels])
    ref = None if reference is None else levels.index(reference)
    if ref is not None:
        onehot[:, ref] = 1.0
    c = np.zeros((n, 0)) if covariates is None else np.asarray(covariates, dtype=float)
    design = np.column_stack([onehot, c])
    b_hat = np.linalg.lstsq(design, y, rcond=None)[0]  # (sites + q, p)
    k = len(levels)
    counts = np.array([(site == level).sum() for level in levels], dtype=float)
    grand = b_hat[ref] if ref is not None else counts / n @ b_hat[:k]
    stand_mean = grand + c @ b_hat[k:]
    residual = y - design @ b_hat
    rows = slice(None) if ref is None else site == levels[ref]
    var_pooled = (residual[rows] ** 2).mean(axis=0)
    z = (y - stand_mean) / np.sqrt(var_pooled)

    gamma_hat = np.linalg.lstsq(onehot, z, rcond=None)[0]  # (sites, p)
    members = [np.flatnonzero(site == level) for level in levels]
    delta_hat = [np.ones(p) if mean_only else z[idx].var(axis=0, ddof=1) for idx in members]
    gamma_star, delta_star = [], []
    for i, idx in enumerate(members):
        g_hat, d_hat = gamma_hat[i], delta_hat[i]
        if i == ref:  # replaced by 0 and 1 below (its own estimates may be degenerate: z has its scale)
            g, d = g_hat, d_hat
        elif not eb:
            g, d = g_hat, d_hat
        elif parametric:
            g, d = _parametric(z[idx], g_hat, d_hat, mean_only, tol)
        else:
            g, d = _non_parametric(z[idx], g_hat, d_hat)
        gamma_star.append(g)
        delta_star.append(d)
    if ref is not None:
        gamma_star[ref], delta_star[ref] = np.zeros(p), np.ones(p)

    out = np.empty_like(y)
    for i, idx in enumerate(members):
        # a row of the site design picks its own gamma (and the reference's, which is 0)
        shifted = z[idx] - onehot[idx] @ np.array(gamma_star)
        out[idx] = shifted / np.sqrt(delta_star[i]) * np.sqrt(var_pooled) + stand_mean[idx]
    if ref is not None:
        out[members[ref]] = y[members[ref]]
    return out


def _parametric(zs, g_hat, d_hat, mean_only, tol):
    g_bar, t2 = g_hat.mean(), g_hat.var(ddof=1)
    if mean_only:
        return (t2 * 1 * g_hat + 1 * g_bar) / (t2 * 1 + 1), np.ones_like(g_hat)
    m, s2 = d_hat.mean(), d_hat.var(ddof=1)
    a, b = (2 * s2 + m ** 2) / s2, (m * s2 + m ** 3) / s2
    n = zs.shape[0]
    g_old, d_old = g_hat.copy(), d_hat.copy()
    change = 1.0
    while change > tol:
        g_new = (t2 * n * g_hat + d_old * g_bar) / (t2 * n + d_old)
        sum2 = ((zs - g_new) ** 2).sum(axis=0)
        d_new = (0.5 * sum2 + b) / (n / 2.0 + a - 1.0)
        change = max((abs(g_new - g_old) / g_old).max(), (abs(d_new - d_old) / d_old).max())
        g_old, d_old = g_new, d_new
    return g_new, d_new


def _non_parametric(zs, g_hat, d_hat):
    n, p = zs.shape
    gamma, delta = np.empty(p), np.empty(p)
    for i in range(p):
        g, d = np.delete(g_hat, i), np.delete(d_hat, i)
        sum2 = ((zs[:, i][:, None] - g[None, :]) ** 2).sum(axis=0)
        likelihood = 1 / (2 * math.pi * d) ** (n / 2) * np.exp(-sum2 / (2 * d))
        gamma[i] = (g * likelihood).sum() / likelihood.sum()
        delta[i] = (d * likelihood).sum() / likelihood.sum()
    return gamma, delta
