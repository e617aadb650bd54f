"""A site's quality-control report: every patient is prepared or listed with a reason.

Problems with one patient (a missing or unreadable volume, an empty mask, a
failed registration, an implausible lab, a missing outcome) exclude that
patient and are recorded here; they never stop the site. Problems with the
site's configuration stop it (``hccfed.common.errors.ConfigError``).

The report is written as CSV and JSON in the site's cache folder (never in the
hospital's data folder). Each entry names the patient, the reason code, the
manifest field, the file and what to do.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from hccfed.common.site_config import SiteConfig
from hccfed.common.schema import LABS

#: Reason codes, with what a user should do about each.
REASONS: dict[str, str] = {
    "missing_file": "the manifest names a file or folder that does not exist; fix the path or export the file",
    "missing_value": "a required manifest field is empty; fill it in",
    "invalid_value": "a manifest field cannot be parsed; correct the value",
    "duplicate_patient": "a patient id appears on several manifest rows; keep one row per patient",
    "missing_outcome": "the outcome (time_months / event) is empty; fill it in or drop the patient",
    "unreadable_image": "the volume cannot be read (truncated or corrupt file); re-export it",
    "dicom_series": "the DICOM folder is not one complete series; put one complete series per folder",
    "empty_mask": "the tumour mask has no voxel set; re-export the segmentation",
    "mask_outside_image": "the tumour mask does not overlap the image in physical space; check that the mask "
                          "belongs to this patient and phase",
    "registration_failed": "a phase could not be aligned to the mask's phase; check the series (wrong patient, "
                           "wrong sequence, heavy artefact) or turn preprocessing.register off",
    "lab_out_of_range": "a lab value is outside the physiological range once converted to canonical units; "
                        "check the value and its unit",
    "unknown_unit": "a lab unit is not known; use one of the units listed in the message",
    "preparation_failed": "an unexpected error while preparing the volumes; see the message",
}


@dataclass(frozen=True)
class QCIssue:
    """One problem with one patient. ``severity`` is "excluded" or "warning"."""

    patient_id: str
    reason: str
    field: str
    file: str
    message: str
    severity: str = "excluded"

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"unknown QC reason {self.reason!r}; known: {sorted(REASONS)}")

    def describe(self) -> str:
        """The message (which names the patient, the field and the file) and what to do."""
        return f"{self.message} [{self.reason}: {REASONS[self.reason]}]"


class PatientQCError(Exception):
    """Raised inside the preparation of one patient; the patient is excluded, the site goes on."""

    def __init__(self, reason: str, message: str, field: str = "", file: str | os.PathLike = ""):
        self.reason, self.field, self.file = reason, field, str(file)
        super().__init__(message)

    def issue(self, patient_id: str) -> QCIssue:
        where = f" field '{self.field}':" if self.field else ""
        return QCIssue(patient_id, self.reason, self.field, self.file, f"patient {patient_id}:{where} {self}")


@dataclass
class QCReport:
    """What happened to every patient of a site."""

    site_id: str
    prepared: list[str] = field(default_factory=list)
    issues: list[QCIssue] = field(default_factory=list)

    @property
    def excluded(self) -> list[str]:
        """Excluded patient ids, in the order of their first issue."""
        return list(dict.fromkeys(i.patient_id for i in self.issues if i.severity == "excluded"))

    def reasons(self, patient_id: str) -> list[str]:
        return [i.reason for i in self.issues if i.patient_id == patient_id and i.severity == "excluded"]

    def summary(self) -> str:
        """A few lines for the console: counts, then one line per reason."""
        counts = Counter(i.reason for i in self.issues if i.severity == "excluded")
        lines = [f"{self.site_id}: {len(self.prepared)} patient(s) prepared, {len(self.excluded)} excluded"]
        lines += [f"  {reason}: {n} issue(s)" for reason, n in counts.most_common()]
        warnings = sum(i.severity == "warning" for i in self.issues)
        if warnings:
            lines.append(f"  warnings (patients kept): {warnings}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"site_id": self.site_id, "n_prepared": len(self.prepared), "n_excluded": len(self.excluded),
                "prepared": list(self.prepared), "issues": [asdict(i) for i in self.issues]}

    @classmethod
    def from_dict(cls, raw: dict) -> "QCReport":
        return cls(raw["site_id"], list(raw["prepared"]), [QCIssue(**i) for i in raw["issues"]])

    def write(self, folder: Path) -> tuple[Path, Path]:
        """Write ``qc_report.csv`` and ``qc_report.json`` into ``folder`` (the cache); return their paths."""
        folder.mkdir(parents=True, exist_ok=True)
        json_path, csv_path = folder / "qc_report.json", folder / "qc_report.csv"
        tmp = json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        os.replace(tmp, json_path)
        tmp = csv_path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["patient_id", "status", "reason", "field", "file", "message", "what_to_do"])
            for pid in self.prepared:
                writer.writerow([pid, "prepared", "", "", "", "", ""])
            for i in self.issues:
                writer.writerow([i.patient_id, i.severity, i.reason, i.field, i.file, i.message, REASONS[i.reason]])
        os.replace(tmp, csv_path)
        return csv_path, json_path


def read_qc_report(folder: Path) -> QCReport:
    """The report last written into ``folder`` by ``QCReport.write``."""
    return QCReport.from_dict(json.loads((Path(folder) / "qc_report.json").read_text()))


def unit_column(lab: str) -> str:
    """Optional manifest column giving the unit of one lab patient by patient."""
    return f"{lab}_unit"


def check_labs(table: pd.DataFrame, config: SiteConfig) -> tuple[pd.DataFrame, list[QCIssue]]:
    """Per-patient lab checks; returns (table with labs in the site's units, issues).

    A manifest may carry an optional ``<lab>_unit`` column (a unit per patient,
    empty = the site's unit from the YAML). Values in another known unit are
    converted to the site's unit, so the site's reference range applies. An
    unknown unit or a value outside the physiological range (canonical units)
    is an issue naming the patient, the field and the manifest.
    """
    table = table.copy()
    issues: list[QCIssue] = []
    manifest = str(config.manifest)
    for lab, spec in LABS.items():
        site_unit = config.labs[lab].unit
        column = unit_column(lab)
        units = (table[column].fillna("").astype(str).str.strip().replace("", site_unit)
                 if column in table.columns else pd.Series(site_unit, index=table.index))
        converted = []
        for pid, raw, unit in zip(table["patient_id"], table[lab], units):
            if unit not in spec.conversions:
                issues.append(QCIssue(str(pid), "unknown_unit", column, manifest,
                                      f"patient {pid}: field '{column}' is {unit!r}, an unknown unit for lab "
                                      f"'{lab}' in {manifest}; known units: {sorted(spec.conversions)}"))
                converted.append(np.nan)
                continue
            value = float(raw) * spec.conversions[unit]  # canonical
            low, high = spec.physiological
            if not low <= value <= high:
                issues.append(QCIssue(
                    str(pid), "lab_out_of_range", lab, manifest,
                    f"patient {pid}: field '{lab}' is {raw} {unit} = {value:.4g} {spec.canonical_unit}, "
                    f"outside the physiological range [{low}, {high}] {spec.canonical_unit} ({manifest}); "
                    f"check the value, and the unit in {config.source if unit == site_unit else column}"))
            converted.append(value / spec.conversions[site_unit])
        table[lab] = converted
    return table, issues
