"""The radiomics a fusion model takes, read at the site from its cached extraction.

The run names the features (``RunConfig.radiomics_features``, e.g. those the
federated R model selected); each site takes them from its own radiomics table
(:func:`client.radiomics.extract_site`, cached per patient) and standardises
each against its own patients (mean 0, SD 1): a per-site location and scale
harmonization, which removes scanner offsets the way ComBat's location / scale
terms do, without its empirical-Bayes shrinkage. A patient whose extraction
failed gets 0 (the site's mean) for every feature, so no patient is dropped
(the extraction's own log names each failure).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from hccfed.client.prepare import PreparedSite
from hccfed.client.radiomics import extract_site
from hccfed.common.site_config import SiteConfig


def attach_radiomics(site: PreparedSite, config: SiteConfig, names: Sequence[str], params: str = "fast",
                     workers: int | None = None) -> PreparedSite:
    """A copy of ``site`` whose ``radiomics`` holds ``names`` (n, len(names)) float32, standardised."""
    if not names:
        return site
    if config.site_id != site.site_id:
        raise ValueError(f"site {site.site_id}: radiomics requested with the YAML of {config.site_id}")
    patients = [str(p) for p in site.patient_ids]
    table = extract_site(config, params, workers=workers, progress=False, patient_ids=patients)
    missing = [n for n in names if n not in table.names]
    if missing:
        raise ValueError(f"site {site.site_id}: the run asks for radiomics features its extraction "
                         f"({params}) does not give: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    columns = [table.names.index(n) for n in names]
    row_of = {str(p): i for i, p in enumerate(table.patient_ids)}
    values = np.full((len(patients), len(names)), np.nan)
    for i, pid in enumerate(patients):
        if pid in row_of:
            values[i] = table.values[row_of[pid], columns]
    known = np.all(np.isfinite(values), axis=1)
    if known.sum() < 2:
        raise ValueError(f"site {site.site_id}: radiomics available for {int(known.sum())} patient(s); "
                         f"failures: {list(table.failed.items())[:3]}")
    mean, sd = values[known].mean(axis=0), values[known].std(axis=0, ddof=1)
    standardised = np.where(known[:, None], (values - mean) / np.where(sd > 0, sd, 1.0), 0.0)
    return dataclasses.replace(site, radiomics=standardised.astype(np.float32))
