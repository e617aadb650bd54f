"""Read and validate a site's manifest CSV.

The manifest is what a hospital exports: one row per patient with the clinical
variables in the site's own units, the outcome, and the paths of the phase
volumes and the tumour mask (relative to the site's data root). Each cell is
checked against its declared rule (``common.schema.FIELD_RULES``, applied by
``client.validation``); nothing in the data folder is ever written.

Two kinds of fault:
- the file as a whole (not found, not text in the declared encoding, not CSV,
  a missing, duplicated or misspelled column, no patient row) raises
  ``ManifestError``, one message naming the file and the line or column;
- a fault in a row excludes that patient only: a ``client.qc.QCIssue`` naming
  the patient, the row (line of the file, the header is line 1), the column and
  the file. ``strict`` (the default) raises ``ManifestError`` listing every such
  problem; otherwise they come back in ``Manifest.issues``, so one bad row
  never stops a site.

Patient ids are compared without surrounding spaces and letter case: rows
whose ids match (or that repeat an id) are all excluded as duplicates.
"""

from __future__ import annotations

import csv
import difflib
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from hccfed.client.qc import QCIssue, unit_column
from hccfed.client.validation import (Cell, CellProblem, check_cell, check_lab, is_missing, normalised_id,
                                      resolve_input)
from hccfed.common.schema import CLINICAL_COLUMNS, FIELD_RULES, LABS, OUTCOME_COLUMNS, FieldRule, path_rule
from hccfed.common.site_config import SiteConfig


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
    """A validated manifest: clinical values parsed, paths resolved (symlinks followed) and existing.

    Holds the usable rows only; ``issues`` lists the rows left out (non-strict
    mode) and warnings; ``rows`` maps each kept patient id to its line in the
    file; ``ignored_columns`` are columns the schema does not use.
    """

    site_id: str
    table: pd.DataFrame  # one row per patient, index = patient_id
    image_paths: dict[str, list[Path]]  # phase -> path per patient, in table order
    mask_paths: list[Path]
    issues: tuple[QCIssue, ...] = ()
    rows: dict[str, int] = field(default_factory=dict)
    ignored_columns: tuple[str, ...] = ()
    path: Path | None = None  # the manifest file

    @property
    def patient_ids(self) -> list[str]:
        return [str(p) for p in self.table.index]


def _decode(path: Path, data: bytes, encoding: str) -> str:
    if not data.strip():
        raise ManifestError(path, ["the file is empty; export the manifest with its header row"])
    if data.startswith(b"PK\x03\x04") or data.startswith(b"\xd0\xcf\x11\xe0"):
        raise ManifestError(path, ["this is an Excel workbook (or another archive), not a CSV file; save it as "
                                   "'CSV UTF-8' and point the site YAML's 'manifest' at the .csv"])
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) and not encoding.lower().startswith("utf-16"):
        raise ManifestError(path, ["the file is UTF-16 text; save it as UTF-8, or set manifest_encoding: utf-16 "
                                   "in the site YAML"])
    try:
        text = data.decode("utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding)
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        start = data.rfind(b"\n", 0, err.start) + 1
        column = data[start:err.start].count(b",") + 1
        raise ManifestError(path, [
            f"line {line}, field {column}: byte {data[err.start]:#04x} is not valid {encoding} text; save the "
            "manifest as UTF-8, or set manifest_encoding (e.g. latin-1 or cp1252) in the site YAML"]) from None
    if "\x00" in text:
        line = text[:text.index("\x00")].count("\n") + 1
        raise ManifestError(path, [f"line {line}: a NUL character: the file is binary or in another encoding "
                                   "(e.g. UTF-16); save it as UTF-8 CSV"])
    return text


def _read_records(config: SiteConfig) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(header, [(line, cells)]) of the manifest; every problem of the file as a whole raises."""
    path = config.manifest
    if not path.exists():
        raise ManifestError(path, [f"manifest file not found (site_config {config.source}: data_root/manifest)"])
    if not path.is_file():
        raise ManifestError(path, [f"the manifest is not a file (site_config {config.source}: key 'manifest')"])
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ManifestError(path, [f"cannot read the manifest ({err.strerror or err})"]) from None
    reader = csv.reader(io.StringIO(_decode(path, data, config.manifest_encoding), newline=""), strict=True)
    records, start = [], 1
    try:
        header = next(reader, [])
        start = reader.line_num + 1
        for cells in reader:
            if any(c.strip() for c in cells):  # blank lines (or a row of empty cells) are no patient
                records.append((start, cells))
            start = reader.line_num + 1
    except csv.Error as err:  # strict: a quote never closed would otherwise swallow the rows after it
        raise ManifestError(path, [f"line {start}: not valid CSV ({err}); check the quotes from that line on"]) \
            from None
    return [h.strip() for h in header], records


def _image_columns(config: SiteConfig) -> list[str]:
    return [config.phase_columns[p] for p in config.phase_columns] + [config.mask_column]


def _required_columns(config: SiteConfig, images: bool = True, scans_only: bool = False) -> list[str]:
    if scans_only:
        return ["patient_id"] + _image_columns(config)
    return (["patient_id"] + list(CLINICAL_COLUMNS) + list(LABS) + list(OUTCOME_COLUMNS)
            + (_image_columns(config) if images else []))


def _check_header(path: Path, header: list[str], config: SiteConfig,
                  records: list[tuple[int, list[str]]], images: bool = True, scans_only: bool = False) -> list[str]:
    """The ignored columns; raises for a header that would make a value be read wrongly. With
    ``scans_only`` every column but the id, phases and mask is ignored (no lab is read, so no unit)."""
    if len(header) == 1 and any(sep in header[0] for sep in (";", "\t", "|")):
        raise ManifestError(path, [f"line 1: the header is one column ({header[0][:60]!r}...): the file is not "
                                   "comma-separated; export it with ',' as the delimiter"])
    problems = []
    for index, name in enumerate(header):
        if not name and any(index < len(c) and c[index].strip() for _, c in records):
            problems.append(f"line 1: column {index + 1} has values but no name")
    named = [h for h in header if h]
    for name in sorted({h for h in named if named.count(h) > 1}):
        problems.append(f"line 1: column '{name}' appears {named.count(name)} times; keep one")
    required = _required_columns(config, images, scans_only)
    known = set(_required_columns(config)) | {unit_column(lab) for lab in LABS}
    if scans_only:
        known = set(required)
    for name in required:
        if name not in named:
            close = difflib.get_close_matches(name, [h for h in named if h not in known], n=1, cutoff=0.75)
            close += [h for h in named if h.casefold() == name.casefold() and h not in close]
            problems.append(f"missing column '{name}'" + (f" (is '{close[0]}' meant?)" if close else ""))
    ignored = [h for h in named if h not in known]
    for name in ignored if not scans_only else ():  # an ignored unit column leaves a lab in the site's unit: refuse
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.85)
        if re.search(r"(^|[_\s.-])units?($|[_\s.-])", name.casefold()) or close:
            target = close[0] if close else f"<lab>_unit, one of {[unit_column(lab) for lab in LABS]}"
            problems.append(f"column '{name}' is not a known column (is '{target}' meant?); rename it, or it "
                            "would be ignored")
    if problems:
        raise ManifestError(path, problems)
    if not records:
        raise ManifestError(path, ["the manifest has a header but no patient row"])
    return ignored


class _Rows:
    """Issues found in the manifest, each tied to one row (its line), a patient and a column."""

    def __init__(self, manifest: Path):
        self.manifest = str(manifest)
        self.issues: list[QCIssue] = []
        self.excluded: set[int] = set()

    def add(self, line: int, pid: str, column: str, problem: CellProblem, file: str | Path | None = None,
            severity: str = "excluded") -> None:
        who = f"patient {pid}" if pid else f"row {line}"
        message = (f"{who} ({self.manifest} row {line}, column '{column}'): field '{column}' {problem.message}")
        self.issues.append(QCIssue(pid or f"row {line}", problem.reason, column, str(file or self.manifest),
                                   message, severity, line))
        if severity == "excluded":
            self.excluded.add(line)

    def note(self, line: int, pid: str, column: str, cell: Cell) -> None:
        if cell.note:
            self.add(line, pid, column, CellProblem("normalised_value", cell.note), severity="warning")


def _patient_ids(header: list[str], records, rows: _Rows) -> dict[int, str]:
    """The id of each row (a refused id leaves the row excluded); duplicates (normalised) excluded together."""
    at = header.index("patient_id")
    ids: dict[int, str] = {}
    for line, cells in records:
        if len(cells) != len(header):
            raw = cells[at].strip() if at < len(cells) else ""
            rows.add(line, raw, "patient_id", CellProblem(
                "invalid_row", f"row {line} has {len(cells)} values where the header has {len(header)} columns "
                "(a delimiter inside an unquoted value, or a cut line)"))
            continue
        cell = check_cell(FIELD_RULES["patient_id"], cells[at])
        if cell.problem:
            rows.add(line, "", "patient_id", cell.problem)
            continue
        rows.note(line, str(cell.value), "patient_id", cell)
        ids[line] = str(cell.value)
    groups: dict[str, list[int]] = {}
    for line, pid in ids.items():
        groups.setdefault(normalised_id(pid), []).append(line)
    for lines in groups.values():
        for line in lines if len(lines) > 1 else ():
            others = [f"row {o} ({ids[o]!r})" for o in lines if o != line]
            rows.add(line, ids[line], "patient_id", CellProblem(
                "duplicate_patient", f"is {ids[line]!r}, the same patient as {', '.join(others)} (ids are compared "
                "without surrounding spaces and letter case)"))
    return ids


def _parse_rows(config: SiteConfig, header: list[str], records, rows: _Rows, ids: dict[int, str],
                images: bool = True, scans_only: bool = False):
    """Per kept row: {column: value} and the resolved paths; every refused cell is an issue. With
    ``scans_only`` the id and the paths only."""
    at = {name: i for i, name in enumerate(header) if name}
    values: dict[int, dict] = {}
    paths: dict[int, dict[str, Path]] = {}
    columns = {p: c for p, c in config.phase_columns.items()} | {"mask": config.mask_column}
    for line, cells in records:
        if line not in ids:
            continue
        pid, row = ids[line], {"patient_id": ids[line]}
        rules = [] if scans_only else [FIELD_RULES[c] for c in (*CLINICAL_COLUMNS, *OUTCOME_COLUMNS)]
        for rule in rules:
            cell = check_cell(rule, cells[at[rule.column]])
            if cell.problem:
                rows.add(line, pid, rule.column, cell.problem)
            rows.note(line, pid, rule.column, cell)
            row[rule.column] = cell.value
        for lab in LABS if not scans_only else ():
            cell = check_cell(FieldRule(lab, "number"), cells[at[lab]])  # its range: in canonical units, below
            raw_unit = cells[at[unit_column(lab)]] if unit_column(lab) in at else None
            unit = config.labs[lab].unit if is_missing(raw_unit) else raw_unit.strip()
            row[lab], row[unit_column(lab)] = cell.value, unit
            if cell.problem:
                rows.add(line, pid, lab, cell.problem)
                continue
            _, problem = check_lab(lab, float(cell.value), unit)
            if problem:
                column = unit_column(lab) if problem.reason == "unknown_unit" else lab
                rows.add(line, pid, column, problem)
        paths[line] = {}
        for key, column in columns.items() if images else ():
            cell = check_cell(path_rule(column), cells[at[column]])
            if cell.problem:
                rows.add(line, pid, column, cell.problem)
                continue
            path, problem = resolve_input(str(cell.value), config.data_root, config.input_roots)
            if problem:
                rows.add(line, pid, column, problem, path)
            paths[line][key] = path
        values[line] = row
    return values, paths


def read_manifest(config: SiteConfig, strict: bool = True, images: bool = True, scans_only: bool = False
                  ) -> Manifest:
    """Read ``config.manifest`` and check every row.

    ``strict``: raise ManifestError listing all problems. Otherwise the rows
    with problems are left out and listed in ``Manifest.issues``.
    ``images=False``: the clinical and outcome columns only (for clinical models): the image and
    mask columns are neither required nor checked, and the paths come back empty.
    ``scans_only``: a manifest of scans without outcomes (a site's archive, for self-supervised
    pretraining): the id, phase and mask columns only are required and read; any other column (labs,
    outcomes) is ignored, never read, and listed in ``ignored_columns``; the table holds the ids only.
    """
    header, records = _read_records(config)
    ignored = _check_header(config.manifest, header, config, records, images, scans_only)
    rows = _Rows(config.manifest)
    ids = _patient_ids(header, records, rows)
    values, paths = _parse_rows(config, header, records, rows, ids, images, scans_only)
    if strict and rows.excluded:
        raise ManifestError(config.manifest, [i.message for i in rows.issues if i.severity == "excluded"])
    kept = [line for line, _ in records if line in values and line not in rows.excluded]
    if scans_only:
        table = pd.DataFrame({"patient_id": [values[line]["patient_id"] for line in kept]}, dtype=object)
        return Manifest(config.site_id, table.set_index("patient_id", drop=False),
                        {p: [paths[line][p] for line in kept] for p in config.phase_columns},
                        [paths[line]["mask"] for line in kept], tuple(rows.issues),
                        {ids[line]: line for line in kept}, tuple(ignored), config.manifest)
    columns = ["patient_id", *CLINICAL_COLUMNS, *LABS, *(unit_column(lab) for lab in LABS), *OUTCOME_COLUMNS]
    table = pd.DataFrame([values[line] for line in kept], columns=columns)
    for column, kind in CLINICAL_COLUMNS.items():
        if kind == "float":
            table[column] = table[column].astype(float)
    for column in LABS:
        table[column] = table[column].astype(float)
    table["time_months"] = table["time_months"].astype(float)
    table["event"] = table["event"].astype(np.int64)
    table["tumour_number"] = table["tumour_number"].astype(np.int64)
    if not images:
        return Manifest(config.site_id, table.set_index("patient_id", drop=False), {p: [] for p in
                        config.phase_columns}, [], tuple(rows.issues), {ids[line]: line for line in kept},
                        tuple(ignored), config.manifest)
    return Manifest(config.site_id, table.set_index("patient_id", drop=False),
                    {p: [paths[line][p] for line in kept] for p in config.phase_columns},
                    [paths[line]["mask"] for line in kept], tuple(rows.issues),
                    {ids[line]: line for line in kept}, tuple(ignored), config.manifest)


def raw_rows(config: SiteConfig) -> list[tuple[int, dict[str, str]]]:
    """Every row of the manifest as it is written, ``(line, {column: cell})``, no rule applied (the rows a
    check would exclude too): what a comparison across manifests reads (ids, paths). A fault of the
    file as a whole raises as in :func:`read_manifest`."""
    header, records = _read_records(config)
    return [(line, dict(zip(header, cells))) for line, cells in records]
