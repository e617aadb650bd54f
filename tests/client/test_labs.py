from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hccfed.client.labs import LabError, clinical_features, harmonize_labs, lab_category
from hccfed.common.site_config import load_site_config
from hccfed.common.schema import LABS, clinical_feature_names, early_recurrence_label, to_canonical

REPO = Path(__file__).resolve().parents[2]


def _table(**labs):
    row = {"patient_id": "P1", "age": 61, "sex": "M", "tumour_number": 1, "tumour_diameter_mm": 30.0,
           "child_pugh": "A", "hepatitis": "HBV", "afp": 5.0, "ast": 30.0, "alt": 30.0, "ggt": 30.0,
           "alp": 80.0, "platelets": 200.0, "albumin": 45.0, "bilirubin": 10.0}
    row.update(labs)
    return pd.DataFrame([row])


def test_lab_category_boundaries_are_normal():
    assert lab_category(np.array([0.9, 1.0, 2.0, 3.0, 3.1]), 1.0, 3.0).tolist() == [-1, 0, 0, 0, 1]


def test_same_patient_gets_same_categories_in_different_units():
    a = load_site_config(REPO / "site_configs" / "hospital_a.yaml")  # g/L, umol/L, U/L
    c = load_site_config(REPO / "site_configs" / "hospital_c.yaml")  # ukat/L for enzymes
    # AST 90 U/L = 1.5 ukat/L: Higher at both sites although the numbers differ 60-fold.
    cat_a = harmonize_labs(_table(ast=90.0), a)
    cat_c = harmonize_labs(_table(ast=1.5, alt=0.5, ggt=0.5, alp=1.3), c)
    assert cat_a["ast_cat"].item() == cat_c["ast_cat"].item() == 1
    assert cat_a["ast"].item() == pytest.approx(cat_c["ast"].item())


def test_unit_conversions_to_canonical():
    assert to_canonical("bilirubin", 1.0, "mg/dL") == pytest.approx(17.1)
    assert to_canonical("albumin", 3.5, "g/dL") == pytest.approx(35.0)
    assert to_canonical("ast", 1.0, "ukat/L") == pytest.approx(60.0)
    with pytest.raises(KeyError, match="unknown unit 'mmol/L' for lab 'albumin'"):
        to_canonical("albumin", 1.0, "mmol/L")


def test_implausible_value_names_patient_field_and_config():
    b = load_site_config(REPO / "site_configs" / "hospital_b.yaml")  # albumin in g/dL
    with pytest.raises(LabError) as err:  # 45 g/dL: a g/L value typed into a g/dL field
        harmonize_labs(_table(albumin=45.0, bilirubin=0.6, afp=3.0), b)
    message = str(err.value)
    assert "patient P1" in message and "'albumin'" in message and str(b.source) in message


def test_clinical_vector_has_the_schema_columns():
    a = load_site_config(REPO / "site_configs" / "hospital_a.yaml")
    x = clinical_features(_table(), a)
    assert x.shape == (1, len(clinical_feature_names())) and x.dtype == np.float32
    names = clinical_feature_names()
    assert x[0, names.index("male")] == 1.0 and x[0, names.index("hepatitis_HBV")] == 1.0
    assert len(names) == 2 * len(LABS) + 8


def test_early_recurrence_label_rule():
    times = np.array([5.0, 30.0, 10.0, 24.0, 24.0])
    events = np.array([1, 1, 0, 1, 0])
    assert early_recurrence_label(times, events).tolist() == [1, 0, -1, 1, -1]
