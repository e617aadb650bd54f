"""Read one DICOM series folder as a 3-D volume, after checking that its slices form one.

Every file of the folder is read first (pydicom, header and pixel length):
- files that are not DICOM (a README, a thumbnail) and DICOM objects that are
  no image slice (a DICOMDIR, a structured report, a presentation state, an RT
  or segmentation object: ``common.schema.NON_IMAGE_SOP_PREFIXES``) are
  skipped, each with a note (QC reason ``ignored_file``, the patient is kept);
- an image file that pydicom cannot parse, or whose pixel data is shorter than
  its header announces, is truncated: ``unreadable_image``;
- multi-frame and colour objects are refused (``dicom_unsupported``).

The image slices must then be one series (one SeriesInstanceUID,
``dicom_series``) of one patient (``patient_mismatch``) whose slices share
their orientation, pixel spacing and size, lie on one line along the slice
normal and are evenly spaced (``common.schema.DICOM_RULES``; ``dicom_geometry``
for a deviation, ``dicom_series`` for two slices at one position or a missing
slice). Slices are ordered by their position along the normal, never by file
name; SimpleITK (GDCM) then reads the pixels in that order, which decodes the
usual transfer syntaxes (implicit / explicit VR, big endian, deflate, RLE,
JPEG, JPEG-LS, JPEG 2000).

Every failure raises ``client.qc.PatientQCError`` naming the folder or file.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from hccfed.client.qc import PatientQCError
from hccfed.common.schema import DICOM_RULES, NON_IMAGE_SOP_PREFIXES


#: A well-formed DICOM UID: numeric components separated by dots, at most 64 characters.
_UID = re.compile(r"[0-9]+(\.[0-9]+)*", re.ASCII)


@dataclass(frozen=True)
class Slice:
    """The header fields of one image slice that placing it in space needs."""

    file: str
    series_uid: str
    description: str
    patient_id: str
    position: np.ndarray | None  # ImagePositionPatient (mm)
    orientation: np.ndarray | None  # ImageOrientationPatient (6 direction cosines)
    pixel_spacing: np.ndarray | None  # (row spacing, column spacing) mm
    shape: tuple[int, int]
    rescale: tuple[float, float] = (1.0, 0.0)  # RescaleSlope, RescaleIntercept


@dataclass(frozen=True)
class Series:
    """A read series: the volume, the notes on skipped files and the PatientIDs its slices carry."""

    image: sitk.Image
    notes: list[str]
    patient_ids: frozenset[str]


def _floats(ds, keyword: str, n: int) -> np.ndarray | None:
    try:
        values = np.array([float(v) for v in ds.get(keyword) or []], dtype=float)
    except (TypeError, ValueError):
        return None
    return values if values.shape == (n,) and np.all(np.isfinite(values)) else None


def _expected_pixel_bytes(ds) -> int:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    return int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1) * frames * \
        (int(ds.BitsAllocated) // 8 if int(ds.BitsAllocated) >= 8 else 1)


def _read_slice(path: Path, field: str) -> Slice | str | None:
    """A Slice, a note (str) for a skipped object, or None for a file that is not DICOM at all."""
    with path.open("rb") as handle:
        head = handle.read(132)
    part10 = len(head) == 132 and head[128:] == b"DICM"
    if not part10 and path.suffix.lower() not in (".dcm", ".dicom", ".ima"):
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(path, force=not part10)
        except Exception as err:  # pydicom raises many kinds on a damaged file
            raise PatientQCError("unreadable_image", f"cannot read DICOM file {path}: it is truncated or corrupt "
                                 f"({type(err).__name__}: {str(err)[:120]}); re-export the series",
                                 field, path) from None
    try:
        return _classify(ds, path, field, part10, caught)
    except PatientQCError:
        raise
    except Exception as err:  # a header damaged in a way no rule names: still this file, still refused
        raise PatientQCError("unreadable_image", f"cannot read DICOM file {path}: its header is corrupt "
                             f"({type(err).__name__}: {str(err)[:120]}); re-export the series", field, path) from None


def _classify(ds, path: Path, field: str, part10: bool, caught) -> Slice | str | None:
    meta = getattr(ds, "file_meta", None)
    sop = str(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else ""))
    if sop and not _UID.fullmatch(sop):
        raise PatientQCError("unreadable_image", f"DICOM file {path} has a corrupt SOP class UID {sop[:70]!r}; "
                             "re-export the series", field, path)
    if not sop and "PixelData" not in ds:
        if part10:
            raise PatientQCError("unreadable_image", f"cannot read DICOM file {path}: no SOP class and no pixel "
                                 "data (truncated or corrupt); re-export the series", field, path)
        return None
    name = pydicom.uid.UID(sop).name if sop else ""
    if sop.startswith(NON_IMAGE_SOP_PREFIXES) or (sop and "Image Storage" not in name and "PixelData" not in ds):
        return f"{path.name} ({name or sop})"  # a directory, report, private non-image object...: skipped
    truncated = any("End of file" in str(w.message) or "truncat" in str(w.message).lower() for w in caught)
    if "PixelData" not in ds or truncated:
        raise PatientQCError("unreadable_image", f"DICOM file {path} is truncated or corrupt: its pixel data is "
                             "missing or cut short; re-export the series", field, path)
    syntax = meta.get("TransferSyntaxUID") if meta else None
    if syntax is not None and not syntax.is_transfer_syntax:
        raise PatientQCError("unreadable_image", f"DICOM file {path} names an unknown transfer syntax {str(syntax)!r} "
                             "(a corrupt header); re-export the series", field, path)
    try:
        expected = _expected_pixel_bytes(ds)
    except (AttributeError, TypeError, ValueError):
        raise PatientQCError("unreadable_image", f"DICOM file {path} lacks Rows / Columns / BitsAllocated; "
                             "re-export the series", field, path) from None
    if (syntax is None or not syntax.is_compressed) and len(ds.PixelData) < expected:
        raise PatientQCError("unreadable_image", f"DICOM file {path} is truncated: {len(ds.PixelData)} bytes of "
                             f"pixel data where its header announces {expected}; re-export the series", field, path)
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise PatientQCError("dicom_unsupported", f"{path} is a multi-frame object ({ds.NumberOfFrames} frames); "
                             "export the phase as classic single-frame slices", field, path)
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise PatientQCError("dicom_unsupported", f"{path} is a colour image ({ds.get('PhotometricInterpretation')})"
                             "; a phase must be grey-level", field, path)
    return Slice(str(path), str(ds.get("SeriesInstanceUID", "") or ""), str(ds.get("SeriesDescription", "") or ""),
                 str(ds.get("PatientID", "") or "").strip(), _floats(ds, "ImagePositionPatient", 3),
                 _floats(ds, "ImageOrientationPatient", 6), _floats(ds, "PixelSpacing", 2),
                 (int(ds.Rows), int(ds.Columns)), _rescale(ds, path, field))


def _rescale(ds, path: Path, field: str) -> tuple[float, float]:
    try:
        slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    except (TypeError, ValueError):
        slope = intercept = float("nan")
    if not (np.isfinite(slope) and np.isfinite(intercept)) or slope == 0:
        raise PatientQCError("unreadable_image", f"{path} has an invalid RescaleSlope / RescaleIntercept "
                             f"({ds.get('RescaleSlope')!r}, {ds.get('RescaleIntercept')!r}); re-export the series",
                             field, path)
    return slope, intercept


def scan_folder(folder: Path, field: str, roots: tuple[Path, ...] = ()) -> tuple[dict[str, list[Slice]], list[str]]:
    """({series uid: slices}, notes on skipped files) of the files directly in ``folder``.

    ``roots``: the folders inputs may lie in; a file that resolves (through a symbolic link) outside all
    of them is refused.
    """
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    series: dict[str, list[Slice]] = {}
    skipped, other = [], []
    for path in files:
        real = path.resolve()
        if roots and not any(real == r or real.is_relative_to(r) for r in roots):
            raise PatientQCError("path_outside_root", f"{path} in the series folder is a link to {real}, outside "
                                 "the data folder; copy the file into the export", field, path)
        found = _read_slice(path, field)
        if found is None:
            other.append(path.name)
        elif isinstance(found, str):
            skipped.append(found)
        else:
            if not found.series_uid:
                raise PatientQCError("dicom_series", f"{path} has no SeriesInstanceUID; re-export the series",
                                     field, path)
            series.setdefault(found.series_uid, []).append(found)
    notes = []
    if skipped:
        notes.append(f"{folder}: skipped {len(skipped)} DICOM object(s) that are not image slices: "
                     + ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
    if other:
        notes.append(f"{folder}: ignored {len(other)} file(s) that are not DICOM: "
                     + ", ".join(other[:5]) + (" ..." if len(other) > 5 else ""))
    if not series:
        subfolders = sorted(p.name for p in folder.iterdir() if p.is_dir())
        hint = (f"; it holds the subfolder(s) {subfolders[:5]}: point the manifest at the folder of the series itself"
                if subfolders else "; the manifest should name a folder of DICOM files or a NIfTI file")
        raise PatientQCError("dicom_series", f"no DICOM image series found in folder {folder}{hint}", field, folder)
    return series, notes


def _geometry(slices: list[Slice], folder: Path, field: str) -> tuple[np.ndarray, list[Slice]]:
    """Slices sorted along the normal, with their positions (mm); raises when they are not one regular grid."""
    rules = DICOM_RULES

    def fail(reason: str, text: str, file=folder):
        raise PatientQCError(reason, text, field, file)

    for s in slices:
        if s.position is None or s.orientation is None:
            fail("dicom_geometry", f"{s.file} has no valid ImagePositionPatient / ImageOrientationPatient; "
                 "slices cannot be placed in space", s.file)
        if s.pixel_spacing is None or np.any(s.pixel_spacing <= 0):
            fail("dicom_geometry", f"{s.file} has no valid PixelSpacing; the voxel size is unknown", s.file)
    first = slices[0]
    row, col = first.orientation[:3], first.orientation[3:]
    if (abs(np.linalg.norm(row) - 1) > rules.orientation_tolerance or abs(np.linalg.norm(col) - 1)
            > rules.orientation_tolerance or abs(row @ col) > rules.orientation_tolerance):
        fail("dicom_geometry", f"{first.file}: ImageOrientationPatient {list(first.orientation)} is not two "
             "orthogonal unit vectors", first.file)
    for s in slices[1:]:
        if s.shape != first.shape:
            fail("dicom_geometry", f"slices of different sizes in {folder}: {Path(first.file).name} is "
                 f"{first.shape[0]} x {first.shape[1]}, {Path(s.file).name} is {s.shape[0]} x {s.shape[1]}", s.file)
        if np.max(np.abs(s.orientation - first.orientation)) > rules.orientation_tolerance:
            fail("dicom_geometry", f"slices with different orientations in {folder}: {Path(first.file).name} "
                 f"{list(first.orientation)}, {Path(s.file).name} {list(s.orientation)} (a localizer or another "
                 "acquisition mixed in?)", s.file)
        if np.max(np.abs(s.pixel_spacing - first.pixel_spacing)) > rules.pixel_spacing_tolerance_mm:
            fail("dicom_geometry", f"slices with different pixel spacings in {folder}: {Path(first.file).name} "
                 f"{list(first.pixel_spacing)} mm, {Path(s.file).name} {list(s.pixel_spacing)} mm", s.file)
    normal = np.cross(row, col)
    along = np.array([s.position @ normal for s in slices])
    order = np.argsort(along, kind="stable")
    slices, along = [slices[i] for i in order], along[order]
    pixel = float(np.min(first.pixel_spacing))
    for s in slices[1:]:
        offset = s.position - slices[0].position
        shift = np.hypot(offset @ row, offset @ col)
        if shift > rules.in_plane_shift_pixels * pixel:
            fail("dicom_geometry", f"{Path(s.file).name} in {folder} is shifted {shift:.2f} mm within the slice "
                 f"plane relative to {Path(slices[0].file).name}: the slices do not stack into one volume", s.file)
    steps = np.diff(along)
    for i in np.flatnonzero(steps < rules.same_position_mm):
        fail("dicom_series", f"two slices at the same position ({along[i]:.2f} mm): {Path(slices[i].file).name} "
             f"and {Path(slices[i + 1].file).name} in {folder}; the folder may hold two acquisitions of one "
             "series, keep one")
    usual = float(np.median(steps))
    for i in np.flatnonzero(steps > rules.gap_factor * usual):
        fail("dicom_series", f"missing slice(s) in {folder}: a gap of {steps[i]:.2f} mm between "
             f"{Path(slices[i].file).name} ({along[i]:.2f} mm) and {Path(slices[i + 1].file).name} "
             f"({along[i + 1]:.2f} mm) where the series' step is {usual:.2f} mm (about "
             f"{int(round(steps[i] / usual)) - 1} slice(s) missing); re-export the complete series")
    tolerance = max(rules.spacing_tolerance_mm, rules.spacing_tolerance * usual)
    for i in np.flatnonzero(np.abs(steps - usual) > tolerance):
        fail("dicom_geometry", f"uneven slice spacing in {folder}: {steps[i]:.3f} mm between "
             f"{Path(slices[i].file).name} and {Path(slices[i + 1].file).name} where the series' step is "
             f"{usual:.3f} mm (tolerance {tolerance:.3f} mm); the volume would be distorted")
    return along, slices


def describe_series(folder: str | Path) -> list[tuple[str, int, str]]:
    """(series instance UID, number of image files, series description) of every DICOM series in ``folder``."""
    series, _ = scan_folder(Path(folder), "")
    return [(uid, len(s), s[0].description) for uid, s in series.items()]


def read_series(folder: str | Path, field: str, series_uid: str | None = None,
                roots: tuple[Path, ...] = ()) -> Series:
    """The one DICOM series in ``folder`` (or the one named ``series_uid``), checked, as a 3-D volume."""
    folder = Path(folder)
    series, notes = scan_folder(folder, field, roots)
    if series_uid is None and len(series) > 1:
        shown = "; ".join(f"{uid} ({len(s)} files, description {s[0].description!r})" for uid, s in series.items())
        raise PatientQCError("dicom_series", f"folder {folder} holds {len(series)} DICOM series: {shown}; move each "
                             "series into its own folder and point the manifest at the folder of this phase",
                             field, folder)
    uid = series_uid or next(iter(series))
    if uid not in series:
        raise PatientQCError("dicom_series", f"series {uid} not found in {folder} (found: {list(series)})",
                             field, folder)
    slices = series[uid]
    if len(slices) < 2:
        raise PatientQCError("dicom_series", f"the series in {folder} has {len(slices)} slice; a phase needs a 3-D "
                             "series of several slices", field, folder)
    patients = {s.patient_id for s in slices if s.patient_id}
    if len(patients) > 1:
        raise PatientQCError("patient_mismatch", f"the slices in {folder} carry {len(patients)} PatientIDs "
                             f"({sorted(patients)[:4]}); one series belongs to one patient", field, folder)
    _, slices = _geometry(slices, folder, field)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([s.file for s in slices])
    rescales = {s.rescale for s in slices}
    if len(rescales) > 1 or any(v != round(v) for r in rescales for v in r):
        # per-slice or fractional rescaling: read in float, or ITK casts every slice to the first one's integer type
        reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        image = reader.Execute()
    except RuntimeError:
        bad = _first_unreadable([s.file for s in slices])
        raise PatientQCError("unreadable_image", f"cannot read the pixels of {bad or folder}: the file is "
                             "truncated, corrupt or in an undecodable transfer syntax; re-export the series",
                             field, bad or folder) from None
    return Series(image, notes, frozenset(patients))


def _first_unreadable(files: list[str]) -> str | None:
    for file in files:
        try:
            sitk.ReadImage(file)
        except RuntimeError:
            return file
    return None
