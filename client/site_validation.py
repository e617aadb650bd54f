"""One site's validation: every check of the validation layer, without preparing anything.

``screen_site`` runs what needs no image (shared with ``client.prepare``):
the outputs outside the inputs, the manifest (``client.manifest``), the labs and
the files used twice (the same path, symbolic link or hard link given to two
patients, or to two fields of one patient). ``validate_site`` then reads and
checks every patient's volumes (``client.image_checks.load_patient``) in
parallel and compares their voxels across patients (``content_duplicates``);
it writes nothing. Faults of the site as a whole raise (``ConfigError``,
``ManifestError``); a patient's fault is a QC entry.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import SimpleITK as sitk
from tqdm import tqdm

from hccfed.client.image_checks import PatientJob, file_identity, load_patient
from hccfed.client.manifest import Manifest, read_manifest
from hccfed.client.qc import PatientQCError, QCIssue, QCReport, check_labs, patient_issue
from hccfed.client.validation import inside
from hccfed.common.errors import ConfigError
from hccfed.common.schema import PHASES
from hccfed.common.site_config import SiteConfig


@dataclass
class Screening:
    """What the checks without images found: the manifest, labs in site units, issues, patients left to read."""

    manifest: Manifest
    table: pd.DataFrame
    issues: list[QCIssue]
    jobs: list[PatientJob]  # the patients that passed, in manifest order
    excluded: set[str] = field(default_factory=set)


def check_outputs(config: SiteConfig, *outputs: Path) -> None:
    """Refuse an output (the cache, a report) inside an input folder (the archive's too), or that is an
    input file itself."""
    inputs = {config.manifest.resolve(), *([config.source.resolve()] if config.source else [])}
    roots = (*config.input_roots, *([config.archive.data_root] if config.archive is not None else []))
    for out in (config.cache_dir, *outputs):
        resolved = Path(out).resolve()  # symbolic links followed: a link into the data folder is refused too
        if inside(resolved, roots):
            raise ConfigError(f"{config.source}: the output {resolved} lies inside the input folder "
                              f"{next(r for r in roots if inside(resolved, (r,)))}; the hospital's data "
                              "folder is only ever read: write outputs elsewhere")
        if resolved in inputs:
            raise ConfigError(f"{config.source}: the output {resolved} would overwrite an input of this command")


def patient_jobs(config: SiteConfig, manifest: Manifest) -> list[PatientJob]:
    """One job per manifest patient, in manifest order."""
    fields_ = tuple(config.phase_columns[p] for p in PHASES)
    return [PatientJob(pid, tuple(str(manifest.image_paths[p][i]) for p in PHASES), fields_,
                       str(manifest.mask_paths[i]), config.mask_column, config.mask_phase, config.preprocessing,
                       config.mask_labels, config.input_roots)
            for i, pid in enumerate(manifest.patient_ids)]


def _job_files(job: PatientJob) -> list[tuple[str, str]]:
    return [*zip(job.phase_fields, job.phase_paths), (job.mask_field, job.mask_path)]


def file_duplicates(jobs: list[PatientJob], manifest: Manifest) -> list[QCIssue]:
    """The same file (path, symbolic or hard link) named by two patients, or by two fields of one: both excluded."""
    users: dict[object, list[tuple[str, str, str]]] = {}
    for job in jobs:
        for column, path in _job_files(job):
            key = file_identity(path) or str(Path(path).resolve())
            users.setdefault(key, []).append((job.patient_id, column, path))
    issues = []
    for uses in users.values():
        if len(uses) < 2:
            continue
        for pid, column, path in uses:
            others = [f"patient {p} (row {manifest.rows.get(p)}, column '{c}')" for p, c, _ in uses
                      if (p, c) != (pid, column)]
            row = manifest.rows.get(pid)
            issues.append(QCIssue(pid, "duplicate_image", column, path, (
                f"patient {pid} ({manifest.path} row {row}, column '{column}'): field '{column}': the "
                f"file {path} is also used by {', '.join(others)}; one patient appears twice, or a path was copied "
                "from another row"), "excluded", row))
    return issues


def content_duplicates(digests: dict[str, dict[str, tuple[str, str]]]) -> list[QCIssue]:
    """Volumes with the same voxels in two patients ({patient: {field: (digest, file)}}): an entry for each."""
    owners: dict[str, list[tuple[str, str, str]]] = {}
    for pid, fields_ in digests.items():
        for column, (value, path) in fields_.items():
            owners.setdefault(value, []).append((pid, column, path))
    issues = []
    for uses in owners.values():
        if len({p for p, _, _ in uses}) < 2:
            continue
        for pid, column, path in uses:
            others = [f"patient {p} field '{c}' ({f})" for p, c, f in uses if p != pid]
            issues.append(patient_issue(pid, "duplicate_image", column, path,
                                        f"{path} holds the same voxels as {', '.join(others)}; one patient appears "
                                        "twice, or a file was copied into another patient's export"))
    return issues


def screen_site(config: SiteConfig, scans_only: bool = False) -> Screening:
    """Every check that needs no image; raises for a fault of the site as a whole. ``scans_only``: a
    manifest of scans without outcomes (:meth:`SiteConfig.archive_site`; no lab is read)."""
    check_outputs(config)
    if not config.data_root.is_dir():
        key = "archive.data_root" if scans_only else "data_root"
        raise ConfigError(f"{config.source}: key '{key}': {config.data_root} is not a folder")
    manifest = read_manifest(config, strict=False, scans_only=scans_only)
    issues = list(manifest.issues)
    table, lab_issues = (manifest.table, []) if scans_only else check_labs(manifest.table, config)
    issues += lab_issues
    jobs = [j for j in patient_jobs(config, manifest) if j.patient_id not in {i.patient_id for i in lab_issues}]
    duplicates = file_duplicates(jobs, manifest)
    issues += duplicates
    excluded = {i.patient_id for i in issues if i.severity == "excluded"}
    return Screening(manifest, table, issues, [j for j in jobs if j.patient_id not in excluded], excluded)


def check_patient(job: PatientJob) -> tuple[list[QCIssue], dict[str, tuple[str, str]]]:
    """(issues, digests) of one patient's volumes; never raises (an unexpected error is a QC entry)."""
    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(1)
    try:
        volumes = load_patient(job)
    except PatientQCError as err:
        return [err.issue(job.patient_id)], {}
    except Exception as err:  # an unforeseen fault still excludes one patient only, and says so
        files = ", ".join([job.mask_path, *job.phase_paths])
        return [patient_issue(job.patient_id, "preparation_failed", "", job.mask_path,
                              f"could not check the volumes ({type(err).__name__}: {err}); files: {files}")], {}
    return [patient_issue(job.patient_id, n.reason, n.field, n.file, n.message) for n in volumes.notes], \
        volumes.digests


def run_parallel(function, jobs: list, workers: int | None, bar) -> list:
    """``function`` over ``jobs`` in ``workers`` processes (in order); ``bar`` advanced per job."""
    workers = min(workers or os.cpu_count() or 1, max(1, len(jobs)))
    results = []
    if workers == 1:
        for job in jobs:
            results.append(function(job))
            bar.update()
        return results
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for result in pool.map(function, jobs, chunksize=1):
            results.append(result)
            bar.update()
    return results


def validate_site(config: SiteConfig, workers: int | None = None, progress: bool = False,
                  scans_only: bool = False) -> QCReport:
    """Every check of the validation layer on a site, nothing prepared, nothing written.

    The report's ``prepared`` lists the patients that pass every check (they would be prepared,
    unless their registration fails). ``scans_only``: a site's archive (:meth:`SiteConfig.archive_site`).
    """
    screening = screen_site(config, scans_only)
    with tqdm(total=len(screening.jobs), desc=f"validate {config.site_id}{' archive' if scans_only else ''}",
              unit="patient",
              disable=not progress) as bar:
        results = run_parallel(check_patient, screening.jobs, workers, bar)
    issues = list(screening.issues)
    digests = {}
    for job, (found, digest) in zip(screening.jobs, results):
        issues += found
        if digest:
            digests[job.patient_id] = digest
    issues += content_duplicates(digests)
    excluded = {i.patient_id for i in issues if i.severity == "excluded"}
    passed = [j.patient_id for j in screening.jobs if j.patient_id not in excluded]
    return QCReport(config.site_id, passed, issues)
