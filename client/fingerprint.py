"""A site's fingerprint: the aggregates the server plans the federation from (``hccfed.common.plan``).

As nnU-Net's dataset fingerprint, read before any preprocessing: for every patient that passes the
checks without images, its volumes are read and checked (``hccfed.client.image_checks.load_patient``)
and summarised (voxel spacing of the mask's phase, the largest tumour's extent and volume, intensity
percentiles of each phase); per patient it is cached under the site's cache folder, keyed by the
patient's files. What leaves the site is :func:`aggregate`: counts, and, when at least
``MIN_FINGERPRINT_PATIENTS`` patients were read, the 5th / 50th / 95th percentiles across patients
(never a minimum or maximum, which would be one patient's value).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from hccfed.client.image_checks import PatientJob, load_patient
from hccfed.client.prepare import largest_tumour
from hccfed.client.prepare_cache import patient_key
from hccfed.client.qc import PatientQCError
from hccfed.client.site_validation import run_parallel, screen_site
from hccfed.common.atomic_io import atomic_write_text
from hccfed.common.plan import MIN_FINGERPRINT_PATIENTS
from hccfed.common.schema import PHASES
from hccfed.common.site_config import Preprocessing, SiteConfig

log = logging.getLogger("hccfed.fingerprint")
FINGERPRINT_VERSION = "1"


def patient_fingerprint(job: PatientJob) -> dict[str, Any] | None:
    """One patient's summary (spacings in mm, tumour extent in mm and volume in ml, intensity
    percentiles per phase), or None when its volumes fail a check (preparation will list why)."""
    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(1)
    try:
        volumes = load_patient(job)
    except PatientQCError:
        return None
    spacing = volumes.images[job.mask_phase].GetSpacing()
    _, extent = largest_tumour(volumes.mask)
    tumour = sitk.GetArrayViewFromImage(volumes.mask) > 0
    voxel_ml = float(np.prod(volumes.mask.GetSpacing())) / 1000.0
    intensity = {}
    for phase in PHASES:
        values = sitk.GetArrayViewFromImage(volumes.images[phase])
        p01, p50, p99 = np.percentile(values, [0.5, 50, 99.5])
        intensity[phase] = {"p0.5": float(p01), "p50": float(p50), "p99.5": float(p99)}
    return {"in_plane_mm": float(min(spacing[0], spacing[1])), "through_plane_mm": float(spacing[2]),
            "tumour_extent_mm": float(np.max(extent)), "tumour_volume_ml": float(tumour.sum() * voxel_ml),
            "intensity": intensity}


def _cached(config: SiteConfig, job: PatientJob) -> tuple[Path, dict | None, bool]:
    key = patient_key(dataclasses.replace(job, prep=Preprocessing()))  # the files only: the plan comes later
    path = config.cache_dir / "fingerprint" / f"v{FINGERPRINT_VERSION}-{key}.json"
    if path.exists():
        return path, json.loads(path.read_text())["value"], True
    return path, None, False


def site_fingerprint(config: SiteConfig, workers: int | None = 1, progress: bool = False) -> dict[str, Any]:
    """The site's fingerprint (:func:`aggregate` of every screened patient's summary)."""
    screening = screen_site(config)
    values, todo = [], []
    for job in screening.jobs:
        path, value, found = _cached(config, job)
        if found:
            values.append(value)
        else:
            todo.append((job, path))
    with tqdm(total=len(todo), desc=f"fingerprint {config.site_id}", unit="patient", disable=not progress) as bar:
        fresh = run_parallel(patient_fingerprint, [job for job, _ in todo], workers, bar)
    for (_, path), value in zip(todo, fresh):
        atomic_write_text(path, json.dumps({"value": value}))
        values.append(value)
    return aggregate(config.site_id, values, len(screening.excluded))


def _quantiles(values: list[float]) -> dict[str, float]:
    p05, p50, p95 = np.percentile(np.asarray(values, dtype=float), [5, 50, 95])
    return {"p05": float(p05), "p50": float(p50), "p95": float(p95)}


def aggregate(site_id: str, values: list[dict | None], n_excluded: int = 0) -> dict[str, Any]:
    """What the site sends: counts (patients excluded by the checks without images, patients read,
    patients whose volumes passed), and the percentiles across patients when there are enough of them."""
    usable = [v for v in values if v is not None]
    out: dict[str, Any] = {"site_id": site_id, "version": FINGERPRINT_VERSION, "n_excluded": int(n_excluded),
                           "n_screened": len(values), "n_usable": len(usable)}
    if len(usable) < MIN_FINGERPRINT_PATIENTS:
        out["note"] = (f"fewer than {MIN_FINGERPRINT_PATIENTS} readable patients: counts only, so that no "
                       "percentile is one patient's value")
        return out
    out["spacing_mm"] = {"in_plane": _quantiles([v["in_plane_mm"] for v in usable]),
                         "through_plane": _quantiles([v["through_plane_mm"] for v in usable])}
    out["tumour_extent_mm"] = _quantiles([v["tumour_extent_mm"] for v in usable])
    out["tumour_volume_ml"] = _quantiles([v["tumour_volume_ml"] for v in usable])
    out["intensity"] = {phase: {k: float(np.median([v["intensity"][phase][k] for v in usable]))
                                for k in ("p0.5", "p50", "p99.5")} for phase in PHASES}
    return out
