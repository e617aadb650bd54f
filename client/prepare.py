"""Turn a site's manifest and volumes into model-ready, cached arrays.

Per patient: read every phase and the tumour mask, find the largest tumour,
resample a cube of ``crop_voxels`` voxels at ``spacing_mm`` centred on it
(linear for images, nearest neighbour for the mask), and normalise each phase
against the peritumoral ring (mostly liver) or the whole cube. The channels are the phases in ``common.schema.PHASES`` order plus
the mask. The cube keeps the physical size of the tumour.

The result is cached under the site's ``cache_dir``, keyed by a hash of the
inputs (manifest bytes, each file's size and modification time) and of the
preprocessing config, so a second run with nothing changed does no work. The
hospital's data folder is only ever read.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from tqdm import tqdm

from client.labs import clinical_features, harmonize_labs
from client.manifest import Manifest, read_manifest
from common.config import Preprocessing, SiteConfig
from common.schema import LABS, PHASES, clinical_feature_names, early_recurrence_label

PREPARE_VERSION = "2"


class PreparationError(RuntimeError):
    """One patient's volumes could not be prepared; the message names patient and file."""


@dataclass
class PreparedSite:
    """A site's model-ready data. Arrays are indexed by patient, in manifest order.

    images: (n, len(PHASES) + 1, D, H, W) float16, z-scored phases then the mask.
    clinical: (n, n_features) float32, see ``client.labs.clinical_feature_names``.
    labels: (n,) int64 early-recurrence label, -1 when unknown.
    times: (n,) float64 months; events: (n,) int64.
    lab_categories: (n, n_labs) int64 Lower/Normal/Higher codes, for reporting.
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

    def __len__(self) -> int:
        return len(self.patient_ids)


def _largest_tumour_centre(mask: sitk.Image) -> tuple[float, ...]:
    """Physical centre (mm) of the largest connected tumour component."""
    components = sitk.ConnectedComponent(mask > 0)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(components)
    labels = stats.GetLabels()
    if not labels:
        raise ValueError("the tumour mask is empty")
    largest = max(labels, key=stats.GetNumberOfPixels)
    return stats.GetCentroid(largest)


def _crop_reference(centre: tuple[float, ...], prep: Preprocessing) -> sitk.Image:
    size = prep.crop_voxels
    reference = sitk.Image([size] * 3, sitk.sitkFloat32)
    reference.SetSpacing([prep.spacing_mm] * 3)
    half = (size - 1) / 2.0 * prep.spacing_mm
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


def prepare_patient(phase_paths: list[str], mask_path: str, prep: Preprocessing) -> np.ndarray:
    """Prepared cube for one patient, shape (len(PHASES) + 1, D, H, W), float16."""
    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(1)
    mask = sitk.ReadImage(mask_path)
    reference = _crop_reference(_largest_tumour_centre(mask), prep)
    mask_cube = sitk.Resample(mask, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    mask_array = sitk.GetArrayFromImage(mask_cube) > 0
    ring = None
    if prep.normalisation == "zscore_ring":
        ring = peritumoral_ring(mask_array, int(round(prep.ring_mm / prep.spacing_mm)))
    channels = []
    for path in phase_paths:
        image = sitk.Cast(sitk.ReadImage(path), sitk.sitkFloat32)
        cube = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        channels.append(_zscore(sitk.GetArrayFromImage(cube), ring))
    channels.append(mask_array.astype(np.float32))
    return np.stack(channels).astype(np.float16)


def _prepare_one(args: tuple[str, list[str], str, Preprocessing]) -> np.ndarray:
    patient_id, phase_paths, mask_path, prep = args
    try:
        return prepare_patient(phase_paths, mask_path, prep)
    except Exception as err:  # one message that names the patient and the files
        raise PreparationError(
            f"patient {patient_id}: could not prepare volumes ({err}); files: mask={mask_path}, "
            + ", ".join(phase_paths)
        ) from None


def cache_key(config: SiteConfig, manifest: Manifest) -> str:
    """Hash of everything the prepared arrays depend on."""
    digest = hashlib.sha256()
    digest.update(PREPARE_VERSION.encode())
    digest.update(json.dumps(asdict(config.preprocessing), sort_keys=True).encode())
    digest.update(json.dumps({k: asdict(v) for k, v in config.labs.items()}, sort_keys=True).encode())
    digest.update(config.manifest.read_bytes())
    for path in [p for paths in manifest.image_paths.values() for p in paths] + manifest.mask_paths:
        stat = path.stat()
        digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:20]


def _save(path: Path, site: PreparedSite) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    arrays = {k: v for k, v in vars(site).items() if isinstance(v, np.ndarray)}
    np.savez(tmp, clinical_names=np.array(site.clinical_names), site_id=np.array(site.site_id), **arrays)
    os.replace(tmp, path)  # atomic: a crashed run never leaves a half-written cache


def _load(path: Path) -> PreparedSite:
    with np.load(path, allow_pickle=False) as data:
        fields = {k: data[k] for k in data.files}
    return PreparedSite(
        site_id=str(fields.pop("site_id")),
        clinical_names=[str(n) for n in fields.pop("clinical_names")],
        **fields,
    )


def prepare_site(config: SiteConfig, workers: int | None = None, progress: bool = True) -> PreparedSite:
    """Prepare (or load from cache) every patient of a site.

    ``workers`` processes prepare patients in parallel (default: all cores).
    Raises ManifestError / LabError / PreparationError with messages naming the
    file, the patient and the field.
    """
    manifest = read_manifest(config)
    table = manifest.table
    key = cache_key(config, manifest)
    cache_file = config.cache_dir / f"prepared-{key}.npz"
    if cache_file.exists():
        return _load(cache_file)

    lab_table = harmonize_labs(table, config)  # fails fast on lab errors, before any image work
    jobs = [
        (pid, [str(manifest.image_paths[p][i]) for p in PHASES], str(manifest.mask_paths[i]), config.preprocessing)
        for i, pid in enumerate(manifest.patient_ids)
    ]
    workers = workers or os.cpu_count() or 1
    bar = tqdm(total=len(jobs), desc=f"prepare {config.site_id}", unit="patient", disable=not progress)
    cubes = []
    if workers == 1:
        for job in jobs:
            cubes.append(_prepare_one(job))
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for cube in pool.map(_prepare_one, jobs, chunksize=4):
                cubes.append(cube)
                bar.update()
    bar.close()
    times = table["time_months"].to_numpy(dtype=float)
    events = table["event"].to_numpy(dtype=np.int64)
    site = PreparedSite(
        site_id=config.site_id,
        patient_ids=np.array(manifest.patient_ids),
        images=np.stack(cubes),
        clinical=clinical_features(table, config),
        clinical_names=clinical_feature_names(),
        labels=early_recurrence_label(times, events),
        times=times,
        events=events,
        lab_categories=lab_table[[f"{lab}_cat" for lab in LABS]].to_numpy(dtype=np.int64),
    )
    _save(cache_file, site)
    return site
