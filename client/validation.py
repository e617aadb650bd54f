"""The validation layer's value rules: one manifest cell, one path, one site's duplicates.

Every rule is declared in ``hccfed.common.schema`` (``FIELD_RULES``, ``lab_rule``,
``path_rule``, ``MISSING_TOKENS``); this module only applies them, so no
other module decides what a valid value is. A cell that breaks its rule gives a
``CellProblem`` (reason code and message); the manifest reader turns it into a
QC entry naming the patient, the row, the column and the file. Nothing is
clipped or guessed: a value is accepted as written, in its canonical spelling
(surrounding spaces removed, a category's letter case), or refused.
"""

from __future__ import annotations

import math
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from hccfed.common.schema import LABS, MAX_ID_LENGTH, MISSING_TOKENS, FieldRule

#: A plain decimal number, as a spreadsheet writes it (no thousands separators, no "1_000", no "0x1f").
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?", re.ASCII)


@dataclass(frozen=True)
class CellProblem:
    """Why one cell is refused: a QC reason code and what is wrong (without the patient, added by the caller)."""

    reason: str
    message: str


@dataclass(frozen=True)
class Cell:
    """A checked cell: the value (None when refused), the problem, and a note when the spelling was normalised."""

    value: object = None
    problem: CellProblem | None = None
    note: str = ""


def is_missing(raw: str | None) -> bool:
    return raw is None or raw.strip().casefold() in MISSING_TOKENS


def _number(rule: FieldRule, text: str) -> Cell:
    if not _NUMBER.fullmatch(text):
        hint = "; a decimal comma? write 1.5, not 1,5" if re.fullmatch(r"[+-]?\d+,\d+", text) else ""
        return Cell(problem=CellProblem("invalid_value", f"is {text!r}, expected a number{hint}"))
    value = float(text)
    if not math.isfinite(value):
        return Cell(problem=CellProblem("invalid_value", f"is {text!r}, expected a finite number"))
    if rule.kind == "integer" and value != int(value):
        return Cell(problem=CellProblem("invalid_value", f"is {text!r}, expected a whole number"))
    if rule.low is not None and rule.high is not None:
        below = value <= rule.low if rule.low_open else value < rule.low
        if below or value > rule.high:
            return Cell(problem=CellProblem("implausible_value", f"is {text}, outside the plausible range "
                                            f"{rule.range_text()}"))
    return Cell(int(value) if rule.kind == "integer" else value)


def check_cell(rule: FieldRule, raw: str | None) -> Cell:
    """Apply ``rule`` to one raw manifest cell (a string, or None when the row is short)."""
    allowed = raw is not None and rule.kind == "category" and raw.strip().casefold() in {
        a.casefold() for a in rule.allowed}  # "none" is a hepatitis category, not a missing value
    empty = raw is None or not raw.strip()
    if (empty if rule.kind == "path" else is_missing(raw)) and not allowed:  # a path "NA" is just not found
        shown = "empty" if raw is None or not raw.strip() else f"{raw.strip()!r} (no value)"
        return Cell(problem=CellProblem(rule.missing_reason, f"is {shown}, expected "
                                        f"{'a file path' if rule.kind == 'path' else 'a value'}"))
    text = raw.strip()
    note = f"{raw!r} read as {text!r}" if text != raw and rule.kind in ("id", "category") else ""
    if rule.kind in ("number", "integer"):
        return _number(rule, text)
    if rule.kind == "category":
        canonical = {a.casefold(): a for a in rule.allowed}.get(text.casefold())
        if canonical is None:
            return Cell(problem=CellProblem("invalid_value", f"is {text!r}, expected one of {list(rule.allowed)}"))
        if canonical != text:
            note = f"{raw!r} read as {canonical!r}"
        return Cell(canonical, note=note)
    if rule.kind == "id":
        if len(text) > MAX_ID_LENGTH or any(unicodedata.category(c).startswith("C") for c in text):
            return Cell(problem=CellProblem("invalid_value", f"is {text[:80]!r}: an id needs at most "
                                            f"{MAX_ID_LENGTH} printable characters"))
        return Cell(text, note=note)
    if rule.kind == "path":
        return Cell(text)
    raise ValueError(f"unknown rule kind {rule.kind!r} of column {rule.column!r}")


def normalised_id(patient_id: str) -> str:
    """The form ids are compared in: surrounding spaces removed, case folded, Unicode composed."""
    return unicodedata.normalize("NFKC", patient_id.strip()).casefold()


def check_lab(lab: str, value: float, unit: str) -> tuple[float | None, CellProblem | None]:
    """(value in canonical units, problem) of one lab value given in ``unit``."""
    spec = LABS[lab]
    if unit not in spec.conversions:
        return None, CellProblem("unknown_unit", f"unit {unit!r} is not a known unit of lab '{lab}'; known units: "
                                 f"{sorted(spec.conversions)}")
    canonical = value * spec.conversions[unit]
    low, high = spec.physiological
    if not low <= canonical <= high:
        return None, CellProblem("lab_out_of_range", f"is {value:g} {unit} = {canonical:.4g} {spec.canonical_unit}, "
                                 f"outside the physiological range [{low:g}, {high:g}] {spec.canonical_unit}; "
                                 "check the value and its unit")
    return canonical, None


def inside(path: Path, roots: tuple[Path, ...]) -> bool:
    """Whether ``path`` (already resolved) lies in one of ``roots`` (resolved folders)."""
    return any(path == root or path.is_relative_to(root) for root in roots)


def resolve_input(text: str, data_root: Path, roots: tuple[Path, ...]) -> tuple[Path, CellProblem | None]:
    """(resolved path, problem) of a manifest path: relative to ``data_root``, symlinks followed, inside ``roots``.

    The path is resolved before the containment check, so neither ``..`` nor a
    symbolic link inside the data folder can lead out of it.
    """
    if "\\" in text and not Path(text).exists():
        hint = "; it uses '\\' (a Windows path): write the path with '/'"
    else:
        hint = ""
    given = Path(os.path.expanduser(text)) if text.startswith("~") else Path(text)
    joined = given if given.is_absolute() else data_root / given
    try:
        resolved = joined.resolve()
    except (OSError, RuntimeError) as err:  # a symlink loop
        return joined, CellProblem("missing_file", f"path {text!r} cannot be resolved ({err})")
    if not inside(resolved, roots):
        shown = f"{text!r} resolves to {resolved}" if str(resolved) != text else f"{text!r}"
        return resolved, CellProblem("path_outside_root", f"path {shown}, outside the data folder {data_root}"
                                     + (f" and the allowed roots {[str(r) for r in roots[1:]]}" if roots[1:] else "")
                                     + "; the site YAML must list such a folder under allowed_roots")
    if not resolved.exists():
        return resolved, CellProblem("missing_file", f"file not found: {resolved}{hint}")
    return resolved, None
