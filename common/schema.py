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
