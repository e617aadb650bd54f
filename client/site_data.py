"""A site's train / validation / test splits, or the pooled splits of several sites.

One code path serves federated, centralized and local-only training (as in
FLamby): ``site_split`` gives one hospital's split (``hccfed.client.site.Site.split``
calls it), ``pooled_split`` the union of several hospitals' same splits, so every
model is tested on the same patients.
The split is drawn at the site, stratified by the early-recurrence label, from
the run's seed and the site's id: it needs nothing from other sites.

Federated cross-validation (run option ``cv-folds``) works on the site's
*development* patients, its training and validation splits together
(``"dev"``): :func:`cv_folds` cuts them into K folds, again stratified and drawn
at the site, and ``cv_split_name(k, K, "train")`` / ``(k, K, "val")`` name fold
k's training part (the other folds) and its held-out part. The test split is
never in a fold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from hccfed.client.prepare import PreparedSite
from hccfed.common.seeds import derive_seed
from hccfed.common.splits import DEV, parse_cv_split

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.50, 0.15, 0.35)


@dataclass
class SplitData:
    """Tensors of one split. images (n, C, D, H, W) float32, clinical (n, F) float32."""

    images: torch.Tensor
    clinical: torch.Tensor
    labels: torch.Tensor
    times: torch.Tensor
    events: torch.Tensor
    patient_ids: np.ndarray
    site_ids: np.ndarray
    radiomics: torch.Tensor | None = None  # (n, R) float32 when the model takes radiomics

    def __len__(self) -> int:
        return len(self.patient_ids)


def split_indices(site, seed: int, fractions=DEFAULT_FRACTIONS) -> dict[str, np.ndarray]:
    """Indices of each split of a site's patients (anything with ``site_id`` and ``labels``: a
    PreparedSite or the clinical rows), stratified by label (1 / 0 / unknown), sorted."""
    if not np.isclose(sum(fractions), 1.0) or min(fractions) < 0:
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {fractions}")
    rng = np.random.default_rng(derive_seed(seed, site.site_id))
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    for label in (1, 0, -1):
        members = np.flatnonzero(site.labels == label)
        members = members[rng.permutation(len(members))]
        cuts = np.round(np.cumsum(fractions)[:-1] * len(members)).astype(int)
        for name, chunk in zip(SPLITS, np.split(members, cuts)):
            parts[name].append(chunk)
    return {name: np.sort(np.concatenate(chunks)) for name, chunks in parts.items()}


def cv_folds(site, seed: int, folds: int) -> list[np.ndarray]:
    """The site's development patients (training + validation split) cut into ``folds`` folds, stratified
    by label (1 / 0 / unknown) from the run's seed and the site's id; each fold's row indices, sorted.
    Every development patient is in exactly one fold; a fold may be small at a small site (the site's
    privacy.min_cell_size then refuses to release its tables, which stops the run with that reason)."""
    if folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {folds}")
    dev = split_rows(site, DEV, seed)
    rng = np.random.default_rng(derive_seed(seed, site.site_id, "cv-folds", folds))
    parts: list[list[np.ndarray]] = [[] for _ in range(folds)]
    offset = 0
    for label in (1, 0, -1):
        members = dev[np.asarray(site.labels)[dev] == label]
        members = members[rng.permutation(len(members))]
        # deal the members out in turn, continuing where the last label stopped, so the folds' sizes differ by
        # at most one patient overall as well as within each label
        for i, member in enumerate(members):
            parts[(offset + i) % folds].append(np.atleast_1d(member))
        offset += len(members)
    return [np.sort(np.concatenate(p)) if p else np.array([], dtype=int) for p in parts]


#: Every patient of a site: what an external (held-out) hospital tests a model on.
ALL = "all"


def split_rows(site, split: str, seed: int) -> np.ndarray:
    """Row indices of ``split``: "train", "val", "test", "dev" (train + val), "all", or a
    :func:`cv_split_name`; anything else is refused, naming the choices."""
    if split == ALL:
        return np.arange(len(site.patient_ids))
    if split in SPLITS:
        return split_indices(site, seed)[split]
    if split == DEV:
        splits = split_indices(site, seed)
        return np.sort(np.concatenate([splits["train"], splits["val"]]))
    cv = parse_cv_split(split)
    if cv is None:
        raise ValueError(f"split must be one of {(*SPLITS, DEV, ALL)} or cv-<k>-of-<K>-train|val, got {split!r}")
    fold, folds, part = cv
    parts = cv_folds(site, seed, folds)
    if part == "val":
        return parts[fold - 1]
    return np.sort(np.concatenate([p for i, p in enumerate(parts) if i != fold - 1]))


def site_split(site: PreparedSite, split: str, seed: int) -> SplitData:
    """One split of one site (:func:`split_rows`' names), or all its patients with ``split="all"``."""
    idx = split_rows(site, split, seed)
    return SplitData(
        images=torch.from_numpy(site.images[idx].astype(np.float32)),
        clinical=torch.from_numpy(site.clinical[idx]),
        labels=torch.from_numpy(site.labels[idx]),
        times=torch.from_numpy(site.times[idx].astype(np.float32)),
        events=torch.from_numpy(site.events[idx]),
        patient_ids=site.patient_ids[idx],
        site_ids=np.full(len(idx), site.site_id),
        radiomics=None if site.radiomics is None else torch.from_numpy(site.radiomics[idx].astype(np.float32)),
    )


def pooled_split(parts: Sequence[SplitData]) -> SplitData:
    """Several sites' same split, concatenated (the centralized reference)."""
    return SplitData(
        images=torch.cat([p.images for p in parts]),
        clinical=torch.cat([p.clinical for p in parts]),
        labels=torch.cat([p.labels for p in parts]),
        times=torch.cat([p.times for p in parts]),
        events=torch.cat([p.events for p in parts]),
        patient_ids=np.concatenate([p.patient_ids for p in parts]),
        site_ids=np.concatenate([p.site_ids for p in parts]),
        radiomics=(None if any(p.radiomics is None for p in parts)
                   else torch.cat([p.radiomics for p in parts])),
    )
