"""Read and validate a site's manifest CSV.

The manifest is what a hospital exports: one row per patient with the clinical
variables in the site's own units, the outcome, and the paths of the phase
volumes and the tumour mask (relative to the site's data root). Every problem
found is reported together, each naming the file, the patient and the field;
nothing in the data folder is ever written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common.config import SiteConfig
from common.schema import CATEGORIES, CLINICAL_COLUMNS, LABS, OUTCOME_COLUMNS


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
    """A validated manifest: clinical values parsed, paths resolved and existing."""

    site_id: str
    table: pd.DataFrame  # one row per patient, index = patient_id
    image_paths: dict[str, list[Path]]  # phase -> path per patient, in table order
    mask_paths: list[Path]

    @property
    def patient_ids(self) -> list[str]:
        return [str(p) for p in self.table.index]


def _parse_numeric(table: pd.DataFrame, column: str, problems: list[str], integer: bool = False) -> pd.Series:
    raw = table[column]
    parsed = pd.to_numeric(raw, errors="coerce")
    for pid, value, number in zip(table["patient_id"], raw, parsed):
        if pd.isna(number):
            shown = "empty" if pd.isna(value) or str(value).strip() == "" else repr(value)
            problems.append(f"patient {pid}: field '{column}' is {shown}, expected a number")
        elif integer and float(number) != int(number):
            problems.append(f"patient {pid}: field '{column}' is {value!r}, expected a whole number")
    return parsed


def _check_category(table: pd.DataFrame, column: str, allowed: tuple[str, ...], problems: list[str]) -> None:
    for pid, value in zip(table["patient_id"], table[column]):
        if str(value) not in allowed:
            problems.append(f"patient {pid}: field '{column}' is {value!r}, expected one of {list(allowed)}")


def _resolve_paths(table: pd.DataFrame, column: str, root: Path, problems: list[str]) -> list[Path]:
    paths = []
    for pid, value in zip(table["patient_id"], table[column]):
        if pd.isna(value) or str(value).strip() == "":
            problems.append(f"patient {pid}: field '{column}' is empty, expected a file path")
            paths.append(root / "<missing>")
            continue
        path = Path(str(value))
        path = path if path.is_absolute() else root / path
        if not path.exists():
            problems.append(f"patient {pid}: field '{column}': file not found: {path}")
        paths.append(path)
    return paths


def read_manifest(config: SiteConfig) -> Manifest:
    """Read ``config.manifest`` and check every row; raise ManifestError listing all problems."""
    path = config.manifest
    if not path.exists():
        raise ManifestError(path, [f"manifest file not found (site_config {config.source}: data_root/manifest)"])
    table = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    required = (
        ["patient_id"] + list(CLINICAL_COLUMNS) + list(LABS) + list(OUTCOME_COLUMNS)
        + [config.phase_columns[p] for p in config.phase_columns] + [config.mask_column]
    )
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise ManifestError(path, [f"missing column '{c}'" for c in missing])
    problems: list[str] = []
    ids = table["patient_id"]
    for row, pid in enumerate(ids, start=2):
        if pd.isna(pid) or str(pid).strip() == "":
            problems.append(f"row {row}: field 'patient_id' is empty")
    for pid in sorted(set(ids[ids.duplicated()].astype(str))):
        problems.append(f"patient {pid}: field 'patient_id' appears more than once")

    parsed = pd.DataFrame({"patient_id": ids.astype(str)})
    for column, kind in CLINICAL_COLUMNS.items():
        if kind.startswith("category:"):
            _check_category(table, column, CATEGORIES[kind.split(":", 1)[1]], problems)
            parsed[column] = table[column].astype(str)
        else:
            parsed[column] = _parse_numeric(table, column, problems, integer=kind == "int")
    for lab in LABS:
        parsed[lab] = _parse_numeric(table, lab, problems)
    parsed["time_months"] = _parse_numeric(table, "time_months", problems)
    parsed["event"] = _parse_numeric(table, "event", problems, integer=True)
    for pid, t, e in zip(ids, parsed["time_months"], parsed["event"]):
        if not pd.isna(t) and t < 0:
            problems.append(f"patient {pid}: field 'time_months' is {t}, expected >= 0")
        if not pd.isna(e) and e not in (0, 1):
            problems.append(f"patient {pid}: field 'event' is {e}, expected 0 or 1")

    root = config.data_root
    image_paths = {p: _resolve_paths(table, col, root, problems) for p, col in config.phase_columns.items()}
    mask_paths = _resolve_paths(table, config.mask_column, root, problems)
    if problems:
        raise ManifestError(path, problems)
    parsed["event"] = parsed["event"].astype(np.int64)
    parsed["tumour_number"] = parsed["tumour_number"].astype(np.int64)
    return Manifest(config.site_id, parsed.set_index("patient_id", drop=False), image_paths, mask_paths)
