"""Read and validate a site's manifest CSV.

The manifest is what a hospital exports: one row per patient with the clinical
variables in the site's own units, the outcome, and the paths of the phase
volumes and the tumour mask (relative to the site's data root). Every problem
found is reported together, each naming the file, the patient and the field;
nothing in the data folder is ever written.

Two modes: ``strict`` (the default) raises ``ManifestError`` listing every
problem; otherwise problems with a row exclude that patient only and come back
as ``client.qc.QCIssue`` entries (``Manifest.issues``), so one bad row never
stops a site. Problems with the file as a whole (not found, a missing column)
always raise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from hccfed.client.qc import QCIssue, unit_column
from hccfed.common.site_config import SiteConfig
from hccfed.common.schema import CATEGORIES, CLINICAL_COLUMNS, LABS, OUTCOME_COLUMNS


class ManifestError(ValueError):
    """The manifest cannot be used; ``problems`` lists each one."""

    def __init__(self, manifest: Path, problems: list[str]):
        self.manifest = manifest
        self.problems = problems
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{manifest}: {len(problems)} problem(s):\n  {shown}{more}")


@dataclass(frozen=True)
class Manifest:
    """A validated manifest: clinical values parsed, paths resolved and existing.

    Holds the usable rows only; ``issues`` lists the rows left out (non-strict mode).
    """

    site_id: str
    table: pd.DataFrame  # one row per patient, index = patient_id
    image_paths: dict[str, list[Path]]  # phase -> path per patient, in table order
    mask_paths: list[Path]
    issues: tuple[QCIssue, ...] = ()

    @property
    def patient_ids(self) -> list[str]:
        return [str(p) for p in self.table.index]


class _Problems:
    """Problems found in the manifest, each tied to a patient (or a row) and a reason."""

    def __init__(self, manifest: Path):
        self.manifest = str(manifest)
        self.issues: list[QCIssue] = []

    def add(self, pid, reason: str, field: str, message: str, file: str | Path | None = None) -> None:
        self.issues.append(QCIssue(str(pid), reason, field, str(file or self.manifest), message))

    def messages(self) -> list[str]:
        return [i.message for i in self.issues]


def _parse_numeric(table: pd.DataFrame, column: str, problems: _Problems, integer: bool = False,
                   empty_reason: str = "missing_value") -> pd.Series:
    raw = table[column]
    parsed = pd.to_numeric(raw, errors="coerce")
    for pid, value, number in zip(table["patient_id"], raw, parsed):
        if pd.isna(number):
            empty = pd.isna(value) or str(value).strip() == ""
            shown = "empty" if empty else repr(value)
            problems.add(pid, empty_reason if empty else "invalid_value", column,
                         f"patient {pid}: field '{column}' is {shown}, expected a number")
        elif integer and float(number) != int(number):
            problems.add(pid, "invalid_value", column, f"patient {pid}: field '{column}' is {value!r}, "
                         "expected a whole number")
    return parsed


def _check_category(table: pd.DataFrame, column: str, allowed: tuple[str, ...], problems: _Problems) -> None:
    for pid, value in zip(table["patient_id"], table[column]):
        if str(value) not in allowed:
            problems.add(pid, "invalid_value", column,
                         f"patient {pid}: field '{column}' is {value!r}, expected one of {list(allowed)}")


def _resolve_paths(table: pd.DataFrame, column: str, root: Path, problems: _Problems) -> list[Path]:
    paths = []
    for pid, value in zip(table["patient_id"], table[column]):
        if pd.isna(value) or str(value).strip() == "":
            problems.add(pid, "missing_value", column, f"patient {pid}: field '{column}' is empty, expected a "
                         "file path")
            paths.append(root / "<missing>")
            continue
        path = Path(str(value))
        path = path if path.is_absolute() else root / path
        if not path.exists():
            problems.add(pid, "missing_file", column, f"patient {pid}: field '{column}': file not found: {path}",
                         path)
        paths.append(path)
    return paths


def read_manifest(config: SiteConfig, strict: bool = True, images: bool = True) -> Manifest:
    """Read ``config.manifest`` and check every row.

    ``strict``: raise ManifestError listing all problems. Otherwise the rows
    with problems are left out and listed in ``Manifest.issues``.
    ``images=False``: the clinical and outcome columns only (for clinical models): the image and
    mask columns are neither required nor checked, and the paths come back empty.
    """
    path = config.manifest
    if not path.exists():
        raise ManifestError(path, [f"manifest file not found (site_config {config.source}: data_root/manifest)"])
    table = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    required = (
        ["patient_id"] + list(CLINICAL_COLUMNS) + list(LABS) + list(OUTCOME_COLUMNS)
        + ([config.phase_columns[p] for p in config.phase_columns] + [config.mask_column] if images else [])
    )
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise ManifestError(path, [f"missing column '{c}'" for c in missing])
    problems = _Problems(path)
    ids = table["patient_id"]
    for row, pid in enumerate(ids, start=2):
        if pd.isna(pid) or str(pid).strip() == "":
            problems.add(f"row {row}", "missing_value", "patient_id", f"row {row}: field 'patient_id' is empty")
    for pid in sorted(set(ids[ids.duplicated()].astype(str))):
        problems.add(pid, "duplicate_patient", "patient_id",
                     f"patient {pid}: field 'patient_id' appears more than once")

    parsed = pd.DataFrame({"patient_id": ids.astype(str)})
    for column, kind in CLINICAL_COLUMNS.items():
        if kind.startswith("category:"):
            _check_category(table, column, CATEGORIES[kind.split(":", 1)[1]], problems)
            parsed[column] = table[column].astype(str)
        else:
            parsed[column] = _parse_numeric(table, column, problems, integer=kind == "int")
    for lab in LABS:
        parsed[lab] = _parse_numeric(table, lab, problems)
        if unit_column(lab) in table.columns:
            parsed[unit_column(lab)] = table[unit_column(lab)]
    parsed["time_months"] = _parse_numeric(table, "time_months", problems, empty_reason="missing_outcome")
    parsed["event"] = _parse_numeric(table, "event", problems, integer=True, empty_reason="missing_outcome")
    for pid, t, e in zip(ids, parsed["time_months"], parsed["event"]):
        if not pd.isna(t) and t < 0:
            problems.add(pid, "invalid_value", "time_months", f"patient {pid}: field 'time_months' is {t}, "
                         "expected >= 0")
        if not pd.isna(e) and e not in (0, 1):
            problems.add(pid, "invalid_value", "event", f"patient {pid}: field 'event' is {e}, expected 0 or 1")

    root = config.data_root
    if images:
        image_paths = {p: _resolve_paths(table, col, root, problems) for p, col in config.phase_columns.items()}
        mask_paths = _resolve_paths(table, config.mask_column, root, problems)
    else:
        image_paths, mask_paths = {p: [] for p in config.phase_columns}, []
    if problems.issues and strict:
        raise ManifestError(path, problems.messages())
    bad = {i.patient_id for i in problems.issues}
    keep = np.array([str(pid) not in bad and f"row {row}" not in bad for row, pid in enumerate(ids, start=2)],
                    dtype=bool)
    parsed = parsed[keep]
    parsed["event"] = parsed["event"].astype(np.int64)
    parsed["tumour_number"] = parsed["tumour_number"].astype(np.int64)
    return Manifest(config.site_id, parsed.set_index("patient_id", drop=False),
                    {p: [x for x, k in zip(paths, keep) if k] for p, paths in image_paths.items()},
                    [x for x, k in zip(mask_paths, keep) if k], tuple(problems.issues))
