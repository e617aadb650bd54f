"""Lab harmonization and the clinical feature vector.

Each site reports labs in its own units against its own reference ranges. As in
the multicenter seed (004), each lab becomes Lower / Normal / Higher against the
site's own range, which makes values from different assays comparable. The
continuous value is kept too, expressed relative to the site's range (multiples
of the upper limit of normal on a log2 scale for the skewed labs, position in
the range for the others), so no site needs another site's units.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from hccfed.common.site_config import SiteConfig
from hccfed.common.schema import HEPATITIS_TYPES, LAB_CATEGORY_CODES, LABS, to_canonical


class LabError(ValueError):
    """A lab value is outside the physiological range (a typing or unit error)."""


def lab_category(values: np.ndarray, lower: float, upper: float) -> np.ndarray:
    """Code each value -1 (Lower), 0 (Normal) or +1 (Higher) against [lower, upper]."""
    values = np.asarray(values, dtype=float)
    codes = np.zeros(values.shape, dtype=np.int64)
    codes[values < lower] = LAB_CATEGORY_CODES["Lower"]
    codes[values > upper] = LAB_CATEGORY_CODES["Higher"]
    return codes


def relative_lab_value(lab: str, values: np.ndarray, lower: float, upper: float) -> np.ndarray:
    """A unit-free continuous form of a lab, relative to the site's reference range.

    Skewed labs (``LabSpec.log_scale``): log2 of the value in multiples of the
    upper limit of normal (0 at the limit, +1 at twice it). Others: position in
    the range, 0 at its middle, +-0.5 at its limits.
    """
    values = np.asarray(values, dtype=float)
    if LABS[lab].log_scale:
        return np.log2(np.maximum(values, upper * 1e-3) / upper)
    return (values - lower) / (upper - lower) - 0.5


def check_physiological(table: pd.DataFrame, config: SiteConfig) -> list[str]:
    """Problems for values outside the physiological range once converted to canonical units."""
    problems = []
    for lab, spec in LABS.items():
        unit = config.labs[lab].unit
        canonical = to_canonical(lab, table[lab].to_numpy(dtype=float), unit)
        low, high = spec.physiological
        for pid, raw, value in zip(table["patient_id"], table[lab], canonical):
            if not low <= value <= high:
                problems.append(
                    f"patient {pid}: field '{lab}' is {raw} {unit} = {value:.4g} {spec.canonical_unit}, "
                    f"outside the physiological range [{low}, {high}] {spec.canonical_unit}; "
                    f"check the value and the unit in {config.source}"
                )
    return problems


def harmonize_labs(table: pd.DataFrame, config: SiteConfig) -> pd.DataFrame:
    """Per lab: ``<lab>_cat`` (-1/0/1), ``<lab>_rel`` (relative value) and ``<lab>`` canonical."""
    problems = check_physiological(table, config)
    if problems:
        raise LabError(f"{config.manifest}: " + "\n  ".join(problems))
    out = pd.DataFrame(index=table.index)
    for lab in LABS:
        ref = config.labs[lab]
        values = table[lab].to_numpy(dtype=float)
        out[f"{lab}_cat"] = lab_category(values, ref.lower, ref.upper)
        out[f"{lab}_rel"] = relative_lab_value(lab, values, ref.lower, ref.upper)
        out[lab] = to_canonical(lab, values, ref.unit)
    return out


def clinical_features(table: pd.DataFrame, config: SiteConfig) -> np.ndarray:
    """The harmonized clinical vector, shape (n_patients, len(clinical_feature_names())),
    in the order of ``common.schema.clinical_feature_names``.

    Fixed, site-independent transforms only (no statistics of the site's data),
    so every site produces comparable features without sharing anything.
    """
    labs = harmonize_labs(table, config)
    cols = [labs[f"{lab}_{form}"].to_numpy(dtype=float) for lab in LABS for form in ("cat", "rel")]
    cols.append((table["age"].to_numpy(dtype=float) - 60.0) / 10.0)
    cols.append((table["sex"] == "M").to_numpy(dtype=float))
    cols.append(table["tumour_number"].to_numpy(dtype=float) - 1.0)
    cols.append(np.log2(np.maximum(table["tumour_diameter_mm"].to_numpy(dtype=float), 1.0) / 30.0))
    cols.append(table["child_pugh"].map({"A": 0.0, "B": 1.0, "C": 2.0}).to_numpy(dtype=float))
    for hep in HEPATITIS_TYPES:
        if hep != "none":
            cols.append((table["hepatitis"] == hep).to_numpy(dtype=float))
    return np.stack(cols, axis=1).astype(np.float32)
