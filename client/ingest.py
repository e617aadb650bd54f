"""Read a patient's volumes: image files (NIfTI, NRRD, MHA...) and DICOM series folders.

A phase (or the mask) is either one image file SimpleITK reads or a folder
holding one DICOM series (``client.dicom_series``: every file checked, the
slices ordered by position, never by file name). A NIfTI file is also checked
for completeness (ITK reads a truncated file as zeros) and for a world
geometry (qform or sform). The volume keeps the scanner's orientation and
spacing; the image properties themselves (3-D, finite, spacing, ...) are
checked by ``client.image_checks``.

Every failure raises ``client.qc.PatientQCError`` with a reason code and a
message naming the file and what to do; the caller adds the patient id.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from hccfed.client.dicom_series import read_series
from hccfed.client.qc import PatientQCError


@dataclass(frozen=True)
class Volume:
    """One manifest entry read: the image, notes on skipped files, the DICOM PatientIDs (empty for a file)."""

    image: sitk.Image
    notes: list[str]
    patient_ids: frozenset[str] = frozenset()


def read_volume_info(path: str | Path, field: str, roots: tuple[Path, ...] = ()) -> Volume:
    """One manifest entry (an image file or a DICOM series folder) as a Volume.

    ``roots``: the folders inputs may lie in (the files of a series folder are checked against them).
    """
    path = Path(path)
    if not path.exists():
        raise PatientQCError("missing_file", f"file not found: {path}", field, path)
    if path.is_dir():
        series = read_series(path, field, roots=roots)
        return Volume(series.image, series.notes, series.patient_ids)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise PatientQCError("unreadable_image", f"cannot read {path}: {_first_line(err)}; re-export the file",
                             field, path) from None
    if path.name.lower().endswith((".nii", ".nii.gz")):
        _check_nifti_complete(path, field)
    if image.GetDimension() == 2 or (image.GetDimension() == 3 and min(image.GetSize()) == 1):
        if _is_dicom_file(path):
            raise PatientQCError("image_geometry", f"{path} is a single DICOM slice; point the manifest at the "
                                 "folder holding the whole series", field, path)
    return Volume(image, [])


def read_volume(path: str | Path, field: str) -> tuple[sitk.Image, list[str]]:
    """(image, notes) of one manifest entry: an image file or a DICOM series folder."""
    volume = read_volume_info(path, field)
    return volume.image, volume.notes


def _is_dicom_file(path: Path) -> bool:
    with path.open("rb") as handle:
        head = handle.read(132)
    return head[128:] == b"DICM"


def _check_nifti_complete(path: Path, field: str) -> None:
    """What ITK does not check in a NIfTI file: every voxel its header announces present (ITK reads a
    truncated file as zeros), no NaN or infinite voxel (ITK reads NaN as 0), and a world geometry.

    The file is read whole (gzip or not, whatever its name says) and parsed by nibabel.
    """
    import gzip
    import zlib

    import nibabel

    try:
        with path.open("rb") as handle:
            raw = handle.read()
        data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
        kind = nibabel.Nifti2Image if len(data) >= 4 and int.from_bytes(data[:4], "little") == 540 else \
            nibabel.Nifti1Image
        header = kind.header_class.from_fileobj(io.BytesIO(data), check=False)
        magic = bytes(header["magic"]).rstrip(b"\0")
        if magic not in (b"n+1", b"ni1", b"n+2", b"ni2") or int(header["sizeof_hdr"]) not in (348, 540):
            raise ValueError(f"its header is not a NIfTI header (magic {magic!r}, sizeof_hdr {header['sizeof_hdr']})")
        expected = int(header.get_data_offset()) + int(np.prod(header.get_data_shape())) * \
            header.get_data_dtype().itemsize
    except (OSError, EOFError, zlib.error, ValueError, nibabel.filebasedimages.ImageFileError,
            nibabel.spatialimages.HeaderDataError) as err:
        raise PatientQCError("unreadable_image", f"{path} is truncated or corrupt ({err}); re-export the file",
                             field, path) from None
    if len(data) < expected:
        raise PatientQCError("unreadable_image", f"{path} is truncated: {len(data)} bytes of image data where its "
                             f"header announces {expected}; re-export the file", field, path)
    if len(data) > expected or float(header["vox_offset"]) != int(header["vox_offset"]):
        raise PatientQCError("unreadable_image", f"{path} holds {len(data)} bytes where its header announces "
                             f"{expected} (data offset {float(header['vox_offset']):g}): a corrupt header would "
                             "shift every voxel; re-export the file", field, path)
    slope, inter = header.get_slope_inter()
    if header.get_data_dtype().kind == "f" or (slope is not None and slope != 1) or (inter is not None and inter != 0):
        with np.errstate(all="ignore"):
            values = np.asanyarray(kind.from_bytes(data).dataobj)
        bad = int(np.count_nonzero(~np.isfinite(values)))
        if bad:
            raise PatientQCError("non_finite_voxels", f"{path} holds {bad} NaN or infinite voxel(s) of {values.size} "
                                 "(SimpleITK would read them as 0); re-export the volume", field, path)
    codes = (int(header["qform_code"]), int(header["sform_code"]))
    if not all(0 <= c <= 5 for c in codes):
        raise PatientQCError("image_geometry", f"{path} has invalid geometry codes (qform_code {codes[0]}, sform_code "
                             f"{codes[1]}; valid: 0-5): a corrupt header whose orientation would be dropped; "
                             "re-export it", field, path)
    if codes == (0, 0):
        raise PatientQCError("image_geometry", f"{path} has no world geometry (its qform_code and sform_code are "
                             "both 0): its origin and orientation are unknown; re-export it from the DICOM "
                             "(e.g. with dcm2niix)", field, path)


def _first_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    useful = [line for line in lines if "description" in line.lower() or "error" in line.lower()]
    return (useful or lines or ["unknown error"])[-1][:300]
