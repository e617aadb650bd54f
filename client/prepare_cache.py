"""The prepared cache of a site, under its ``cache_dir`` (the hospital's data folder is only ever read).

One entry per patient keyed by a hash of that patient's files (path, size,
modification time; every file of a DICOM folder), the preprocessing config and
the mask's label semantics, so a fixed or added patient is prepared alone; and
the assembled site keyed by the manifest, the lab config and every patient's
key, so a second run with nothing changed does no work. Every write is atomic
(a temporary file renamed), so a crashed run never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from hccfed.client.image_checks import PatientJob
from hccfed.client.qc import QCIssue, QCReport
from hccfed.common.atomic_io import atomic_savez, atomic_write_text
from hccfed.common.site_config import SiteConfig

PREPARE_VERSION = "4"


@dataclass
class PatientResult:
    """A prepared cube, or None with the issues that excluded the patient (warnings either way),
    and the digest of each volume's voxels (for duplicates across patients)."""

    patient_id: str
    cube: np.ndarray | None
    issues: list[QCIssue]
    digests: dict[str, tuple[str, str]] | None = None


def _file_stamps(path: Path) -> list[str]:
    """path|size|mtime of a file, or of every file under a folder (a DICOM series)."""
    try:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        return [f"{file}|{file.stat().st_size}|{file.stat().st_mtime_ns}" for file in files]
    except OSError:
        return [f"{path}|unreadable"]


def patient_key(job: PatientJob) -> str:
    """Hash of everything one patient's cube depends on: its files, the preprocessing and the mask labels."""
    digest = hashlib.sha256()
    digest.update(PREPARE_VERSION.encode())
    digest.update(json.dumps(asdict(job.prep), sort_keys=True).encode())
    digest.update(json.dumps(asdict(job.mask_labels), sort_keys=True).encode())
    digest.update(f"{job.mask_phase}|{job.phase_fields}|{job.mask_field}|{list(map(str, job.roots))}".encode())
    for path in (*job.phase_paths, job.mask_path):
        digest.update("\n".join(_file_stamps(Path(path))).encode())
    return digest.hexdigest()[:20]


def cache_key(config: SiteConfig, manifest_bytes: bytes, patient_ids: list[str], patient_keys: list[str]) -> str:
    """Hash of everything the assembled site depends on."""
    digest = hashlib.sha256()
    digest.update(PREPARE_VERSION.encode())
    digest.update(json.dumps(asdict(config.preprocessing), sort_keys=True).encode())
    digest.update(json.dumps({k: asdict(v) for k, v in config.labs.items()}, sort_keys=True).encode())
    digest.update(json.dumps(asdict(config.mask_labels), sort_keys=True).encode())
    digest.update(manifest_bytes)
    digest.update("|".join(patient_ids).encode())
    digest.update("|".join(patient_keys).encode())
    return digest.hexdigest()[:20]


def patient_entry(config: SiteConfig, patient_id: str, key: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", patient_id)
    return config.cache_dir / "patients" / f"{safe}-{key}.npz"


def save_patient(path: Path, result: PatientResult) -> None:
    cube = result.cube if result.cube is not None else np.zeros((0,), np.float16)
    atomic_savez(path, cube=cube, ok=np.array(result.cube is not None),
                 issues=np.array(json.dumps([asdict(i) for i in result.issues])),
                 digests=np.array(json.dumps(result.digests or {})))


def load_patient_entry(path: Path, patient_id: str) -> PatientResult | None:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            cube = data["cube"] if bool(data["ok"]) else None
            issues = [QCIssue(**i) for i in json.loads(str(data["issues"]))]
            digests = {k: tuple(v) for k, v in json.loads(str(data["digests"])).items()}
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable entry: prepare again
    return PatientResult(patient_id, cube, issues, digests)


def save_site(path: Path, site) -> None:
    """Write a PreparedSite's (or PreparedScans') arrays (and its QC report beside them)."""
    arrays = {k: v for k, v in vars(site).items() if isinstance(v, np.ndarray)}
    if hasattr(site, "clinical_names"):  # a PreparedScans has none
        arrays["clinical_names"] = np.array(site.clinical_names)
    atomic_savez(path, site_id=np.array(site.site_id), **arrays)
    if site.qc is not None:
        atomic_write_text(_qc_path(path), json.dumps(site.qc.to_dict()))


def load_site(path: Path, factory):
    """The PreparedSite or PreparedScans (built by ``factory(**fields)``) saved at ``path``, or None when
    unreadable."""
    try:
        with np.load(path, allow_pickle=False) as data:
            fields = {k: data[k] for k in data.files}
        if "clinical_names" in fields:
            fields["clinical_names"] = [str(n) for n in fields["clinical_names"]]
        site = factory(site_id=str(fields.pop("site_id")), **fields)
        qc_path = _qc_path(path)
        if qc_path.exists():
            site.qc = QCReport.from_dict(json.loads(qc_path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return site


def _qc_path(path: Path) -> Path:
    return path.with_name(path.name.replace("prepared-", "qc-").replace(".npz", ".json"))
