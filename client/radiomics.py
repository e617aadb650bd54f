"""Radiomics of every phase for the tumour and the peritumoral ring (pyradiomics, cached).

Per patient: read each phase and the tumour mask (``client.ingest``), resample
each phase onto the mask's grid (the mask is drawn on ``mask_phase``), build the
peritumoral ring (voxels within ``ring_mm`` mm of the tumour, by binary dilation
with an ellipsoid of ``ring_mm`` in physical units, minus the tumour), and run
pyradiomics with a parameter file (``common/radiomics_params.yaml``, IBSI-style,
or ``radiomics_params_fast.yaml`` for tests and the CPU demo) on both regions.
Features are named ``<phase>_<region>_<pyradiomics name>`` with region
"tumour" or "ring", e.g. ``arterial_ring_original_glcm_Contrast``. Shape
features depend on the mask only, so they are computed once, on ``mask_phase``.

A second reader is simulated for the reproducibility (ICC) filter by
:func:`perturb_mask` (erosion, dilation or contour noise, seeded per patient).

Patients run in a process pool (ITK pinned to one thread per process) with a
progress bar; each patient's features are cached under
``cache_dir/radiomics`` keyed by a hash of its files (path, size, mtime), the
parameter file's text, the ring width and the perturbation, so a second run
with nothing changed reads them back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from concurrent.futures import ProcessPoolExecutor
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from tqdm import tqdm

from hccfed.client.image_checks import binary_tumour
from hccfed.client.ingest import read_volume
from hccfed.client.manifest import read_manifest
from hccfed.common.site_config import MaskLabels, SiteConfig
from hccfed.common.schema import PHASES

RADIOMICS_VERSION = "1"
PARAMS_DIR = Path(__file__).resolve().parent.parent / "common"
PARAM_FILES = {"full": PARAMS_DIR / "radiomics_params.yaml", "fast": PARAMS_DIR / "radiomics_params_fast.yaml"}
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


def resolve_params(params: str | Path) -> Path:
    """"full", "fast" or a path to a pyradiomics YAML parameter file."""
    path = PARAM_FILES.get(str(params), Path(params))
    if not Path(path).exists():
        raise FileNotFoundError(f"radiomics parameter file {path} not found (use 'full', 'fast' or a path)")
    return Path(path)


def ball(radius_mm: float, spacing_zyx: tuple[float, ...]) -> np.ndarray:
    """Ellipsoidal structuring element of ``radius_mm`` on a grid of ``spacing_zyx`` (mm)."""
    half = [max(1, int(np.floor(radius_mm / s))) for s in spacing_zyx]
    grids = np.meshgrid(*[np.arange(-h, h + 1) * s for h, s in zip(half, spacing_zyx)], indexing="ij")
    return sum(g ** 2 for g in grids) <= radius_mm ** 2 + 1e-9


def ring_mask(tumour: np.ndarray, ring_mm: float, spacing_zyx: tuple[float, ...]) -> np.ndarray:
    """Peritumoral ring: voxels within ``ring_mm`` mm of the tumour, outside it (bool, same shape)."""
    return ndimage.binary_dilation(tumour, structure=ball(ring_mm, spacing_zyx)) & ~tumour


def perturb_mask(tumour: np.ndarray, rng: np.random.Generator, mode: str | None = None) -> np.ndarray:
    """A second reader's mask: one-voxel erosion or dilation, or noise on the contour.

    ``mode`` None draws one of :data:`PERTURBATIONS` from ``rng``. Contour noise
    flips each boundary voxel (inside or outside) with probability 0.3. Never empties the mask.
    """
    mode = mode or PERTURBATIONS[rng.integers(len(PERTURBATIONS))]
    structure = ndimage.generate_binary_structure(3, 1)
    if mode == "erode":
        out = ndimage.binary_erosion(tumour, structure)
    elif mode == "dilate":
        out = ndimage.binary_dilation(tumour, structure)
    elif mode == "contour_noise":
        boundary = ndimage.binary_dilation(tumour, structure) & ~ndimage.binary_erosion(tumour, structure)
        flip = boundary & (rng.random(tumour.shape) < 0.3)
        out = tumour ^ flip
    else:
        raise ValueError(f"perturbation must be one of {PERTURBATIONS}, got {mode!r}")
    return out if out.sum() >= 8 else tumour


def _region_image(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.CopyInformation(reference)
    return image


def _crop_to_tumour(mask: sitk.Image, tumour: np.ndarray, margin_mm: float) -> sitk.Image:
    """The mask cropped to the tumour's bounding box plus ``margin_mm`` on every side (within the image)."""
    spacing_xyz = np.array(mask.GetSpacing())
    nz = np.argwhere(tumour)[:, ::-1]  # (x, y, z) indices
    pad = np.ceil(margin_mm / spacing_xyz).astype(int)
    lower = np.maximum(nz.min(axis=0) - pad, 0)
    upper = np.minimum(nz.max(axis=0) + pad + 1, np.array(mask.GetSize()))
    return sitk.RegionOfInterest(mask, [int(v) for v in upper - lower], [int(v) for v in lower])


def extract_patient(job: RadiomicsJob) -> dict[str, float]:
    """Features of one patient, ``{<phase>_<region>_<feature>: value}``. Raises on unreadable input."""
    from radiomics import featureextractor

    logging.getLogger("radiomics").setLevel(logging.ERROR)
    mask, _ = read_volume(job.mask_path, "mask")
    mask = binary_tumour(mask, job.mask_labels, "mask", job.mask_path)  # the tumour labels only, as prepare
    spacing_zyx = tuple(reversed(mask.GetSpacing()))
    tumour = sitk.GetArrayFromImage(mask) > 0
    if not tumour.any():
        raise ValueError(f"patient {job.patient_id}: the tumour mask {job.mask_path} is empty")
    mask = _crop_to_tumour(mask, tumour, job.ring_mm + 10.0)  # everything below runs on the box only
    tumour = sitk.GetArrayFromImage(mask) > 0
    if job.perturb_seed is not None:
        digest = hashlib.sha256(f"{job.perturb_seed}:{job.patient_id}".encode()).digest()
        tumour = perturb_mask(tumour, np.random.default_rng(int.from_bytes(digest[:8], "little")))
    regions = {"tumour": _region_image(tumour, mask),
               "ring": _region_image(ring_mask(tumour, job.ring_mm, spacing_zyx), mask)}
    extractor = featureextractor.RadiomicsFeatureExtractor(str(job.params_path))
    # shape depends on the mask only (the same for every phase) and is most of the cost: once, on mask_phase
    no_shape = featureextractor.RadiomicsFeatureExtractor(str(job.params_path))
    no_shape.enabledFeatures.pop("shape", None)
    no_shape.enabledFeatures.pop("shape2D", None)
    features: dict[str, float] = {}
    for phase, path, field in zip(PHASES, job.phase_paths, job.phase_fields):
        image, _ = read_volume(path, field)
        image = sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), mask, sitk.Transform(), sitk.sitkLinear, 0.0)
        for region, region_mask in regions.items():
            result = (extractor if phase == job.mask_phase else no_shape).execute(image, region_mask, label=1)
            for key, value in result.items():
                if not key.startswith("diagnostics_"):
                    features[f"{phase}_{region}_{key}"] = float(value)
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
    digest.update(RADIOMICS_VERSION.encode())
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
                entry.parent.mkdir(parents=True, exist_ok=True)
                tmp = entry.with_suffix(".tmp")
                tmp.write_text(json.dumps(features))
                os.replace(tmp, entry)
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
