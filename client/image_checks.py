"""The validation layer's image rules: every phase and the tumour mask of one patient, before any preparation.

Rules are declared in ``hccfed.common.schema`` (``IMAGE_RULES``, ``MASK_RULES``)
and the mask's label semantics in the site YAML (``mask_labels``). Applied in
this order, each failure a ``PatientQCError`` with its reason code:

- every volume: 3-D (a 4-D file with one time point is its 3-D volume), one
  component, at least ``min_voxels_per_axis`` per axis, a finite plausible
  spacing and an orthonormal direction (``image_geometry``), finite voxels
  (``non_finite_voxels``);
- a phase: values of a plausible magnitude (``implausible_intensity``), more
  than a handful of distinct values (``blank_image``: a constant volume, or a
  mask given as a phase);
- the mask: whole-numbered values among 0, the tumour and the ignored labels
  (``mask_labels``: a probability map, an undeclared LiTS-style liver label, the
  image given as the mask), then binary: tumour or not; a tumour at all
  (``empty_mask``); a plausible size for the mask phase's field of view
  (``implausible_mask``); on the mask phase's grid size only with its geometry
  (``mask_geometry``); inside every phase (``mask_outside_image``), a tumour cut
  by a field of view's edge is kept with a ``tumour_cut`` warning;
- the patient: DICOM phases of one PatientID (``patient_mismatch``), no two
  fields with the same voxels (``duplicate_image``).

``load_patient`` returns the checked volumes, so preparation reads each file once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from hccfed.client.ingest import read_volume_info
from hccfed.client.qc import PatientQCError
from hccfed.common.schema import IMAGE_RULES, MASK_RULES, PHASES
from hccfed.common.site_config import MaskLabels, Preprocessing


@dataclass(frozen=True)
class PatientJob:
    """What one worker needs to check (and prepare) one patient (picklable)."""

    patient_id: str
    phase_paths: tuple[str, ...]  # in PHASES order
    phase_fields: tuple[str, ...]  # the manifest columns they came from
    mask_path: str
    mask_field: str
    mask_phase: str
    prep: Preprocessing
    mask_labels: MaskLabels = field(default_factory=MaskLabels)
    roots: tuple[Path, ...] = ()  # the folders inputs may lie in (files inside a DICOM folder are checked)


@dataclass(frozen=True)
class Note:
    """A finding that keeps the patient (reason ``ignored_file`` or ``tumour_cut``)."""

    reason: str
    field: str
    file: str
    message: str


@dataclass
class PatientVolumes:
    """One patient's checked volumes: binary tumour mask (uint8), phases (float32), notes, content digests."""

    mask: sitk.Image
    images: dict[str, sitk.Image]
    notes: list[Note]
    digests: dict[str, tuple[str, str]]  # manifest field -> (digest of the voxels, file)


def _fail(reason: str, message: str, field_: str, file) -> PatientQCError:
    return PatientQCError(reason, message, field_, file)


def check_volume(image: sitk.Image, field_: str, file) -> sitk.Image:
    """The geometry and voxel rules every volume obeys; returns the 3-D scalar image."""
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = sitk.Extract(image, [*image.GetSize()[:3], 0], [0, 0, 0, 0])
    if image.GetDimension() != 3:
        raise _fail("image_geometry", f"{file} is a {image.GetDimension()}-D image (size {image.GetSize()}); each "
                    "phase and the mask must be one 3-D volume", field_, file)
    if image.GetNumberOfComponentsPerPixel() != 1 or "complex" in image.GetPixelIDTypeAsString().lower():
        raise _fail("image_geometry", f"{file} has {image.GetNumberOfComponentsPerPixel()} components per voxel "
                    f"({image.GetPixelIDTypeAsString()}); expected a scalar (grey-level) volume", field_, file)
    size, spacing = np.array(image.GetSize()), np.array(image.GetSpacing())
    if size.min() < IMAGE_RULES.min_voxels_per_axis:
        raise _fail("image_geometry", f"{file} is not a 3-D volume (size {tuple(int(s) for s in size)}); each "
                    f"axis needs at least {IMAGE_RULES.min_voxels_per_axis} voxels", field_, file)
    low, high = IMAGE_RULES.spacing_mm
    if not (np.all(np.isfinite(spacing)) and np.all(spacing >= low) and np.all(spacing <= high)):
        raise _fail("image_geometry", f"{file} has voxel spacing {tuple(spacing)} mm, outside [{low}, {high}] mm; "
                    "its header is damaged or in other units", field_, file)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    if (not np.all(np.isfinite(direction)) or not np.all(np.isfinite(image.GetOrigin()))
            or np.abs(direction.T @ direction - np.eye(3)).max() > IMAGE_RULES.direction_tolerance):
        raise _fail("image_geometry", f"{file} has an invalid orientation (direction {tuple(direction.ravel())}, "
                    f"origin {image.GetOrigin()})", field_, file)
    array = sitk.GetArrayViewFromImage(image)
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise _fail("non_finite_voxels", f"{file} holds {bad} NaN or infinite voxel(s) of {array.size}; re-export "
                    "the volume", field_, file)
    return image


def digest(image: sitk.Image) -> str:
    """Hash of a volume's voxels (values, type and shape; not its header): equal content, equal digest."""
    array = np.ascontiguousarray(sitk.GetArrayViewFromImage(image))
    h = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    h.update(array.tobytes())
    return h.hexdigest()[:24]


def check_phase(image: sitk.Image, field_: str, file) -> sitk.Image:
    """A phase volume: the common rules, then enough distinct values; returned as float32."""
    image = check_volume(image, field_, file)
    array = sitk.GetArrayViewFromImage(image)
    low, high = float(array.min()), float(array.max())
    if max(abs(low), abs(high)) > IMAGE_RULES.max_abs_intensity:
        raise _fail("implausible_intensity", f"{file} holds voxel values in [{low:.4g}, {high:.4g}], beyond "
                    f"+-{IMAGE_RULES.max_abs_intensity:g}: a corrupt value or a wrong rescale", field_, file)
    sample = array.ravel()[:: max(1, array.size // 200_000)]  # a sample decides quickly for a real phase
    if np.unique(sample).size < IMAGE_RULES.min_distinct_values:
        values = np.unique(array)
        if values.size < IMAGE_RULES.min_distinct_values:
            shown = (f"a constant value {float(values[0]):g}" if values.size == 1
                     else f"only {values.size} distinct values {[float(v) for v in values]}")
            raise _fail("blank_image", f"{file} holds {shown}: a blank volume or a mask, not an MR phase",
                        field_, file)
    return sitk.Cast(image, sitk.sitkFloat32)


def binary_tumour(mask: sitk.Image, labels: MaskLabels, field_: str, file) -> sitk.Image:
    """The mask's tumour as a uint8 0/1 image, after its declared label semantics."""
    mask = check_volume(mask, field_, file)
    array = sitk.GetArrayViewFromImage(mask)
    values = np.unique(array)
    declared = f"declared in the site YAML: tumour {list(labels.tumour)}, ignore {list(labels.ignore)}; 0 = background"
    fractional = values[values != np.round(values)] if array.dtype.kind == "f" else values[:0]
    if fractional.size:
        raise _fail("mask_labels", f"the mask {file} holds non-whole values (e.g. {fractional[:3].tolist()}): a "
                    "probability map or an image, not a label map; export a label map (" + declared + ")",
                    field_, file)
    unknown = sorted(set(values.tolist()) - {0, *labels.tumour, *labels.ignore})
    if unknown:
        what = (f"{values.size} distinct values: an image rather than a label map" if values.size > 16
                else f"label(s) {[int(v) for v in unknown[:8]]} that the site YAML does not declare")
        hint = ("; a liver / tumour label map (liver 1, tumour 2) needs mask_labels: {tumour: [2], ignore: [1]}"
                if values.size <= 16 else "")
        raise _fail("mask_labels", f"the mask {file} holds {what} ({declared}){hint}", field_, file)
    tumour = np.isin(array, labels.tumour)
    if not tumour.any():
        raise _fail("empty_mask", f"the tumour mask {file} has no voxel with a tumour label {list(labels.tumour)} "
                    f"(values present: {[int(v) for v in values[:8]]}); re-export the segmentation or set "
                    "mask_labels", field_, file)
    binary = sitk.GetImageFromArray(tumour.astype(np.uint8))
    binary.CopyInformation(mask)
    return binary


def _index_to_physical(image: sitk.Image, index_xyz: np.ndarray) -> np.ndarray:
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return np.asarray(image.GetOrigin()) + (index_xyz * np.asarray(image.GetSpacing())) @ direction.T


def _physical_to_index(image: sitk.Image, points: np.ndarray) -> np.ndarray:
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return ((points - np.asarray(image.GetOrigin())) @ direction) / np.asarray(image.GetSpacing())


def _extent_text(image: sitk.Image) -> str:
    size = np.array(image.GetSize()) - 1
    corners = _index_to_physical(image, np.array(list(np.ndindex(2, 2, 2))) * size)
    return ", ".join(f"[{lo:.1f}, {hi:.1f}]" for lo, hi in zip(corners.min(axis=0), corners.max(axis=0)))


def check_mask_geometry(mask: sitk.Image, image: sitk.Image, field_: str, file, image_file) -> None:
    """A mask with the mask phase's grid size must have its geometry (a lost header otherwise)."""
    if mask.GetSize() != image.GetSize():
        return
    tol = MASK_RULES
    off_origin = float(np.max(np.abs(np.subtract(mask.GetOrigin(), image.GetOrigin()))))
    off_spacing = float(np.max(np.abs(np.subtract(mask.GetSpacing(), image.GetSpacing()))))
    off_direction = float(np.max(np.abs(np.subtract(mask.GetDirection(), image.GetDirection()))))
    if (off_origin > tol.geometry_tolerance_mm or off_spacing > tol.geometry_tolerance_mm / 10
            or off_direction > tol.direction_tolerance):
        raise _fail("mask_geometry", f"the mask {file} has the voxel grid size of {image_file} "
                    f"{mask.GetSize()} but another geometry (origin {tuple(round(v, 2) for v in mask.GetOrigin())} vs "
                    f"{tuple(round(v, 2) for v in image.GetOrigin())} mm, spacing {mask.GetSpacing()} vs "
                    f"{image.GetSpacing()}, direction {mask.GetDirection()} vs {image.GetDirection()}); re-export the "
                    "mask with the image's header", field_, file)


def check_tumour_size(mask: sitk.Image, image: sitk.Image, field_: str, file, image_file) -> None:
    """The tumour's size must be plausible: a few voxels at least, and a modest share of the field of view."""
    voxels = int(np.count_nonzero(sitk.GetArrayViewFromImage(mask)))
    volume = voxels * float(np.prod(mask.GetSpacing()))
    fov = float(np.prod(np.array(image.GetSize()) * np.array(image.GetSpacing())))
    if voxels < MASK_RULES.min_tumour_voxels or volume < MASK_RULES.min_tumour_volume_mm3:
        raise _fail("implausible_mask", f"the tumour of {file} is {voxels} voxel(s) ({volume:.1f} mm3), below "
                    f"{MASK_RULES.min_tumour_voxels} voxels / {MASK_RULES.min_tumour_volume_mm3} mm3: a stray mark, "
                    "not a segmentation", field_, file)
    if volume / fov > MASK_RULES.max_tumour_fraction:
        raise _fail("implausible_mask", f"the tumour of {file} fills {100 * volume / fov:.0f}% of the field of view "
                    f"of {image_file} (at most {100 * MASK_RULES.max_tumour_fraction:.0f}%): a liver or body mask, "
                    "or the wrong labels as tumour (mask_labels)", field_, file)


def check_tumour_inside(mask: sitk.Image, image: sitk.Image, field_: str, file, mask_file) -> Note | None:
    """The tumour must lie in ``image`` (its centre at least); a tumour cut by an edge gives a Note."""
    index = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)[:, ::-1].astype(float)  # (x, y, z)
    points = _index_to_physical(mask, index)
    inner = _physical_to_index(image, points)
    size = np.array(image.GetSize())
    inside = np.all((inner >= -0.5) & (inner <= size - 0.5), axis=1)
    centre = _physical_to_index(image, points.mean(axis=0, keepdims=True))[0]
    if not np.all((centre >= -0.5) & (centre <= size - 0.5)):
        raise _fail("mask_outside_image",
                    f"the tumour of mask {mask_file} (centre {tuple(round(c, 1) for c in points.mean(axis=0))} mm) "
                    f"lies outside the image {file} (x, y, z extent {_extent_text(image)} mm); check that the mask "
                    "belongs to this patient and that both files keep their origin and orientation", field_, file)
    edge = np.any((inner < 0.5) | (inner > size - 1.5), axis=1)
    if inside.all() and not edge.any():
        return None
    outside = int(np.count_nonzero(~inside))
    where = (f"{outside} of its {inside.size} voxels lie outside it" if outside
             else "it touches the last voxel of the volume")
    return Note("tumour_cut", field_, str(file), f"the tumour of {mask_file} reaches the edge of the field of view "
                f"of {file} ({where}); its measurements may be incomplete")


def load_patient(job: PatientJob) -> PatientVolumes:
    """Read and check every volume of one patient; raises ``PatientQCError`` on the first fault."""
    notes: list[Note] = []
    volume = read_volume_info(job.mask_path, job.mask_field, job.roots)
    notes += [Note("ignored_file", job.mask_field, job.mask_path, n) for n in volume.notes]
    mask = binary_tumour(volume.image, job.mask_labels, job.mask_field, job.mask_path)
    grid_cut = note_for_mask_grid(mask, job.mask_path, job.mask_field)
    notes += [grid_cut] if grid_cut is not None else []
    digests = {job.mask_field: (digest(volume.image), job.mask_path)}
    patients: dict[str, set[str]] = {}
    images = {}
    for phase, path, column in zip(PHASES, job.phase_paths, job.phase_fields):
        volume = read_volume_info(path, column, job.roots)
        notes += [Note("ignored_file", column, path, n) for n in volume.notes]
        images[phase] = check_phase(volume.image, column, path)
        digests[column] = (digest(volume.image), path)
        for pid in volume.patient_ids:
            patients.setdefault(pid, set()).add(column)
    if len(patients) > 1:
        shown = "; ".join(f"{pid!r} in {sorted(cols)}" for pid, cols in sorted(patients.items()))
        raise _fail("patient_mismatch", f"the DICOM phases carry different PatientIDs ({shown}): a series of "
                    "another patient", job.phase_fields[0], job.phase_paths[0])
    seen: dict[str, str] = {}
    for column, (value, path) in digests.items():
        if value in seen:
            raise _fail("duplicate_image", f"fields '{seen[value]}' and '{column}' hold the same voxels ({path}); "
                        "each phase is its own acquisition", column, path)
        seen[value] = column
    reference = images[job.mask_phase]
    reference_file = job.phase_paths[PHASES.index(job.mask_phase)]
    cut = [n for n in (check_tumour_inside(mask, images[phase], column, path, job.mask_path)
                       for phase, path, column in zip(PHASES, job.phase_paths, job.phase_fields)) if n is not None]
    if cut:  # one note per patient, naming every volume whose edge the tumour reaches
        notes.append(Note("tumour_cut", cut[0].field, cut[0].file, "; ".join(
            [cut[0].message] + [f"also in field '{n.field}' ({n.file})" for n in cut[1:]])))
    check_mask_geometry(mask, reference, job.mask_field, job.mask_path, reference_file)
    check_tumour_size(mask, reference, job.mask_field, job.mask_path, reference_file)
    return PatientVolumes(mask, images, notes, digests)


def note_for_mask_grid(mask: sitk.Image, mask_file: str, field_: str) -> Note | None:
    """A tumour touching the mask's own grid border (the segmentation was cut when exported)."""
    array = sitk.GetArrayViewFromImage(mask)
    border = (array[0].any() or array[-1].any() or array[:, 0].any() or array[:, -1].any()
              or array[:, :, 0].any() or array[:, :, -1].any())
    if not border:
        return None
    return Note("tumour_cut", field_, mask_file, f"the tumour of {mask_file} touches the edge of the mask's own "
                "grid; the segmentation may be cut")


def file_identity(path: str | Path) -> tuple[int, int] | None:
    """(device, inode) of a file or folder: the same file reached by two paths (a hard link) is one."""
    try:
        stat = Path(path).stat()
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino)
