"""The federated statistics from a notebook: one pandas DataFrame per site, no Flower.

Each call builds one :class:`client.stats_site.StatsSite` per DataFrame and runs the server's code
(:mod:`server.federated_stats`) against them in this process, so the numbers are the ones a real
federation computes from the sites' sums, and equal to the pooled ones::

    from hccfed.simulation.local_federation import LocalFederation
    fed = LocalFederation({"A": frame_a, "B": frame_b}, label="early", time="months", event="event")
    fed.logistic(["age", "afp"])            # coef, se, z, p, odds_ratio, or_lower, or_upper
    fed.cox(["age", "afp"])                 # coef, se, hr, hr_lower, hr_upper, z, p
    fed.ttest(["afp"]), fed.mean_sd(["afp"]), fed.correlation(["age", "afp"]), fed.lasso([...])
    harmonised = fed.combat(["f1", "f2"], covariates=["age", "sex"]).frames   # {site: DataFrame}

Columns: ``label`` 1 / 0 (an empty cell: no label, e.g. censored before the horizon; such rows are
left out of the logistic fits and t tests, and counted in ``n_unlabelled``), ``time`` (any unit)
and ``event`` 1 / 0 for Cox. Features must be numeric and complete: a missing or non-numeric value
stops with the site, the column and the row. ComBat's categorical covariates (strings, booleans,
pandas categories) are one-hot coded without their first level, over the levels of all sites.
Coefficients are per unit of each column as given. (This module sits in ``simulation/``, the layer
allowed to drive the site and the server code together in one process.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from hccfed.client.stats_site import StatsSite, local_send
from hccfed.server import federated_stats as fs


@dataclass
class Harmonised:
    """ComBat's output: each site's DataFrame with the features harmonised, and the estimate
    (pooled fit and each site's gamma*, delta*) the sites applied."""

    frames: dict[str, pd.DataFrame]
    estimate: dict


class LocalFederation:
    """Federated statistics over in-process sites, one DataFrame each (the frames are not changed)."""

    def __init__(self, frames: Mapping[str, pd.DataFrame], label: str | None = None, time: str | None = None,
                 event: str | None = None, n_folds: int = 5, seed: int = 0):
        if len(frames) < 1:
            raise ValueError("LocalFederation needs at least one site's DataFrame")
        self.frames = {str(k): v for k, v in frames.items()}
        self.label, self.time, self.event = label, time, event
        self.n_folds, self.seed = n_folds, seed
        for site, frame in self.frames.items():
            for column in (label, time, event):
                if column is not None and column not in frame.columns:
                    raise ValueError(f"site {site}: no column {column!r} (columns: {list(frame.columns)[:10]})")

    # ------------------------------------------------------------------ rows
    def _numeric(self, site: str, frame: pd.DataFrame, columns: Sequence[str]) -> np.ndarray:
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise ValueError(f"site {site}: no column(s) {missing}")
        out = np.empty((len(frame), len(columns)))
        for j, column in enumerate(columns):
            values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=float)
            bad = np.flatnonzero(~np.isfinite(values))
            if len(bad):
                raise ValueError(f"site {site}: column {column!r} has a missing or non-numeric value in row "
                                 f"{frame.index[bad[0]]!r} ({frame[column].tolist()[bad[0]]!r}); fill or drop it first")
            out[:, j] = values
        return out

    def _outcomes(self, site: str, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = len(frame)
        labels = np.full(n, -1, dtype=np.int64)
        if self.label is not None:
            raw = pd.to_numeric(frame[self.label], errors="coerce")
            known = raw.notna().to_numpy()
            wrong = known & ~raw.isin([0, 1]).to_numpy()
            if wrong.any():
                row = np.flatnonzero(wrong)[0]
                raise ValueError(f"site {site}: label {self.label!r} must be 1, 0 or empty, got "
                                 f"{frame[self.label].tolist()[row]!r} in row {frame.index[row]!r}")
            labels[known] = raw[known].to_numpy(dtype=np.int64)
        times = self._numeric(site, frame, [self.time])[:, 0] if self.time is not None else np.zeros(n)
        events = self._numeric(site, frame, [self.event])[:, 0] if self.event is not None else np.zeros(n)
        if not np.isin(events, (0, 1)).all():
            raise ValueError(f"site {site}: event {self.event!r} must be 1 or 0")
        return labels, times, events.astype(np.int64)

    def _sites(self, columns: Sequence[str], encoded: Mapping[str, np.ndarray] | None = None) -> list[StatsSite]:
        sites = []
        for site, frame in self.frames.items():
            x = self._numeric(site, frame, columns)
            if encoded is not None:
                x = np.column_stack([x, encoded[site]])
            labels, times, events = self._outcomes(site, frame)
            sites.append(StatsSite(site, x, [f"c{j}" for j in range(x.shape[1])], labels, times, events,
                                   n_folds=self.n_folds, seed=self.seed))
        return sites

    def _send(self, columns: Sequence[str]):
        return local_send(self._sites(list(columns)))

    def _require(self, what: str, *columns: str | None) -> None:
        if any(c is None for c in columns):
            raise ValueError(f"{what} needs the {'label' if what != 'cox' else 'time and event'} column(s): "
                             "give them to LocalFederation(...)")

    # ------------------------------------------------------------------ statistics
    def mean_sd(self, columns: Sequence[str]) -> pd.DataFrame:
        """Pooled mean and SD (ddof 1) of each column over every row of every site."""
        mean, sd = fs.federated_mean_sd(self._send(columns))
        return pd.DataFrame({"mean": mean, "sd": sd}, index=list(columns))

    def ttest(self, columns: Sequence[str], equal_var: bool = False) -> pd.DataFrame:
        """Per column, label 1 vs 0: Welch's (default) or Student's t test, as scipy.stats.ttest_ind."""
        self._require("ttest", self.label)
        res = fs.federated_ttests(self._send(columns), equal_var=equal_var)
        return pd.DataFrame({k: res[k] for k in ("mean_pos", "mean_neg", "t", "df", "p")}, index=list(columns))

    def correlation(self, columns: Sequence[str]) -> pd.DataFrame:
        """Pooled Pearson correlation matrix of the columns over every row."""
        return pd.DataFrame(fs.federated_correlation(self._send(columns)), index=list(columns), columns=list(columns))

    def logistic(self, columns: Sequence[str]) -> pd.DataFrame:
        """Logistic regression of the label on ``columns``: one row per term ("(intercept)" first) with
        coef, se, z, p (Wald) and odds_ratio with its 95% CI (or_lower, or_upper), per unit of each column.
        ``attrs``: n (labelled rows), n_unlabelled, loglik."""
        self._require("logistic", self.label)
        sites = self._sites(list(columns))
        fit = fs.federated_logistic(local_send(sites), names=list(columns))
        table = pd.DataFrame(fit["table"]).set_index("feature")
        table.attrs.update(n=int(fit["n"]), n_unlabelled=int(sum((s.labels < 0).sum() for s in sites)),
                           loglik=fit["loglik"])
        return table

    def cox(self, columns: Sequence[str], ties: str = "efron", width: float = 0.1) -> pd.DataFrame:
        """Cox model of (time, event) on ``columns``: coef, se, hr (hazard ratio per unit) with its 95%
        CI, z, p. Times are put on a grid of ``width`` (their unit; exact when recorded to that resolution)."""
        self._require("cox", self.time, self.event)
        max_time = max(float(pd.to_numeric(f[self.time]).max()) for f in self.frames.values())
        fit = fs.federated_cox(self._send(columns), names=list(columns), ties=ties, width=width,
                               max_months=float(np.ceil(max_time / width) * width))
        table = pd.DataFrame(fit["table"]).set_index("feature")
        table.attrs.update(loglik=fit["loglik"], n_event_times=fit["n_event_times"])
        return table

    def lasso(self, columns: Sequence[str], l1_ratio: float = 1.0, n_lambdas: int = 12) -> pd.DataFrame:
        """LASSO (elastic-net) logistic regression, penalty by federated cross-validation over each
        site's own folds (``n_folds``): coef per unit of each column (0: not selected). ``attrs``: lam, intercept."""
        self._require("lasso", self.label)
        res = fs.federated_elastic_net_cv(self._send(columns), l1_ratio=l1_ratio, n_lambdas=n_lambdas,
                                          n_folds=self.n_folds)
        table = pd.DataFrame({"coef": res["coef"], "selected": res["beta_std"][1:] != 0}, index=list(columns))
        table.attrs.update(lam=res["lam"], intercept=res["intercept"])
        return table

    def combat(self, features: Sequence[str], covariates: Sequence[str] = (), parametric: bool = True,
               mean_only: bool = False, eb: bool = True, reference: str | None = None) -> Harmonised:
        """ComBat of ``features`` across the sites, keeping the effects of ``covariates`` (numeric or
        categorical columns); neuroCombat's variants; ``reference``: a site whose rows stay unchanged."""
        features = list(features)
        encoded, _ = self._encode(list(covariates))
        sites = self._sites(features, encoded)
        q = next(iter(encoded.values())).shape[1]
        estimate = fs.federated_combat(local_send(sites), list(range(len(features))),
                                       list(range(len(features), len(features) + q)), parametric, mean_only, eb,
                                       reference)
        frames = {}
        for site in sites:
            frame = self.frames[site.site_id].copy()
            if site.site_id != reference:  # a reference site's frame is returned as it came
                frame[features] = site.features[:, :len(features)]
            frames[site.site_id] = frame
        return Harmonised(frames, estimate)

    def _encode(self, covariates: list[str]) -> tuple[dict[str, np.ndarray], list[str]]:
        """Each site's covariate matrix: numeric columns as they are, categorical ones one-hot without
        their first level (levels: sorted over all sites)."""
        names: list[str] = []
        blocks: dict[str, list[np.ndarray]] = {site: [] for site in self.frames}
        for column in covariates:
            for site, frame in self.frames.items():
                if column not in frame.columns:
                    raise ValueError(f"site {site}: no covariate column {column!r}")
            values = {site: frame[column] for site, frame in self.frames.items()}
            if all(pd.api.types.is_numeric_dtype(v) and not pd.api.types.is_bool_dtype(v) for v in values.values()):
                for site, frame in self.frames.items():
                    blocks[site].append(self._numeric(site, frame, [column]))
                names.append(column)
                continue
            for site, v in values.items():
                if v.isna().any():
                    raise ValueError(f"site {site}: covariate {column!r} has a missing value in row "
                                     f"{v.index[v.isna().to_numpy()][0]!r}")
            levels = sorted({str(x) for v in values.values() for x in v})
            for site, v in values.items():
                text = v.astype(str).to_numpy()
                blocks[site].append(np.column_stack([text == level for level in levels[1:]]).astype(float)
                                    if len(levels) > 1 else np.zeros((len(v), 0)))
            names += [f"{column}={level}" for level in levels[1:]]
        return {site: (np.column_stack(b) if b else np.zeros((len(self.frames[site]), 0)))
                for site, b in blocks.items()}, names
