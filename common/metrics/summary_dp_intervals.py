"""Intervals of pooled figures from DP site summaries that account for the Laplace noise.

DeLong's interval covers the sampling of the patients only; the noisy counts
of :mod:`common.metrics.summary_dp` add their own error. :func:`noise_spread`
estimates it by a parametric bootstrap over the noise: every released cell of
every site's grid (the cells released as 0 included: the grid is declared) gets
Laplace(1/epsilon) noise again, rounded and clipped at 0 as the release was, the
figure is recomputed on the pooled re-noised tables, and the standard deviation
over the replicates is the noise's standard error. This is post-processing of
released values: it costs no privacy, and its generator is seeded (the figures
of a pooling are reproducible). The AUC's interval is then the Wald interval
with both variances, se^2 = se_DeLong^2 + se_noise^2; the C-index gets the
noise's interval (Harrell's C has no closed-form variance here).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from numpy.typing import NDArray
from scipy.stats import norm

from hccfed.common.metrics.summaries import MODEL_KEYS, pool_summaries
from hccfed.common.metrics.summary_discrimination import auc_from_summary, cindex_from_summary
from hccfed.common.metrics.summary_dp import DPGrid

N_REPLICATES = 200


def _cells(values: NDArray, centres: NDArray) -> NDArray[np.intp]:
    return np.abs(np.asarray(values, dtype=float)[:, None] - centres[None, :]).argmin(axis=1)


def _renoise(counts: NDArray, epsilon: float, gen: np.random.Generator) -> NDArray[np.int64]:
    return np.maximum(np.rint(counts + gen.laplace(0.0, 1.0 / epsilon, size=counts.shape)), 0).astype(np.int64)


def renoised(tables: dict[str, NDArray], grid: DPGrid, epsilon: float, gen: np.random.Generator) -> dict:
    """One replicate: ``tables`` (a DP release on ``grid``) on the full grid, noised again."""
    out: dict[str, NDArray] = {}
    for prefix, centres in (("auc", grid._score_bin(np.zeros(0), grid.score_bins)[1]),
                            ("prob", grid._prob_bin(np.zeros(0))[1])):
        idx = _cells(tables[f"{prefix}_value"], centres)
        pos, neg = (np.bincount(idx, weights=tables[f"{prefix}_{k}"], minlength=centres.size) for k in ("pos", "neg"))
        pos, neg = _renoise(pos, epsilon, gen), _renoise(neg, epsilon, gen)
        keep = (pos + neg) > 0
        out.update({f"{prefix}_value": centres[keep], f"{prefix}_pos": pos[keep], f"{prefix}_neg": neg[keep]})
    upper = grid._time_bin(np.zeros(0))[1]
    centres = grid._score_bin(np.zeros(0), grid.survival_score_bins)[1]
    cells = _cells(tables["cidx_time"], upper) * centres.size + _cells(tables["cidx_score"], centres)
    size = upper.size * centres.size
    ev = np.bincount(cells, weights=tables["cidx_event"], minlength=size)
    cens = np.bincount(cells, weights=np.asarray(tables["cidx_all"]) - tables["cidx_event"], minlength=size)
    ev, cens = _renoise(ev, epsilon, gen), _renoise(cens, epsilon, gen)
    keep = np.flatnonzero((ev + cens) > 0)
    out.update({"cidx_time": upper[keep // centres.size], "cidx_score": centres[keep % centres.size],
                "cidx_event": ev[keep], "cidx_all": (ev + cens)[keep]})
    return {k: out[k] for k in MODEL_KEYS}


def noise_spread(site_tables: list[dict], grid: DPGrid, epsilons: list[float],
                 figure: Callable[[dict], float], n_replicates: int = N_REPLICATES, seed: int = 0) -> float:
    """Standard deviation of ``figure`` (of the pooled tables) over re-noised replicates."""
    gen = np.random.default_rng(seed)
    values = []
    for _ in range(n_replicates):
        try:
            values.append(figure(pool_summaries([renoised(t, grid, e, gen) for t, e in zip(site_tables, epsilons)],
                                                exact=False)))
        except ValueError:  # a replicate without both classes or comparable pairs: skip it
            continue
    if len(values) < n_replicates // 2:
        raise ValueError("too few usable replicates to estimate the noise's spread")
    return float(np.std(values, ddof=1))


def noise_aware_intervals(site_tables: list[dict], grid: DPGrid, epsilons: list[float], pooled: dict,
                          alpha: float = 0.05) -> dict[str, dict[str, float]]:
    """{"auc": {...}, "c_index": {...}}: the figure, the noise's standard error and an interval with it."""
    z = float(norm.ppf(1.0 - alpha / 2.0))
    auc = auc_from_summary(pooled, alpha)
    noise = noise_spread(site_tables, grid, epsilons, lambda m: auc_from_summary(m, alpha)["auc"])
    se = float(np.hypot(auc["se"], noise))
    c = cindex_from_summary(pooled)["c_index"]
    c_noise = noise_spread(site_tables, grid, epsilons, lambda m: cindex_from_summary(m)["c_index"])
    return {"auc": {"auc": auc["auc"], "se_sampling": auc["se"], "se_noise": noise, "se": se,
                    "ci_lower": max(0.0, auc["auc"] - z * se), "ci_upper": min(1.0, auc["auc"] + z * se)},
            "c_index": {"c_index": c, "se_noise": c_noise, "ci_lower": max(0.0, c - z * c_noise),
                        "ci_upper": min(1.0, c + z * c_noise)}}
