"""A site's train / validation / test splits, or the pooled splits of several sites.

One code path serves federated, centralized and local-only training (as in
FLamby): ``site_split`` gives one hospital's split (``hccfed.client.site.Site.split``
calls it), ``pooled_split`` the union of several hospitals' same splits, so every
model is tested on the same patients.
The split is drawn at the site, stratified by the early-recurrence label, from
the run's seed and the site's id: it needs nothing from other sites.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from hccfed.client.prepare import PreparedSite
from hccfed.common.seeds import derive_seed

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


#: Every patient of a site: what an external (held-out) hospital tests a model on.
ALL = "all"


def site_split(site: PreparedSite, split: str, seed: int) -> SplitData:
    """One split of one site, or all its patients with ``split="all"``."""
    if split not in (*SPLITS, ALL):
        raise ValueError(f"split must be one of {(*SPLITS, ALL)}, got {split!r}")
    idx = np.arange(len(site.patient_ids)) if split == ALL else split_indices(site, seed)[split]
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
