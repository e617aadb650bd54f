"""The data schema every site and the server agree on.

Phases, labs with their canonical units and the unit conversions a site may
need, the manifest columns and the outcome conventions. Pure data: no I/O.

Conventions (see ARCHITECTURE.md):
- a higher score means a higher risk of recurrence;
- early recurrence = an event within ``EARLY_RECURRENCE_MONTHS``; a patient
  censored before that without an event has no binary label (``-1``) but still
  counts for the C-index.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: MRI contrast phases, in acquisition order. Image channels follow this order.
PHASES: tuple[str, ...] = ("pre", "arterial", "portal", "delayed")

EARLY_RECURRENCE_MONTHS = 24.0

#: Label value of a patient whose early-recurrence status is unknown.
UNKNOWN_LABEL = -1


@dataclass(frozen=True)
class LabSpec:
    """One laboratory value: its canonical unit and the units a site may use.

    ``conversions`` maps a unit name to the factor that multiplies a value in
    that unit to give the canonical unit. ``physiological`` is the range
    (canonical unit) outside which a value is rejected as a typing error.
    """

    name: str
    canonical_unit: str
    conversions: dict[str, float]
    physiological: tuple[float, float]
    log_scale: bool = False


LABS: dict[str, LabSpec] = {
    spec.name: spec
    for spec in (
        LabSpec("afp", "ng/mL", {"ng/mL": 1.0, "ug/L": 1.0, "IU/mL": 1.21}, (0.0, 1e6), True),
        LabSpec("ast", "U/L", {"U/L": 1.0, "ukat/L": 60.0}, (1.0, 5000.0), True),
        LabSpec("alt", "U/L", {"U/L": 1.0, "ukat/L": 60.0}, (1.0, 5000.0), True),
        LabSpec("ggt", "U/L", {"U/L": 1.0, "ukat/L": 60.0}, (1.0, 5000.0), True),
        LabSpec("alp", "U/L", {"U/L": 1.0, "ukat/L": 60.0}, (5.0, 5000.0), True),
        LabSpec("platelets", "10^9/L", {"10^9/L": 1.0, "10^3/uL": 1.0}, (1.0, 2000.0)),
        LabSpec("albumin", "g/L", {"g/L": 1.0, "g/dL": 10.0}, (5.0, 80.0)),
        LabSpec("bilirubin", "umol/L", {"umol/L": 1.0, "mg/dL": 17.1}, (0.5, 1000.0), True),
    )
}

CHILD_PUGH_CLASSES: tuple[str, ...] = ("A", "B", "C")
HEPATITIS_TYPES: tuple[str, ...] = ("HBV", "HCV", "none", "other")
SEXES: tuple[str, ...] = ("M", "F")

#: Clinical manifest columns other than the labs, with their kind.
CLINICAL_COLUMNS: dict[str, str] = {
    "age": "float",
    "sex": "category:sex",
    "tumour_number": "int",
    "tumour_diameter_mm": "float",
    "child_pugh": "category:child_pugh",
    "hepatitis": "category:hepatitis",
}

OUTCOME_COLUMNS: tuple[str, ...] = ("time_months", "event")

CATEGORIES: dict[str, tuple[str, ...]] = {
    "sex": SEXES,
    "child_pugh": CHILD_PUGH_CLASSES,
    "hepatitis": HEPATITIS_TYPES,
}

#: Lower / Normal / Higher coding of a lab against a site's reference range.
LAB_CATEGORY_CODES: dict[str, int] = {"Lower": -1, "Normal": 0, "Higher": 1}


def clinical_feature_names() -> list[str]:
    """Names of the harmonized clinical vector's entries, in order (see client.labs)."""
    names = [f"{lab}_{form}" for lab in LABS for form in ("cat", "rel")]
    names += ["age_decades", "male", "extra_tumours", "log2_diameter_30mm", "child_pugh"]
    names += [f"hepatitis_{h}" for h in HEPATITIS_TYPES if h != "none"]
    return names


#: Channels of a prepared image: the phases, then the tumour mask.
IMAGE_CHANNELS: tuple[str, ...] = PHASES + ("tumour_mask",)


def image_column(phase: str) -> str:
    """Manifest column holding the path of one phase's volume."""
    return f"image_{phase}"


MASK_COLUMN = "mask"


def manifest_columns(phases: tuple[str, ...] = PHASES) -> list[str]:
    """All columns a site manifest must have, in a readable order."""
    return (
        ["patient_id"]
        + list(CLINICAL_COLUMNS)
        + list(LABS)
        + list(OUTCOME_COLUMNS)
        + [image_column(p) for p in phases]
        + [MASK_COLUMN]
    )


# ----------------------------------------------------------------------------- validation rules
# One declared rule per manifest field and per image property; ``client.validation`` applies them
# (and nothing else decides what a valid value is).

#: Cell contents read as "no value" (after stripping whitespace, compared case-insensitively).
MISSING_TOKENS: tuple[str, ...] = ("", "na", "n/a", "nan", "null", "none", "-", "?", ".", "missing", "unknown")


@dataclass(frozen=True)
class FieldRule:
    """What a valid value of one manifest column is.

    ``kind``: "id" (a patient identifier), "number" (a finite float), "integer"
    (a whole number), "category" (one of ``allowed``, matched case-insensitively
    and stored in its canonical spelling), "path" (a file or folder under the
    data root). ``low`` / ``high``: the plausible range, in ``unit``; a value
    outside it is implausible (a typing or unit error), never clipped.
    ``low_open``: the value must be strictly above ``low``. ``missing_reason``:
    the QC reason of an empty cell.
    """

    column: str
    kind: str
    unit: str = ""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    allowed: tuple[str, ...] = ()
    missing_reason: str = "missing_value"

    def range_text(self) -> str:
        left = "(" if self.low_open else "["
        return f"{left}{self.low:g}, {self.high:g}] {self.unit}".strip()


#: Longest patient id accepted (ids become file names in the cache).
MAX_ID_LENGTH = 64

#: The declared rule of every clinical and outcome column (labs: ``lab_rule``; paths: ``path_rule``).
FIELD_RULES: dict[str, FieldRule] = {
    rule.column: rule
    for rule in (
        FieldRule("patient_id", "id"),
        FieldRule("age", "number", "years", 1.0, 110.0),
        FieldRule("sex", "category", allowed=SEXES),
        FieldRule("tumour_number", "integer", "tumours", 1, 50),
        FieldRule("tumour_diameter_mm", "number", "mm", 1.0, 300.0),
        FieldRule("child_pugh", "category", allowed=CHILD_PUGH_CLASSES),
        FieldRule("hepatitis", "category", allowed=HEPATITIS_TYPES),
        FieldRule("time_months", "number", "months", 0.0, 600.0, low_open=True, missing_reason="missing_outcome"),
        FieldRule("event", "integer", "", 0, 1, missing_reason="missing_outcome"),
    )
}


def lab_rule(lab: str) -> FieldRule:
    """A lab column: a finite number; its range is checked in canonical units (``LabSpec.physiological``)."""
    spec = LABS[lab]
    return FieldRule(lab, "number", spec.canonical_unit, *spec.physiological)


def path_rule(column: str) -> FieldRule:
    """A phase or mask column: a path relative to the data root (or absolute, inside an allowed root)."""
    return FieldRule(column, "path")


@dataclass(frozen=True)
class ImageRules:
    """What every phase volume must be. Spacings in mm."""

    min_voxels_per_axis: int = 3
    spacing_mm: tuple[float, float] = (0.05, 50.0)
    #: fewer distinct voxel values than this: a blank, binary or label image, not an MR phase
    min_distinct_values: int = 8
    #: a voxel beyond this magnitude is a corrupt value or a wrong scaling (MR and CT values are far below)
    max_abs_intensity: float = 1e7
    #: direction matrices whose columns deviate from orthonormal by more than this are corrupt
    direction_tolerance: float = 1e-3


@dataclass(frozen=True)
class MaskRules:
    """What a tumour mask must be, once its label semantics (site YAML ``mask_labels``) are applied."""

    #: the tumour's largest share of the mask phase's field of view (a liver or the image given as mask is larger)
    max_tumour_fraction: float = 0.25
    min_tumour_voxels: int = 8
    min_tumour_volume_mm3: float = 20.0
    #: a mask on the same voxel grid size as the image must share its geometry within these (mm; cosines)
    geometry_tolerance_mm: float = 0.5
    direction_tolerance: float = 1e-3


@dataclass(frozen=True)
class DicomRules:
    """What a DICOM series folder must be. Distances in mm."""

    #: a step between slices above this multiple of the usual step is a missing slice
    gap_factor: float = 1.5
    #: steps may differ from the usual step by this fraction (or ``spacing_tolerance_mm``) at most
    spacing_tolerance: float = 0.05
    spacing_tolerance_mm: float = 0.01
    #: two slices closer than this share a position
    same_position_mm: float = 1e-3
    orientation_tolerance: float = 1e-3
    pixel_spacing_tolerance_mm: float = 1e-3
    #: a slice displaced within its own plane by more than this fraction of a pixel is misplaced
    in_plane_shift_pixels: float = 0.5


IMAGE_RULES = ImageRules()
MASK_RULES = MaskRules()
DICOM_RULES = DicomRules()

#: SOP classes of DICOM objects that are not image slices (skipped with a note when found in a series folder):
#: prefixes of the UIDs: directories, structured reports, presentation states, key objects, RT objects,
#: encapsulated documents, raw data and segmentations.
NON_IMAGE_SOP_PREFIXES: tuple[str, ...] = (
    "1.2.840.10008.1.3.10",  # Media Storage Directory (DICOMDIR)
    "1.2.840.10008.5.1.4.1.1.88.",  # structured reports, key object selection
    "1.2.840.10008.5.1.4.1.1.11.",  # presentation states
    "1.2.840.10008.5.1.4.1.1.481.",  # RT objects
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated PDF / CDA
    "1.2.840.10008.5.1.4.1.1.66",  # raw data, spatial registration, segmentation, surfaces
    "1.2.840.10008.5.1.4.1.1.9.",  # waveforms
)


def early_recurrence_label(time_months: np.ndarray, event: np.ndarray) -> np.ndarray:
    """Binary early-recurrence label: 1, 0, or ``UNKNOWN_LABEL``.

    1 when the event happened within 24 months, 0 when the patient was followed
    beyond 24 months without an event before it, unknown when censored earlier.
    """
    time_months = np.asarray(time_months, dtype=float)
    event = np.asarray(event).astype(bool)
    label = np.full(time_months.shape, UNKNOWN_LABEL, dtype=np.int64)
    label[event & (time_months <= EARLY_RECURRENCE_MONTHS)] = 1
    label[time_months > EARLY_RECURRENCE_MONTHS] = 0
    return label


def to_canonical(lab: str, value: float | np.ndarray, unit: str) -> float | np.ndarray:
    """Convert a lab value from a site's unit to the canonical unit.

    Raises KeyError naming the lab and the unit when the unit is unknown.
    """
    spec = LABS[lab]
    try:
        factor = spec.conversions[unit]
    except KeyError:
        known = ", ".join(spec.conversions)
        raise KeyError(f"unknown unit {unit!r} for lab {lab!r} (known: {known})") from None
    return value * factor
