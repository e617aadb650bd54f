"""Write a synthetic site's phases as DICOM series, as a hospital's PACS export would hold them.

Each phase of each patient becomes one folder, ``dicom/<patient_id>/<phase>/``,
of MR Image Storage files (one per slice) with the geometry a reader needs:
ImagePositionPatient per slice, ImageOrientationPatient, PixelSpacing,
SliceThickness and SpacingBetweenSlices; one StudyInstanceUID per patient and
one SeriesInstanceUID per phase. The tumour masks stay NIfTI (segmentations
usually come from a research tool, not from the PACS). The site's manifest is
rewritten to point at the folders, so ``hccfed prepare`` reads the DICOM form.

UIDs are derived from the site, patient and phase, so an export is reproducible.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import SimpleITK as sitk
from pydicom.uid import generate_uid
from tqdm import tqdm

from hccfed.common.schema import MASK_COLUMN, PHASES, image_column

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def _uid(*parts: str) -> str:
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def write_dicom_series(image: sitk.Image, folder: Path, patient_id: str, description: str,
                       study_uid: str, series_uid: str, series_number: int) -> list[Path]:
    """Write a 3-D ``image`` as one DICOM file per slice in ``folder``; return the files.

    Voxels are stored as int16 (the synthetic volumes already are); the
    geometry (origin, spacing, direction) is kept exactly.
    """
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.Cast(image, sitk.sitkInt16)
    d = image.GetDirection()
    orientation = "\\".join(f"{v:.8f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    spacing = image.GetSpacing()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()  # use the UIDs set below, not fresh random ones
    files = []
    for k in range(image.GetDepth()):
        slice_ = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0016": MR_IMAGE_STORAGE,
            "0008|0018": _uid(series_uid, k),
            "0008|0060": "MR",
            "0008|0008": "ORIGINAL\\PRIMARY\\AXIAL",
            "0008|103e": description,
            "0010|0010": f"SYNTHETIC^{patient_id}",
            "0010|0020": patient_id,
            "0020|000d": study_uid,
            "0020|000e": series_uid,
            "0020|0011": str(series_number),
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": orientation,
            "0020|1041": f"{position[2]:.6f}",
            "0028|0030": f"{spacing[1]:.6f}\\{spacing[0]:.6f}",  # row spacing (y), column spacing (x)
            "0018|0050": f"{spacing[2]:.6f}",
            "0018|0088": f"{spacing[2]:.6f}",
        }
        for tag, value in tags.items():
            slice_.SetMetaData(tag, value)
        path = folder / f"slice_{k + 1:04d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(slice_)
        files.append(path)
    return files


def export_site_dicom(site_dir: Path, out_dir: Path | None = None, remove_nifti: bool = False,
                      progress: bool = False) -> Path:
    """Write the DICOM form of the site in ``site_dir``; return the new manifest's path.

    ``out_dir`` (default: ``site_dir``, in place) receives ``dicom/``, the masks
    and ``manifest.csv`` with the phase columns pointing at the series folders.
    ``remove_nifti`` deletes the phases' NIfTI files of an in-place export.
    """
    site_dir = Path(site_dir)
    out_dir = Path(out_dir) if out_dir is not None else site_dir
    table = pd.read_csv(site_dir / "manifest.csv", dtype=str, keep_default_na=False)
    out = table.copy()
    in_place = out_dir.resolve() == site_dir.resolve()
    for row, pid in tqdm(list(enumerate(table["patient_id"])), desc=f"dicom {site_dir.name}", unit="patient",
                         disable=not progress):
        study_uid = _uid(site_dir.name, pid)
        for number, phase in enumerate(PHASES, start=1):
            column = image_column(phase)
            source = site_dir / table.at[row, column]
            relative = Path("dicom") / pid / phase
            target = out_dir / relative
            if target.exists():
                shutil.rmtree(target)
            write_dicom_series(sitk.ReadImage(str(source)), target, pid, f"{phase} phase",
                               study_uid, _uid(site_dir.name, pid, phase), number)
            out.at[row, column] = relative.as_posix()
            if in_place and remove_nifti:
                source.unlink()
        if not in_place:
            mask = Path(table.at[row, MASK_COLUMN])
            (out_dir / mask).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(site_dir / mask, out_dir / mask)
    manifest = out_dir / "manifest.csv"
    out.to_csv(manifest, index=False)
    return manifest
