"""Turn a site's manifest and volumes into model-ready, cached arrays.

Per patient (``prepare_patient``): read and check every phase and the tumour
mask (NIfTI files or DICOM series folders, every rule of the validation layer:
``client.image_checks.load_patient``; the mask made binary by its declared
labels), optionally correct the bias field (N4), rigidly
register every phase to the mask's phase (``client.registration``), find the
largest tumour and resample a cube of ``crop_voxels`` voxels centred on it:
either ``spacing_mm`` voxels (a fixed physical size, the default) or the
tumour's bounding box plus ``box_margin_mm`` (linear for images, nearest
neighbour for the mask). Each phase is normalised against the peritumoral ring
(``ring_mm`` wide, mostly liver) or the whole cube. The channels are the phases
in ``common.schema.PHASES`` order plus the mask.

Quality control: a patient whose manifest row, labs or volumes have a problem,
or who shares a file or a volume's voxels with another patient, is excluded and
listed in the site's QC report (``client.qc``), written as ``qc_report.csv`` /
``qc_report.json`` in the cache folder; the other patients are prepared. Only a
bad configuration or an unusable manifest stops a site, before any work.

The cache (``client.prepare_cache``) lies under the site's ``cache_dir``,
outside the data folder (checked); the data folder is only ever read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from tqdm import tqdm

from hccfed.client.image_checks import PatientJob, load_patient
from hccfed.client.labs import clinical_features, harmonize_labs
from hccfed.client.prepare_cache import (PREPARE_VERSION, PatientResult, cache_key, load_patient_entry, load_site,
                                         patient_entry, patient_key, save_patient, save_site)
from hccfed.client.qc import PatientQCError, QCReport, patient_issue
from hccfed.client.registration import register_rigid
from hccfed.client.site_validation import content_duplicates, patient_jobs, run_parallel, screen_site
from hccfed.client.validation import resolve_input
from hccfed.common.site_config import Preprocessing, SiteConfig
from hccfed.common.schema import LABS, PHASES, clinical_feature_names, early_recurrence_label

__all__ = ["PREPARE_VERSION", "PatientJob", "PreparationError", "PreparedScans", "PreparedSite", "patient_jobs",
           "patient_key", "prepare_patient", "prepare_scans", "prepare_site", "prepared_cache_file"]


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


@dataclass
class PreparedScans:
    """A site's archive prepared for self-supervised pretraining (:func:`prepare_scans`): the cubes only,
    no lab, no outcome. ``images`` as :class:`PreparedSite`'s, in the archive manifest's order."""

    site_id: str
    patient_ids: np.ndarray
    images: np.ndarray
    qc: QCReport | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.patient_ids)


def largest_tumour(mask: sitk.Image) -> tuple[tuple[float, ...], np.ndarray]:
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


def _cube(job: PatientJob, fixed_mask: sitk.Image, images: dict[str, sitk.Image]) -> np.ndarray:
    """The cube of one patient from its checked volumes (binary mask, float32 phases)."""
    prep = job.prep
    if prep.n4_bias_correction:
        images = {phase: n4_correct(image) for phase, image in images.items()}
    centre, extent = largest_tumour(fixed_mask)
    reference = _crop_reference(centre, prep, extent)
    spacing = reference.GetSpacing()[0]
    mask_cube = sitk.Resample(fixed_mask, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    mask_array = sitk.GetArrayFromImage(mask_cube) > 0
    if not mask_array.any():
        raise PatientQCError("implausible_mask", f"the tumour of {job.mask_path} vanishes when resampled to "
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
    cube = np.stack(channels).astype(np.float16)
    if not np.all(np.isfinite(cube)):  # e.g. a float64 phase beyond float16's range
        raise PatientQCError("non_finite_voxels", "the prepared cube holds non-finite values (a phase's intensities "
                             "exceed float16 once normalised)", job.phase_fields[0], job.phase_paths[0])
    return cube


def prepare_patient(job: PatientJob) -> tuple[np.ndarray, list]:
    """(cube of shape (len(PHASES) + 1, D, H, W) float16, notes) for one patient.

    Raises ``PatientQCError`` (reason, field, file) when the patient cannot be prepared.
    """
    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(1)
    volumes = load_patient(job)
    return _cube(job, volumes.mask, volumes.images), volumes.notes


def _prepare_one(job: PatientJob) -> PatientResult:
    """Check and prepare one patient; never raises: a failure becomes a QC issue naming the patient and files."""
    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(1)
    pid, issues, digests = job.patient_id, [], {}
    try:
        volumes = load_patient(job)
        issues = [patient_issue(pid, n.reason, n.field, n.file, n.message) for n in volumes.notes]
        digests = volumes.digests
        cube = _cube(job, volumes.mask, volumes.images)
    except PatientQCError as err:
        return PatientResult(pid, None, issues + [err.issue(pid)], digests)
    except Exception as err:  # an unexpected failure still excludes one patient only
        files = ", ".join([job.mask_path, *job.phase_paths])
        return PatientResult(pid, None, issues + [patient_issue(
            pid, "preparation_failed", "", job.mask_path,
            f"could not prepare the volumes ({type(err).__name__}: {err}); files: {files}")], digests)
    return PatientResult(pid, cube, issues, digests)


def prepared_cache_file(config: SiteConfig, jobs: list[PatientJob], keys: list[str] | None = None) -> Path:
    """Where the assembled site of these screened patients is cached: current for this config and data
    exactly when the file exists (its name hashes the manifest, the config and every patient's files)."""
    keys = [patient_key(job) for job in jobs] if keys is None else keys
    key = cache_key(config, config.manifest.read_bytes(), [j.patient_id for j in jobs], keys)
    return config.cache_dir / f"prepared-{key}.npz"


def _cached(config: SiteConfig, cache_file: Path, factory):
    """The assembled site cached at ``cache_file`` (its QC report written again), or None."""
    if not cache_file.exists():
        return None
    site = load_site(cache_file, factory)
    if site is not None and site.qc is not None:
        site.qc.write(config.cache_dir)
    return site


def _prepare_screened(config: SiteConfig, screening, keys: list[str], workers: int | None, progress: bool,
                      what: str) -> tuple[list[str], dict[str, PatientResult], QCReport]:
    """Prepare (or load per patient from the cache) every screened patient; (the ids prepared, in
    manifest order, each patient's result, the QC report written to ``config.cache_dir``)."""
    jobs = screening.jobs
    results: dict[str, PatientResult] = {}
    todo = []
    for job, key in zip(jobs, keys):
        cached = load_patient_entry(patient_entry(config, job.patient_id, key), job.patient_id)
        if cached is not None:
            results[job.patient_id] = cached
        else:
            todo.append((job, key))
    with tqdm(total=len(todo), desc=f"prepare {what}", unit="patient", disable=not progress) as bar:
        fresh = run_parallel(_prepare_one, [job for job, _ in todo], workers, bar)
    for (job, key), result in zip(todo, fresh):
        save_patient(patient_entry(config, job.patient_id, key), result)
        results[job.patient_id] = result
    issues = list(screening.issues)
    for job in jobs:
        issues += results[job.patient_id].issues
    issues += content_duplicates({pid: r.digests for pid, r in results.items() if r.digests})
    excluded = {i.patient_id for i in issues if i.severity == "excluded"}
    prepared = [j.patient_id for j in jobs if results[j.patient_id].cube is not None and j.patient_id not in excluded]
    report = QCReport(config.site_id, prepared, issues)
    report.write(config.cache_dir)
    if not prepared:
        raise PreparationError(
            f"site {what}: no patient could be prepared ({len(report.excluded)} excluded); "
            f"see the QC report {config.cache_dir / 'qc_report.csv'}")
    return prepared, results, report


def prepare_site(config: SiteConfig, workers: int | None = None, progress: bool = True) -> PreparedSite:
    """Prepare (or load from cache) every patient of a site that passes QC.

    ``workers`` processes prepare patients in parallel (default: all cores).
    The returned site's ``qc`` is the QC report, also written to
    ``config.cache_dir / "qc_report.{csv,json}"``. Raises ConfigError or
    ManifestError, before any work, when the configuration or the manifest as a
    whole is unusable (or the cache would lie in the data folder), and
    PreparationError when no patient passes QC.
    """
    screening = screen_site(config)
    keys = [patient_key(job) for job in screening.jobs]
    cache_file = prepared_cache_file(config, screening.jobs, keys)
    site = _cached(config, cache_file, PreparedSite)
    if site is not None:
        return site
    prepared, results, report = _prepare_screened(config, screening, keys, workers, progress, config.site_id)
    table = screening.table.loc[prepared]
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
    save_site(cache_file, site)
    return site


def prepare_scans(config: SiteConfig, workers: int | None = None, progress: bool = True) -> PreparedScans:
    """Prepare (or load from cache) every scan of a scans-only manifest (a site's archive:
    :meth:`SiteConfig.archive_site`) that passes QC, as :func:`prepare_site` prepares a patient's
    volumes (the same checks, preprocessing and per-patient cache); no lab or outcome is read. The QC
    report goes to ``config.cache_dir``. Raises as :func:`prepare_site` does."""
    screening = screen_site(config, scans_only=True)
    keys = [patient_key(job) for job in screening.jobs]
    cache_file = prepared_cache_file(config, screening.jobs, keys)
    scans = _cached(config, cache_file, PreparedScans)
    if scans is not None and scans.qc is not None:  # without its QC report, assembled again from the entries
        return scans
    what = f"{config.site_id} archive"
    prepared, results, report = _prepare_screened(config, screening, keys, workers, progress, what)
    scans = PreparedScans(config.site_id, np.array(prepared), np.stack([results[pid].cube for pid in prepared]),
                          qc=report)
    save_site(cache_file, scans)
    return scans


def prepare_archive(config: SiteConfig, workers: int | None = None, progress: bool = True) -> PreparedScans | None:
    """A site's archive (``config.archive``) prepared for pretraining, less any labelled patient's scan
    (:func:`without_labelled`; the labelled cohort, ``config``, prepared first), its QC report written to
    ``<cache_dir>/archive``; None without an archive."""
    archive = config.archive_site()
    if archive is None:
        return None
    scans = without_labelled(prepare_scans(archive, workers, progress), archive, config)
    scans.qc.write(archive.cache_dir)
    return scans


def labelled_marks(labelled: SiteConfig) -> tuple[dict[str, str], dict, dict[str, str]]:
    """What identifies the labelled cohort's scans, each mapped to its patient: the id of every manifest
    row (compared without surrounding spaces and case; the rows QC excludes too), the file (device and
    inode) of every phase path a row names, and the voxel digest of every phase read when the cohort
    was prepared (from its per-patient cache: a patient whose volumes were never read has none)."""
    from hccfed.client.image_checks import file_identity
    from hccfed.client.manifest import raw_rows
    from hccfed.client.validation import normalised_id

    ids, files, digests = {}, {}, {}
    for _, row in raw_rows(labelled):
        pid = (row.get("patient_id") or "").strip()
        if not pid:
            continue
        ids.setdefault(normalised_id(pid), pid)
        for column in labelled.phase_columns.values():
            cell = (row.get(column) or "").strip()
            if not cell:
                continue
            path, problem = resolve_input(cell, labelled.data_root, labelled.input_roots)
            identity = None if problem else file_identity(path)
            if identity is not None:
                files.setdefault(identity, pid)
    for job in screen_site(labelled).jobs:
        entry = load_patient_entry(patient_entry(labelled, job.patient_id, patient_key(job)), job.patient_id)
        for column, (value, _) in (entry.digests or {}).items() if entry is not None else ():
            if column != job.mask_field:
                digests.setdefault(value, job.patient_id)
    return ids, files, digests


def without_labelled(scans: PreparedScans, archive: SiteConfig, labelled: SiteConfig) -> PreparedScans:
    """The archive's scans (prepared by :func:`prepare_scans` from ``archive``) less any labelled patient's
    (:func:`labelled_marks` of ``labelled``, prepared first): an archive row with a labelled patient's id,
    a phase that is one of their files, or a phase with the same voxels as one of theirs (a copy, with
    another mask or none). Pretraining on them would let a validation or test patient's scan into the
    encoder. Each is a QC entry (``in_labelled_cohort``) of the returned report, which the caller writes
    to the archive's cache. A second acquisition of a labelled patient under another id is not found:
    the archive's export should leave them out."""
    from hccfed.client.image_checks import file_identity
    from hccfed.client.validation import normalised_id

    ids, files, digests = labelled_marks(labelled)
    jobs = {job.patient_id: job for job in screen_site(archive, scans_only=True).jobs}
    keep, issues = [], []
    for i, pid in enumerate(str(p) for p in scans.patient_ids):
        job = jobs.get(pid)
        entry = None if job is None else load_patient_entry(patient_entry(archive, pid, patient_key(job)), pid)
        twin, why = ids.get(normalised_id(pid)), "has the id of"
        for column, path in zip(job.phase_fields, job.phase_paths) if job is not None and twin is None else ():
            identity = file_identity(path)
            if identity in files:
                twin, why = files[identity], f"names in '{column}' ({path}) a file of"
                break
            value = (entry.digests or {}).get(column, (None,))[0] if entry is not None else None
            if value in digests:
                twin, why = digests[value], f"holds in '{column}' ({path}) the voxels of a phase of"
                break
        if twin is None:
            keep.append(i)
            continue
        issues.append(patient_issue(pid, "in_labelled_cohort", "patient_id", archive.manifest, (
            f"{why} labelled patient {twin} of {labelled.site_id} ({labelled.manifest}): left out of the archive, "
            "so no scan of a labelled (validation or test) patient reaches the pretraining; remove it from the "
            "archive's export")))
    if not keep:
        raise PreparationError(f"site {scans.site_id} archive: every scan is a labelled patient's "
                               f"({len(issues)}); the archive lists the scans without outcomes")
    earlier = list(scans.qc.issues) if scans.qc is not None else []
    qc = QCReport(scans.site_id, [str(scans.patient_ids[i]) for i in keep], [*earlier, *issues])
    return PreparedScans(scans.site_id, scans.patient_ids[keep], scans.images[keep], qc=qc)
