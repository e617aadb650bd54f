"""Turn a site's manifest and volumes into model-ready, cached arrays.

Per patient (``prepare_patient``): read every phase and the tumour mask (NIfTI
files or DICOM series folders, ``client.ingest``), check them (non-empty mask,
tumour inside every phase), optionally correct the bias field (N4), rigidly
register every phase to the mask's phase (``client.registration``), find the
largest tumour and resample a cube of ``crop_voxels`` voxels centred on it:
either ``spacing_mm`` voxels (a fixed physical size, the default) or the
tumour's bounding box plus ``box_margin_mm`` (linear for images, nearest
neighbour for the mask). Each phase is normalised against the peritumoral ring
(``ring_mm`` wide, mostly liver) or the whole cube. The channels are the phases
in ``common.schema.PHASES`` order plus the mask.

Quality control: a patient whose manifest row, labs or volumes have a problem
is excluded and listed in the site's QC report (``client.qc``), written as
``qc_report.csv`` / ``qc_report.json`` in the cache folder; the other patients
are prepared. Only a bad configuration or an unusable manifest stops a site.

Cache, under the site's ``cache_dir`` (the hospital's data folder is only ever
read): one entry per patient keyed by a hash of that patient's files (path,
size, modification time; every file of a DICOM folder) and of the
preprocessing config, so a fixed or added patient is prepared alone; and the
assembled site keyed by the manifest, the lab config and every patient's key,
so a second run with nothing changed does no work.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from tqdm import tqdm

from hccfed.client.ingest import check_mask, check_overlap, read_volume
from hccfed.client.labs import clinical_features, harmonize_labs
from hccfed.client.manifest import Manifest, read_manifest
from hccfed.client.qc import PatientQCError, QCIssue, QCReport, check_labs
from hccfed.client.registration import register_rigid
from hccfed.common.site_config import Preprocessing, SiteConfig
from hccfed.common.schema import LABS, PHASES, clinical_feature_names, early_recurrence_label

PREPARE_VERSION = "3"


class PreparationError(RuntimeError):
    """A site could not be prepared at all (no patient passed QC); the message names the QC report."""


@dataclass
class PreparedSite:
    """A site's model-ready data. Arrays are indexed by prepared patient, in manifest order.

    images: (n, len(PHASES) + 1, D, H, W) float16, normalised phases then the mask.
    clinical: (n, n_features) float32, see ``client.labs.clinical_feature_names``.
    labels: (n,) int64 early-recurrence label, -1 when unknown.
    times: (n,) float64 months; events: (n,) int64.
    lab_categories: (n, n_labs) int64 Lower/Normal/Higher codes, for reporting.
    qc: the site's QC report (patients prepared, patients excluded and why); not an array.
    radiomics: (n, n_radiomics) float32 standardised features for the fusion model, or None
    (``client.site_radiomics.attach_radiomics``).
    """

    site_id: str
    patient_ids: np.ndarray
    images: np.ndarray
    clinical: np.ndarray
    clinical_names: list[str]
    labels: np.ndarray
    times: np.ndarray
    events: np.ndarray
    lab_categories: np.ndarray
    qc: QCReport | None = field(default=None, repr=False, compare=False)
    radiomics: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.patient_ids)


@dataclass(frozen=True)
class PatientJob:
    """What one worker needs to prepare one patient (picklable)."""

    patient_id: str
    phase_paths: tuple[str, ...]  # in PHASES order
    phase_fields: tuple[str, ...]  # the manifest columns they came from
    mask_path: str
    mask_field: str
    mask_phase: str
    prep: Preprocessing


@dataclass
class PatientResult:
    """A prepared cube, or None with the issues that excluded the patient (warnings either way)."""

    patient_id: str
    cube: np.ndarray | None
    issues: list[QCIssue]


def _largest_tumour(mask: sitk.Image) -> tuple[tuple[float, ...], np.ndarray]:
    """Physical centre (mm) and axis-aligned physical extent (mm) of the largest connected tumour."""
    components = sitk.ConnectedComponent(mask > 0)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(components)
    labels = stats.GetLabels()
    if not labels:
        raise PatientQCError("empty_mask", "the tumour mask is empty")
    largest = max(labels, key=stats.GetNumberOfPixels)
    box = stats.GetBoundingBox(largest)  # index start (3), size (3)
    start, size = np.array(box[:3]), np.array(box[3:])
    corners = np.array([mask.TransformContinuousIndexToPhysicalPoint([float(v) for v in start - 0.5 + size * bits])
                        for bits in np.ndindex(2, 2, 2)])
    return stats.GetCentroid(largest), corners.max(axis=0) - corners.min(axis=0)


def _crop_reference(centre: tuple[float, ...], prep: Preprocessing, extent_mm: np.ndarray | None = None
                    ) -> sitk.Image:
    """The crop cube: ``crop_voxels`` of ``spacing_mm``, or spanning the tumour box plus ``box_margin_mm``."""
    size = prep.crop_voxels
    spacing = prep.spacing_mm
    if prep.box_margin_mm is not None and extent_mm is not None:
        spacing = (float(np.max(extent_mm)) + 2 * prep.box_margin_mm) / size
    reference = sitk.Image([size] * 3, sitk.sitkFloat32)
    reference.SetSpacing([spacing] * 3)
    half = (size - 1) / 2.0 * spacing
    reference.SetOrigin([c - half for c in centre])
    return reference


def _zscore(array: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """Z-score ``array`` with the median and std of its voxels in ``reference`` (default: all)."""
    values = array[reference] if reference is not None and reference.any() else array
    centre = float(np.median(values)) if reference is not None else float(values.mean())
    std = float(values.std())
    return (array - centre) / (std if std > 1e-6 else 1.0)


def peritumoral_ring(mask: np.ndarray, width_voxels: int) -> np.ndarray:
    """Voxels within ``width_voxels`` (6-connected steps) outside the mask."""
    structure = ndimage.generate_binary_structure(3, 1)
    return ndimage.binary_dilation(mask, structure, iterations=max(1, width_voxels)) & ~mask


def n4_correct(image: sitk.Image, shrink: int = 2, iterations: tuple[int, ...] = (20, 20)) -> sitk.Image:
    """N4 bias-field correction (estimated on a shrunk copy, applied at full resolution), float32."""
    image = sitk.Cast(image, sitk.sitkFloat32)
    small = sitk.Shrink(image, [shrink] * 3)
    mask = sitk.OtsuThreshold(small, 0, 1, 200)
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations(list(iterations))
    corrector.Execute(small, mask)
    return image / sitk.Exp(corrector.GetLogBiasFieldAsImage(image))


def _resample_extended(image: sitk.Image, reference: sitk.Image, transform: sitk.Transform) -> sitk.Image:
    """Linear resampling onto ``reference``; voxels beyond the image take the nearest edge value
    (not 0, which would be an artificial dark band after normalisation, and would flip with a
    sub-millimetre change of the registration)."""
    resample = sitk.ResampleImageFilter()
    resample.SetReferenceImage(reference)
    resample.SetTransform(transform)
    resample.SetInterpolator(sitk.sitkLinear)
    resample.SetOutputPixelType(sitk.sitkFloat32)
    resample.SetUseNearestNeighborExtrapolator(True)
    return resample.Execute(image)


def prepare_patient(job: PatientJob) -> tuple[np.ndarray, list[str]]:
    """(cube of shape (len(PHASES) + 1, D, H, W) float16, warnings) for one patient.

    Raises ``PatientQCError`` (reason, field, file) when the patient cannot be prepared.
    """
    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(1)
    prep = job.prep
    warnings: list[str] = []
    mask, found = read_volume(job.mask_path, job.mask_field)
    warnings += found
    check_mask(mask, job.mask_field, job.mask_path)
    images = {}
    for phase, path, column in zip(PHASES, job.phase_paths, job.phase_fields):
        image, found = read_volume(path, column)
        warnings += found
        check_overlap(mask, image, column, path, job.mask_path)
        images[phase] = n4_correct(image) if prep.n4_bias_correction else sitk.Cast(image, sitk.sitkFloat32)
    centre, extent = _largest_tumour(mask)
    reference = _crop_reference(centre, prep, extent)
    spacing = reference.GetSpacing()[0]
    mask_cube = sitk.Resample(mask, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    mask_array = sitk.GetArrayFromImage(mask_cube) > 0
    if not mask_array.any():
        raise PatientQCError("mask_outside_image", f"the tumour of {job.mask_path} vanishes when resampled to "
                             f"{spacing:.2f} mm voxels; lower preprocessing.spacing_mm", job.mask_field, job.mask_path)
    ring = None
    if prep.normalisation == "zscore_ring":
        ring = peritumoral_ring(mask_array, int(round(prep.ring_mm / spacing)))
    fixed = images[job.mask_phase]
    channels = []
    for phase, path, column in zip(PHASES, job.phase_paths, job.phase_fields):
        transform = sitk.Transform()
        if prep.register and phase != job.mask_phase:
            transform = register_rigid(fixed, images[phase], centre, prep, column, path).transform
        cube = _resample_extended(images[phase], reference, transform)
        channels.append(_zscore(sitk.GetArrayFromImage(cube), ring))
    channels.append(mask_array.astype(np.float32))
    return np.stack(channels).astype(np.float16), warnings


def _prepare_one(job: PatientJob) -> PatientResult:
    """Prepare one patient; never raises: a failure becomes a QC issue naming the patient and files."""
    try:
        cube, warnings = prepare_patient(job)
    except PatientQCError as err:
        return PatientResult(job.patient_id, None, [err.issue(job.patient_id)])
    except Exception as err:  # an unexpected failure still excludes one patient only
        files = ", ".join([job.mask_path, *job.phase_paths])
        return PatientResult(job.patient_id, None, [QCIssue(
            job.patient_id, "preparation_failed", "", job.mask_path,
            f"patient {job.patient_id}: could not prepare the volumes ({type(err).__name__}: {err}); files: {files}")])
    issues = [QCIssue(job.patient_id, "dicom_series", "", "", f"patient {job.patient_id}: {w}", "warning")
              for w in warnings]
    return PatientResult(job.patient_id, cube, issues)


# ----------------------------------------------------------------------------- cache

def _file_stamps(path: Path) -> list[str]:
    """path|size|mtime of a file, or of every file under a folder (a DICOM series)."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    out = []
    for file in files:
        stat = file.stat()
        out.append(f"{file}|{stat.st_size}|{stat.st_mtime_ns}")
    return out


def patient_key(job: PatientJob) -> str:
    """Hash of everything one patient's cube depends on: its files and the preprocessing config."""
    digest = hashlib.sha256()
    digest.update(PREPARE_VERSION.encode())
    digest.update(json.dumps(asdict(job.prep), sort_keys=True).encode())
    digest.update(f"{job.mask_phase}|{job.phase_fields}|{job.mask_field}".encode())
    for path in (*job.phase_paths, job.mask_path):
        digest.update("\n".join(_file_stamps(Path(path))).encode())
    return digest.hexdigest()[:20]


def cache_key(config: SiteConfig, manifest: Manifest, patient_keys: list[str]) -> str:
    """Hash of everything the assembled site depends on."""
    digest = hashlib.sha256()
    digest.update(PREPARE_VERSION.encode())
    digest.update(json.dumps(asdict(config.preprocessing), sort_keys=True).encode())
    digest.update(json.dumps({k: asdict(v) for k, v in config.labs.items()}, sort_keys=True).encode())
    digest.update(config.manifest.read_bytes())
    digest.update("|".join(manifest.patient_ids).encode())
    digest.update("|".join(patient_keys).encode())
    return digest.hexdigest()[:20]


def _patient_entry(config: SiteConfig, patient_id: str, key: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", patient_id)
    return config.cache_dir / "patients" / f"{safe}-{key}.npz"


def _save_patient(path: Path, result: PatientResult) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    cube = result.cube if result.cube is not None else np.zeros((0,), np.float16)
    np.savez(tmp, cube=cube, ok=np.array(result.cube is not None),
             issues=np.array(json.dumps([asdict(i) for i in result.issues])))
    os.replace(tmp, path)


def _load_patient(path: Path, patient_id: str) -> PatientResult | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            cube = data["cube"] if bool(data["ok"]) else None
            issues = [QCIssue(**i) for i in json.loads(str(data["issues"]))]
    except (OSError, ValueError, KeyError):
        return None  # unreadable entry: prepare again
    return PatientResult(patient_id, cube, issues)


def _save(path: Path, site: PreparedSite) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    arrays = {k: v for k, v in vars(site).items() if isinstance(v, np.ndarray)}
    np.savez(tmp, clinical_names=np.array(site.clinical_names), site_id=np.array(site.site_id), **arrays)
    os.replace(tmp, path)  # atomic: a crashed run never leaves a half-written cache
    if site.qc is not None:
        qc_path = path.with_name(path.name.replace("prepared-", "qc-").replace(".npz", ".json"))
        qc_path.write_text(json.dumps(site.qc.to_dict()))


def _load(path: Path) -> PreparedSite:
    with np.load(path, allow_pickle=False) as data:
        fields = {k: data[k] for k in data.files}
    site = PreparedSite(
        site_id=str(fields.pop("site_id")),
        clinical_names=[str(n) for n in fields.pop("clinical_names")],
        **fields,
    )
    qc_path = path.with_name(path.name.replace("prepared-", "qc-").replace(".npz", ".json"))
    if qc_path.exists():
        site.qc = QCReport.from_dict(json.loads(qc_path.read_text()))
    return site


# ----------------------------------------------------------------------------- the site

def patient_jobs(config: SiteConfig, manifest: Manifest) -> list[PatientJob]:
    """One job per manifest patient, in manifest order."""
    fields_ = tuple(config.phase_columns[p] for p in PHASES)
    return [PatientJob(pid, tuple(str(manifest.image_paths[p][i]) for p in PHASES), fields_,
                       str(manifest.mask_paths[i]), config.mask_column, config.mask_phase, config.preprocessing)
            for i, pid in enumerate(manifest.patient_ids)]


def _run_jobs(jobs: list[PatientJob], workers: int, bar) -> list[PatientResult]:
    if not jobs:
        return []
    if workers == 1 or len(jobs) == 1:
        results = []
        for job in jobs:
            results.append(_prepare_one(job))
            bar.update()
        return results
    results = []
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
        for result in pool.map(_prepare_one, jobs, chunksize=1):
            results.append(result)
            bar.update()
    return results


def prepare_site(config: SiteConfig, workers: int | None = None, progress: bool = True) -> PreparedSite:
    """Prepare (or load from cache) every patient of a site that passes QC.

    ``workers`` processes prepare patients in parallel (default: all cores).
    The returned site's ``qc`` is the QC report, also written to
    ``config.cache_dir / "qc_report.{csv,json}"``. Raises ManifestError when the
    manifest as a whole is unusable, PreparationError when no patient passes QC.
    """
    manifest = read_manifest(config, strict=False)
    jobs = patient_jobs(config, manifest)
    keys = [patient_key(job) for job in jobs]
    cache_file = config.cache_dir / f"prepared-{cache_key(config, manifest, keys)}.npz"
    if cache_file.exists():
        site = _load(cache_file)
        if site.qc is not None:
            site.qc.write(config.cache_dir)
        return site

    issues = list(manifest.issues)
    table, lab_issues = check_labs(manifest.table, config)
    issues += lab_issues
    lab_failed = {i.patient_id for i in lab_issues}
    results: dict[str, PatientResult] = {}
    todo = []
    for job, key in zip(jobs, keys):
        if job.patient_id in lab_failed:
            continue
        cached = _load_patient(_patient_entry(config, job.patient_id, key), job.patient_id)
        if cached is not None:
            results[job.patient_id] = cached
        else:
            todo.append((job, key))
    workers = workers or os.cpu_count() or 1
    with tqdm(total=len(todo), desc=f"prepare {config.site_id}", unit="patient", disable=not progress) as bar:
        fresh = _run_jobs([job for job, _ in todo], workers, bar)
    for (job, key), result in zip(todo, fresh):
        _save_patient(_patient_entry(config, job.patient_id, key), result)
        results[job.patient_id] = result
    for job in jobs:
        if job.patient_id in results:
            issues += results[job.patient_id].issues
    prepared = [pid for pid in manifest.patient_ids if pid in results and results[pid].cube is not None]
    report = QCReport(config.site_id, prepared, issues)
    report.write(config.cache_dir)
    if not prepared:
        raise PreparationError(
            f"site {config.site_id}: no patient could be prepared ({len(report.excluded)} excluded); "
            f"see the QC report {config.cache_dir / 'qc_report.csv'}")
    table = table.loc[prepared]
    lab_table = harmonize_labs(table, config)
    times = table["time_months"].to_numpy(dtype=float)
    events = table["event"].to_numpy(dtype=np.int64)
    site = PreparedSite(
        site_id=config.site_id,
        patient_ids=np.array(prepared),
        images=np.stack([results[pid].cube for pid in prepared]),
        clinical=clinical_features(table, config),
        clinical_names=clinical_feature_names(),
        labels=early_recurrence_label(times, events),
        times=times,
        events=events,
        lab_categories=lab_table[[f"{lab}_cat" for lab in LABS]].to_numpy(dtype=np.int64),
        qc=report,
    )
    _save(cache_file, site)
    return site
