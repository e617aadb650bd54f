"""Read a patient's volumes, NIfTI files or DICOM series folders, and check their geometry.

A phase (or the mask) is either one image file SimpleITK reads (NIfTI, NRRD,
MHA, ...) or a folder holding one DICOM series. A series is read with
SimpleITK's ImageSeriesReader on the files GDCM assigns to it; slices are
ordered by their position along the slice normal (ImagePositionPatient
projected on the normal of ImageOrientationPatient), never by file name, and
the volume keeps the scanner's orientation and spacing. Before the pixels are
read, the slice positions are checked: no two slices at one position, no
missing slice (a gap larger than 1.5 x the series' usual step).

Every failure raises ``client.qc.PatientQCError`` with a reason code and a
message naming the file and what to do; the caller adds the patient id.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from hccfed.client.qc import PatientQCError

#: A step between consecutive slices above this multiple of the median step is a missing slice.
GAP_FACTOR = 1.5


def read_volume(path: str | Path, field: str) -> tuple[sitk.Image, list[str]]:
    """(3-D image, warnings) of one manifest entry: an image file or a DICOM series folder."""
    path = Path(path)
    if not path.exists():
        raise PatientQCError("missing_file", f"file not found: {path}", field, path)
    if path.is_dir():
        return read_dicom_series(path, field)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise PatientQCError("unreadable_image", f"cannot read {path}: {_first_line(err)}; re-export the file",
                             field, path) from None
    if path.name.lower().endswith((".nii", ".nii.gz")):
        _check_nifti_complete(path, field)
    return _require_3d(image, path, field), []


def _check_nifti_complete(path: Path, field: str) -> None:
    """ITK reads a truncated NIfTI without complaint (the missing voxels come back as zeros): check
    that the file holds every voxel its header announces, and that a .gz stream is complete."""
    import gzip
    import zlib

    import nibabel

    try:
        header = nibabel.load(str(path)).header
        expected = int(header.get_data_offset()) + int(np.prod(header.get_data_shape())) * \
            header.get_data_dtype().itemsize
        if path.name.lower().endswith(".gz"):
            size = 0
            with gzip.open(path, "rb") as stream:
                while chunk := stream.read(1 << 20):
                    size += len(chunk)
        else:
            size = path.stat().st_size
    except (OSError, EOFError, zlib.error, ValueError, nibabel.filebasedimages.ImageFileError) as err:
        raise PatientQCError("unreadable_image", f"{path} is truncated or corrupt ({err}); re-export the file",
                             field, path) from None
    if size < expected:
        raise PatientQCError("unreadable_image", f"{path} is truncated: {size} bytes of image data where its "
                             f"header announces {expected}; re-export the file", field, path)


def _first_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    useful = [line for line in lines if "description" in line.lower() or "error" in line.lower()]
    return (useful or lines or ["unknown error"])[-1][:300]


def _require_3d(image: sitk.Image, path: Path, field: str) -> sitk.Image:
    if image.GetDimension() != 3 or min(image.GetSize()) < 2:
        raise PatientQCError("unreadable_image", f"{path} is not a 3-D volume (size {image.GetSize()}); "
                             "each phase needs a whole 3-D acquisition", field, path)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise PatientQCError("unreadable_image", f"{path} has {image.GetNumberOfComponentsPerPixel()} components "
                             "per voxel; expected a scalar (grey-level) volume", field, path)
    return image


def _header(file: str) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    reader.LoadPrivateTagsOff()
    reader.ReadImageInformation()
    return reader


def _tag(reader: sitk.ImageFileReader, key: str, default: str = "") -> str:
    return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else default


def describe_series(folder: str | Path) -> list[tuple[str, int, str]]:
    """(series instance UID, number of files, series description) of every DICOM series in ``folder``."""
    out = []
    for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)):
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
        try:
            description = _tag(_header(files[0]), "0008|103e")
        except RuntimeError:
            description = ""
        out.append((uid, len(files), description))
    return out


def _slice_positions(files: list[str], folder: Path, field: str) -> tuple[np.ndarray, list[str]]:
    """Position of each slice along the series' normal (mm), with the files in that order."""
    positions, normal = [], None
    for file in files:
        try:
            reader = _header(file)
        except RuntimeError as err:
            raise PatientQCError("unreadable_image", f"cannot read DICOM header of {file}: {_first_line(err)}; "
                                 "the file is corrupt or truncated, re-export the series", field, file) from None
        try:
            ipp = np.array([float(v) for v in _tag(reader, "0020|0032").split("\\")])
            iop = np.array([float(v) for v in _tag(reader, "0020|0037").split("\\")])
            if ipp.shape != (3,) or iop.shape != (6,):
                raise ValueError
        except ValueError:
            raise PatientQCError("dicom_series", f"{file} has no valid ImagePositionPatient / "
                                 "ImageOrientationPatient; slices cannot be placed in space", field, file) from None
        if normal is None:
            normal = np.cross(iop[:3], iop[3:])
        positions.append(float(ipp @ normal))
    order = np.argsort(positions, kind="stable")
    return np.asarray(positions)[order], [files[i] for i in order]


def _check_spacing(positions: np.ndarray, files: list[str], folder: Path, field: str) -> None:
    steps = np.diff(positions)
    for i in np.flatnonzero(steps < 1e-3):
        raise PatientQCError("dicom_series", f"two slices at the same position ({positions[i]:.2f} mm): "
                             f"{Path(files[i]).name} and {Path(files[i + 1]).name} in {folder}; the folder may "
                             "hold two acquisitions of one series, keep one", field, folder)
    usual = float(np.median(steps))
    for i in np.flatnonzero(steps > GAP_FACTOR * usual):
        missing = int(round(steps[i] / usual)) - 1
        raise PatientQCError("dicom_series", f"missing slice(s) in {folder}: a gap of {steps[i]:.2f} mm between "
                             f"{Path(files[i]).name} ({positions[i]:.2f} mm) and {Path(files[i + 1]).name} "
                             f"({positions[i + 1]:.2f} mm) where the series' step is {usual:.2f} mm "
                             f"(about {missing} slice(s) missing); re-export the complete series", field, folder)


def read_dicom_series(folder: str | Path, field: str, series_uid: str | None = None
                      ) -> tuple[sitk.Image, list[str]]:
    """(3-D image, warnings) of the one DICOM series in ``folder`` (or the one named ``series_uid``).

    Files in the folder that are not part of the series (a README, a DICOMDIR,
    a file that is not DICOM) are ignored and reported as warnings.
    """
    folder = Path(folder)
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # "No Series were found": reported below, clearly
    try:
        ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)
    if not ids:
        raise PatientQCError("dicom_series", f"no DICOM series found in folder {folder}; the manifest should "
                             "name a folder of DICOM files or a NIfTI file", field, folder)
    if series_uid is None and len(ids) > 1:
        shown = "; ".join(f"{uid} ({n} files, description {d!r})" for uid, n, d in describe_series(folder))
        raise PatientQCError("dicom_series", f"folder {folder} holds {len(ids)} DICOM series: {shown}; move each "
                             "series into its own folder and point the manifest at the folder of this phase",
                             field, folder)
    uid = series_uid or ids[0]
    if uid not in ids:
        raise PatientQCError("dicom_series", f"series {uid} not found in {folder} (found: {list(ids)})",
                             field, folder)
    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
    if len(files) < 2:
        raise PatientQCError("dicom_series", f"the series in {folder} has {len(files)} slice; a phase needs a 3-D "
                             "series of several slices", field, folder)
    members = {Path(f).resolve() for f in files}
    others = sorted(p for p in folder.iterdir() if p.is_file() and p.resolve() not in members)
    for other in others:  # DICOM files GDCM could not parse: truncated or corrupt, never silently dropped
        if _looks_like_dicom(other):
            raise PatientQCError("unreadable_image", f"cannot read DICOM file {other}: it is truncated or corrupt "
                                 "(GDCM cannot parse it); re-export the series", field, other)
    positions, files = _slice_positions(files, folder, field)
    _check_spacing(positions, files, folder, field)
    warnings = []
    if others:
        names = [p.name for p in others]
        warnings.append(f"{folder}: ignored {len(names)} file(s) that are not DICOM: "
                        + ", ".join(names[:5]) + (" ..." if len(names) > 5 else ""))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError:
        bad = _first_unreadable(files)
        raise PatientQCError("unreadable_image", f"cannot read the pixels of {bad or folder}: the file is "
                             "truncated or corrupt; re-export the series", field, bad or folder) from None
    return _require_3d(image, folder, field), warnings


def _looks_like_dicom(path: Path) -> bool:
    """A DICOM Part 10 file: 128-byte preamble then "DICM"."""
    try:
        with path.open("rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _first_unreadable(files: list[str]) -> str | None:
    for file in files:
        try:
            sitk.ReadImage(file)
        except RuntimeError:
            return file
    return None


def _physical_extent(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned physical bounding box (mm) of an image's voxel centres."""
    size = np.array(image.GetSize()) - 1
    corners = [image.TransformContinuousIndexToPhysicalPoint([float(c) for c in np.array(bits) * size])
               for bits in np.ndindex(2, 2, 2)]
    corners = np.array(corners)
    return corners.min(axis=0), corners.max(axis=0)


def check_mask(mask: sitk.Image, field: str, file: str | Path) -> None:
    """The mask must have at least one voxel set."""
    stats = sitk.StatisticsImageFilter()
    stats.Execute(sitk.Cast(mask > 0, sitk.sitkUInt8))
    if stats.GetSum() == 0:
        raise PatientQCError("empty_mask", f"the tumour mask {file} is empty (no voxel > 0); re-export the "
                             "segmentation", field, file)


def check_overlap(mask: sitk.Image, image: sitk.Image, field: str, file: str | Path, mask_file: str | Path) -> None:
    """The tumour (mask > 0) must lie inside ``image`` in physical space (its centroid at least).

    Compared in millimetres, so a mask on another grid than the image is fine;
    a mask of another patient or exported with a wrong origin is not.
    """
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(mask > 0, sitk.sitkUInt8))
    centroid = stats.GetCentroid(1)
    index = np.array(image.TransformPhysicalPointToContinuousIndex(centroid))
    size = np.array(image.GetSize())
    if np.all(index >= -0.5) and np.all(index <= size - 0.5):
        return
    low, high = _physical_extent(image)
    extent = ", ".join(f"[{lo:.1f}, {hi:.1f}]" for lo, hi in zip(low, high))
    raise PatientQCError(
        "mask_outside_image",
        f"the tumour of mask {mask_file} (centre {tuple(round(c, 1) for c in centroid)} mm) lies outside the "
        f"image {file} (x, y, z extent {extent} mm); check that the mask belongs to this patient and that both "
        "files keep their origin and orientation", field, file)
