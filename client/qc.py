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

from hccfed.common.atomic_io import atomic_write, atomic_write_text
from hccfed.common.site_config import SiteConfig
from hccfed.common.schema import LABS

#: Reason codes, with what a user should do about each (README: "Pointing it at a hospital's own data").
REASONS: dict[str, str] = {
    # the manifest row
    "invalid_row": "the manifest row does not have one value per column (a stray delimiter or a cut line); "
                   "fix the row",
    "missing_value": "a required manifest field is empty; fill it in",
    "invalid_value": "a manifest field cannot be parsed (not a number, not an allowed value); correct the value",
    "implausible_value": "a manifest value lies outside its plausible range (a typing or unit error); correct it",
    "duplicate_patient": "a patient id appears on several manifest rows (compared without surrounding spaces and "
                         "case); keep one row per patient",
    "missing_outcome": "the outcome (time_months / event) is empty; fill it in or drop the patient",
    "lab_out_of_range": "a lab value is outside the physiological range once converted to canonical units; "
                        "check the value and its unit",
    "unknown_unit": "a lab unit is not known; use one of the units listed in the message",
    "normalised_value": "a value was read in its canonical form (surrounding spaces, letter case); nothing to do, "
                        "or export it in that form (warning only)",
    # the files
    "missing_file": "the manifest names a file or folder that does not exist; fix the path or export the file",
    "path_outside_root": "the path leaves the data folder (through '..', an absolute path or a symbolic link); "
                         "copy the file into data_root or list its folder under allowed_roots in the site YAML",
    "duplicate_image": "the same file or the same image content is used by several patients (or several fields of "
                       "one patient); give each patient and phase its own acquisition",
    "in_labelled_cohort": "an archive scan (for pretraining) is a labelled patient's: the same id, one of their "
                          "files or the same voxels; leave the labelled patients out of the archive's export",
    "unreadable_image": "the volume cannot be read (truncated or corrupt file); re-export it",
    "image_geometry": "the volume is not a usable 3-D image with a geometry (dimensions, voxel spacing, "
                      "orientation); re-export it with its header",
    "non_finite_voxels": "the volume holds NaN or infinite voxels; re-export it",
    "blank_image": "the volume is constant or holds almost no distinct values (a blank or a mask given as a "
                   "phase); check the file named for this phase",
    "implausible_intensity": "the volume holds voxel values of implausible magnitude (a corrupt value or a wrong "
                             "rescale slope); re-export it",
    "dicom_series": "the DICOM folder is not one complete series; put one complete series per folder",
    "dicom_geometry": "the DICOM slices do not form one regular volume (orientation, pixel spacing, size, "
                      "position or slice spacing differ); re-export the series",
    "dicom_unsupported": "a DICOM form not supported here (multi-frame or colour); export classic single-frame "
                         "grey-level slices",
    "patient_mismatch": "the DICOM files of one patient carry several PatientIDs; check that every phase "
                        "belongs to this patient",
    "ignored_file": "a file in a series folder that is not an image slice (DICOMDIR, structured report, "
                    "presentation state, text) was skipped (note only)",
    # the mask
    "mask_labels": "the mask's values are not the labels declared in the site YAML (mask_labels): a probability "
                   "map, a label map with other labels, or an image given as the mask; export a label map and "
                   "declare its labels",
    "empty_mask": "the tumour mask has no voxel with a tumour label; re-export the segmentation",
    "implausible_mask": "the tumour is implausibly large or small for its field of view (a liver mask, or a stray "
                        "voxel); check the segmentation and mask_labels",
    "mask_geometry": "the mask is on the image's voxel grid but with another origin, spacing or orientation; "
                     "re-export the mask with the image's header",
    "mask_outside_image": "the tumour mask does not overlap the image in physical space; check that the mask "
                          "belongs to this patient and phase",
    "tumour_cut": "part of the tumour lies at or beyond the edge of a volume's field of view (warning: the "
                  "patient is kept)",
    # preparation
    "registration_failed": "a phase could not be aligned to the mask's phase; check the series (wrong patient, "
                           "wrong sequence, heavy artefact) or turn preprocessing.register off",
    "preparation_failed": "an unexpected error while preparing the volumes; see the message",
}

#: Reasons that never exclude a patient.
WARNING_REASONS = frozenset({"normalised_value", "ignored_file", "tumour_cut"})


@dataclass(frozen=True)
class QCIssue:
    """One problem with one patient. ``severity`` is "excluded" or "warning"."""

    patient_id: str
    reason: str
    field: str
    file: str
    message: str
    severity: str = "excluded"
    row: int | None = None  # the manifest line (1 = the header) when the issue is about a manifest cell

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"unknown QC reason {self.reason!r}; known: {sorted(REASONS)}")
        if self.severity not in ("excluded", "warning"):
            raise ValueError(f"unknown QC severity {self.severity!r}")

    def describe(self) -> str:
        """The message (which names the patient, the field and the file) and what to do."""
        return f"{self.message} [{self.reason}: {REASONS[self.reason]}]"


class PatientQCError(Exception):
    """Raised inside the preparation of one patient; the patient is excluded, the site goes on."""

    def __init__(self, reason: str, message: str, field: str = "", file: str | os.PathLike = ""):
        self.reason, self.field, self.file = reason, field, str(file)
        super().__init__(message)

    def issue(self, patient_id: str) -> QCIssue:
        return patient_issue(patient_id, self.reason, self.field, self.file, str(self))


def patient_issue(patient_id: str, reason: str, field: str, file: str | os.PathLike, message: str,
                  severity: str | None = None) -> QCIssue:
    """A QC entry whose message names the patient, the field and the file."""
    where = f" field '{field}':" if field else ""
    text = f"patient {patient_id}:{where} {message}"
    if str(file) and str(file) not in text:
        text += f" (file {file})"
    severity = severity or ("warning" if reason in WARNING_REASONS else "excluded")
    return QCIssue(str(patient_id), reason, field, str(file), text, severity)


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

    def summary(self, verb: str = "prepared") -> str:
        """A few lines for the console: counts, then one line per reason."""
        counts = Counter(i.reason for i in self.issues if i.severity == "excluded")
        lines = [f"{self.site_id}: {len(self.prepared)} patient(s) {verb}, {len(self.excluded)} excluded"]
        lines += [f"  {reason}: {n} issue(s)" for reason, n in counts.most_common()]
        warnings = sum(i.severity == "warning" for i in self.issues)
        if warnings:
            lines.append(f"  warnings (patients kept): {warnings}")
        return "\n".join(lines)

    def reason_table(self) -> str:
        """One line per reason: patients concerned, issues, excluded or warning, what to do."""
        rows = {}
        for issue in self.issues:
            entry = rows.setdefault(issue.reason, [set(), 0, issue.severity])
            entry[0].add(issue.patient_id)
            entry[1] += 1
        if not rows:
            return "no issue found"
        width = max(len("reason"), *map(len, rows))
        lines = [f"{'reason':<{width}}  patients  issues  {'effect':<8}  what to do"]
        order = sorted(rows, key=lambda r: (rows[r][2] != "excluded", -len(rows[r][0]), r))
        for reason in order:
            patients, n, severity = rows[reason]
            lines.append(f"{reason:<{width}}  {len(patients):>8}  {n:>6}  {severity:<8}  {REASONS[reason]}")
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
        atomic_write_text(json_path, json.dumps(self.to_dict(), indent=2))

        def write_csv(tmp: Path) -> None:
            with tmp.open("w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["patient_id", "status", "reason", "field", "row", "file", "message", "what_to_do"])
                for pid in self.prepared:
                    writer.writerow([pid, "prepared", "", "", "", "", "", ""])
                for i in self.issues:
                    writer.writerow([i.patient_id, i.severity, i.reason, i.field, "" if i.row is None else i.row,
                                     i.file, i.message, REASONS[i.reason]])
        atomic_write(csv_path, write_csv)
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
    unknown unit, a value that is not a finite number or a value outside the
    physiological range (canonical units) is an issue naming the patient, the
    field and the manifest (``client.manifest`` already refuses such rows; this
    check stands for tables built otherwise).
    """
    from hccfed.client.validation import CellProblem, check_lab

    table = table.copy()
    issues: list[QCIssue] = []
    manifest = str(config.manifest)
    for lab in LABS:
        site_unit = config.labs[lab].unit
        column = unit_column(lab)
        units = (table[column].fillna("").astype(str).str.strip().replace("", site_unit)
                 if column in table.columns else pd.Series(site_unit, index=table.index))
        converted = []
        for pid, raw, unit in zip(table["patient_id"], table[lab], units):
            value = pd.to_numeric(raw, errors="coerce")
            if pd.isna(value) or not np.isfinite(value):
                canonical, problem = None, CellProblem("invalid_value", f"is {raw!r}, expected a finite number")
            else:
                canonical, problem = check_lab(lab, float(value), unit)
            if problem is not None:
                where = column if problem.reason == "unknown_unit" else lab
                issues.append(QCIssue(str(pid), problem.reason, where, manifest,
                                      f"patient {pid}: field '{where}' {problem.message} ({manifest}; unit from "
                                      f"{config.source if unit == site_unit else column})"))
                converted.append(np.nan)
                continue
            converted.append(canonical / LABS[lab].conversions[site_unit])
        table[lab] = converted
    return table, issues
