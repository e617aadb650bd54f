"""Radiomics of every phase for the tumour and the peritumoral ring (pyradiomics, cached).

Per patient: read the tumour mask (drawn on ``mask_phase``) and build the peritumoral
ring on the mask's whole grid (voxels within ``ring_mm`` mm of the tumour, by binary
dilation with an ellipsoid of ``ring_mm`` in physical units, minus the tumour); then for
each phase, as read, normalise it once over the whole image (the parameter file's
``normalize`` settings) and run pyradiomics (``common/radiomics_params.yaml``, IBSI-style,
or ``radiomics_params_fast.yaml`` for tests and the CPU demo) on both regions, with
:mod:`client.radiomics_features`. Nothing is cropped first: pyradiomics resamples on a grid
anchored at the mask image's corner and crops to each region itself, so every value equals
``RadiomicsFeatureExtractor(params).execute(phase file, region mask)`` on the whole image, and
does not depend on a margin or on where the tumour lies in the field of view (beyond the
interpolation grid's phase). Features are named ``<phase>_<region>_<pyradiomics name>`` with
region "tumour" or "ring", e.g. ``arterial_ring_original_glcm_Contrast``. Shape features
depend on the mask only, so they are computed once, on ``mask_phase``.

A second reader is simulated for the reproducibility (ICC) filter by
:func:`perturb_mask` (erosion, dilation or contour noise, seeded per patient).

Patients run in a process pool (ITK pinned to one thread per process) with a
progress bar; each patient's features are cached under
``cache_dir/radiomics`` keyed by a hash of the extraction's version, its files (path,
size, mtime), the parameter file's text, the ring width and the perturbation, so a
second run with nothing changed reads them back and a changed extraction never does.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ProcessPoolExecutor
import dataclasses
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from tqdm import tqdm

from hccfed.client.image_checks import binary_tumour
from hccfed.client.ingest import read_volume
from hccfed.client.manifest import read_manifest
from hccfed.client.radiomics_features import features_of, make_extractor, normalise_image, resolve_params
from hccfed.common.atomic_io import atomic_write_text
from hccfed.common.site_config import MaskLabels, SiteConfig
from hccfed.common.schema import PHASES

#: Part of every cache key: bump it whenever the extraction's output changes for the same inputs
#: ("2": the whole image, no crop, normalised once per phase; contour noise drawn on the boundary only).
RADIOMICS_VERSION = "2"
REGIONS = ("tumour", "ring")
PERTURBATIONS = ("erode", "dilate", "contour_noise")


@dataclass(frozen=True)
class RadiomicsJob:
    """What a worker needs for one patient (picklable)."""

    patient_id: str
    phase_paths: tuple[str, ...]  # in PHASES order
    phase_fields: tuple[str, ...]
    mask_path: str
    params_path: str
    ring_mm: float
    mask_phase: str = "portal"
    perturb_seed: int | None = None
    mask_labels: MaskLabels = dataclasses.field(default_factory=MaskLabels)  # the site's declared label semantics


@dataclass
class RadiomicsTable:
    """A site's radiomics: values (n_patients, n_features) float64, rows in ``patient_ids`` order.

    ``failed`` maps a patient id left out to the reason (message names the patient and file)."""

    site_id: str
    patient_ids: np.ndarray
    names: list[str]
    values: np.ndarray
    failed: dict[str, str]


def ball(radius_mm: float, spacing_zyx: tuple[float, ...]) -> np.ndarray:
    """Ellipsoidal structuring element of ``radius_mm`` on a grid of ``spacing_zyx`` (mm)."""
    half = [max(1, int(np.floor(radius_mm / s))) for s in spacing_zyx]
    grids = np.meshgrid(*[np.arange(-h, h + 1) * s for h, s in zip(half, spacing_zyx)], indexing="ij")
    return sum(g ** 2 for g in grids) <= radius_mm ** 2 + 1e-9


def ring_mask(tumour: np.ndarray, ring_mm: float, spacing_zyx: tuple[float, ...]) -> np.ndarray:
    """Peritumoral ring: voxels within ``ring_mm`` mm of the tumour, outside it (bool, same shape).

    The dilation runs on the tumour's box grown by the structuring element (what it can reach), so
    its cost does not grow with the field of view; the result is the same as on the whole grid."""
    structure = ball(ring_mm, spacing_zyx)
    reach = np.array(structure.shape) // 2
    nz = np.argwhere(tumour)
    if not len(nz):
        return np.zeros_like(tumour, dtype=bool)
    lower = np.maximum(nz.min(axis=0) - reach, 0)
    upper = np.minimum(nz.max(axis=0) + reach + 1, tumour.shape)
    box = tuple(slice(lo, hi) for lo, hi in zip(lower, upper))
    ring = np.zeros_like(tumour, dtype=bool)
    ring[box] = ndimage.binary_dilation(tumour[box], structure=structure) & ~tumour[box]
    return ring


def perturb_mask(tumour: np.ndarray, rng: np.random.Generator, mode: str | None = None) -> np.ndarray:
    """A second reader's mask: one-voxel erosion or dilation, or noise on the contour.

    ``mode`` None draws one of :data:`PERTURBATIONS` from ``rng``. Contour noise flips each boundary
    voxel (inside or outside) with probability 0.3, drawn over the boundary voxels only (in array
    order), so the draw does not depend on the field of view. Never empties the mask.
    """
    mode = mode or PERTURBATIONS[rng.integers(len(PERTURBATIONS))]
    structure = ndimage.generate_binary_structure(3, 1)
    if mode == "erode":
        out = ndimage.binary_erosion(tumour, structure)
    elif mode == "dilate":
        out = ndimage.binary_dilation(tumour, structure)
    elif mode == "contour_noise":
        boundary = ndimage.binary_dilation(tumour, structure) & ~ndimage.binary_erosion(tumour, structure)
        flip = np.zeros_like(boundary)
        flip[boundary] = rng.random(int(boundary.sum())) < 0.3
        out = tumour ^ flip
    else:
        raise ValueError(f"perturbation must be one of {PERTURBATIONS}, got {mode!r}")
    return out if out.sum() >= 8 else tumour


def _region_image(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.CopyInformation(reference)
    return image


def patient_regions(job: RadiomicsJob) -> dict[str, sitk.Image]:
    """The tumour (perturbed for a second reader) and ring masks of one patient, on the mask's whole grid."""
    mask, _ = read_volume(job.mask_path, "mask")
    mask = binary_tumour(mask, job.mask_labels, "mask", job.mask_path)  # the tumour labels only, as prepare
    tumour = sitk.GetArrayFromImage(mask) > 0
    if not tumour.any():
        raise ValueError(f"patient {job.patient_id}: the tumour mask {job.mask_path} is empty")
    if job.perturb_seed is not None:
        digest = hashlib.sha256(f"{job.perturb_seed}:{job.patient_id}".encode()).digest()
        tumour = perturb_mask(tumour, np.random.default_rng(int.from_bytes(digest[:8], "little")))
    spacing_zyx = tuple(reversed(mask.GetSpacing()))
    return {"tumour": _region_image(tumour, mask),
            "ring": _region_image(ring_mask(tumour, job.ring_mm, spacing_zyx), mask)}


def extract_patient(job: RadiomicsJob) -> dict[str, float]:
    """Features of one patient, ``{<phase>_<region>_<feature>: value}``. Raises on unreadable input."""
    regions = patient_regions(job)
    # normalise each phase once (not once per region); shape depends on the mask only: once, on mask_phase
    with_shape = make_extractor(job.params_path, shape=True, normalise=False)
    no_shape = make_extractor(job.params_path, shape=False, normalise=False)
    normalise = bool(make_extractor(job.params_path).settings.get("normalize", False))
    features: dict[str, float] = {}
    for phase, path, field in zip(PHASES, job.phase_paths, job.phase_fields):
        image, _ = read_volume(path, field)
        if normalise:
            image = normalise_image(image, with_shape.settings)
        extractor = with_shape if phase == job.mask_phase else no_shape
        for region, region_mask in regions.items():
            for key, value in features_of(extractor, image, region_mask).items():
                features[f"{phase}_{region}_{key}"] = value
    return features


def _file_stamp(path: str) -> str:
    p = Path(path)
    if p.is_dir():
        return "|".join(f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in sorted(p.iterdir()))
    stat = p.stat()
    return f"{p}:{stat.st_size}:{stat.st_mtime_ns}"


def job_key(job: RadiomicsJob) -> str:
    """Hash of everything one patient's features depend on."""
    digest = hashlib.sha256()
    digest.update(f"{RADIOMICS_VERSION}|pyradiomics {metadata.version('pyradiomics')}".encode())
    digest.update(Path(job.params_path).read_bytes())
    digest.update(f"{job.ring_mm}|{job.mask_phase}|{job.perturb_seed}|{job.phase_fields}".encode())
    digest.update(f"{job.mask_labels}".encode())
    for path in (*job.phase_paths, job.mask_path):
        digest.update(_file_stamp(path).encode())
    return digest.hexdigest()[:20]


def _entry(cache_dir: Path, job: RadiomicsJob) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", job.patient_id)
    return cache_dir / "radiomics" / f"{safe}-{job_key(job)}.json"


def _init_worker() -> None:
    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(1)  # one process per core scales; ITK threads do not


def _run_one(job: RadiomicsJob) -> tuple[str, dict[str, float] | None, str]:
    """Never raises: a failure becomes a reason naming the patient and the files."""
    try:
        return job.patient_id, extract_patient(job), ""
    except Exception as err:  # one bad patient must not stop the site
        files = ", ".join([job.mask_path, *job.phase_paths])
        return job.patient_id, None, (f"patient {job.patient_id}: radiomics failed ({type(err).__name__}: {err}); "
                                      f"files: {files}")


def site_jobs(config: SiteConfig, params: str | Path = "fast", perturb_seed: int | None = None,
              patient_ids: list[str] | None = None) -> list[RadiomicsJob]:
    """One job per manifest patient (or per listed patient), in manifest order."""
    manifest = read_manifest(config, strict=False)
    params_path = str(resolve_params(params))
    fields = tuple(config.phase_columns[p] for p in PHASES)
    wanted = None if patient_ids is None else set(patient_ids)
    return [RadiomicsJob(pid, tuple(str(manifest.image_paths[p][i]) for p in PHASES), fields,
                         str(manifest.mask_paths[i]), params_path, config.preprocessing.ring_mm, config.mask_phase,
                         perturb_seed, config.mask_labels)
            for i, pid in enumerate(manifest.patient_ids) if wanted is None or pid in wanted]


def extract_site(config: SiteConfig, params: str | Path = "fast", workers: int | None = None,
                 progress: bool = True, perturb_seed: int | None = None,
                 patient_ids: list[str] | None = None) -> RadiomicsTable:
    """Radiomics of a site's patients (cached). ``perturb_seed`` set: the simulated second reader."""
    jobs = site_jobs(config, params, perturb_seed, patient_ids)
    results: dict[str, dict[str, float]] = {}
    failed: dict[str, str] = {}
    todo = []
    for job in jobs:
        entry = _entry(config.cache_dir, job)
        if entry.exists():
            results[job.patient_id] = json.loads(entry.read_text())
        else:
            todo.append((job, entry))
    workers = min(workers or os.cpu_count() or 1, max(1, len(todo)))
    with tqdm(total=len(todo), desc=f"radiomics {config.site_id}", unit="patient", disable=not progress) as bar:
        if workers == 1:
            _init_worker()
            outputs = (_run_one(job) for job, _ in todo)
            pool = None
        else:
            pool = ProcessPoolExecutor(max_workers=workers, initializer=_init_worker)
            outputs = pool.map(_run_one, [job for job, _ in todo], chunksize=1)
        try:
            for (job, entry), (pid, features, reason) in zip(todo, outputs):
                bar.update()
                if features is None:
                    failed[pid] = reason
                    continue
                atomic_write_text(entry, json.dumps(features))
                results[pid] = features
        finally:
            if pool is not None:
                pool.shutdown()
    kept = [job.patient_id for job in jobs if job.patient_id in results]
    if not kept:
        raise RuntimeError(f"site {config.site_id}: radiomics failed for every patient; first reason: "
                           f"{next(iter(failed.values()), 'no patient in the manifest')}")
    names = sorted(results[kept[0]])
    for pid in kept:
        if sorted(results[pid]) != names:
            raise RuntimeError(f"site {config.site_id}: patient {pid} has a different feature set "
                               f"({len(results[pid])} vs {len(names)} features); clear {config.cache_dir / 'radiomics'}")
    values = np.array([[results[pid][n] for n in names] for pid in kept], dtype=float)
    return RadiomicsTable(config.site_id, np.array(kept), names, values, failed)
