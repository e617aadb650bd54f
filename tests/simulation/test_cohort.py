"""The synthetic cohort: realism targets on the default cohort, and the volumes on disk.

The targets (early-recurrence rate per site, the oracle's AUC, a clinical-only
model's AUC) are checked on the default cohort (seed 0) written tabular-only,
which has exactly the manifests of the full cohort. The volumes are checked on
a cohort of 3 patients per site.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from scipy import ndimage
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from hccfed.common.site_config import load_site_config
from hccfed.common.schema import (CATEGORIES, LABS, MASK_COLUMN, PHASES, early_recurrence_label, image_column,
                           manifest_columns, to_canonical)
from hccfed.simulation.cohort import (DEFAULT_SITES, generate_tabular, oracle_path, render_site_patient,
                               synthesize_cohort, true_risk)

SIZES = {"hospital_a": 200, "hospital_b": 120, "hospital_c": 80}


def read_canonical(data_dir, site):
    """A site's manifest with the labs converted to canonical units and the binary label."""
    table = pd.read_csv(data_dir / site.site_id / "manifest.csv")
    config = load_site_config(site.config_path)
    for lab in LABS:
        table[lab] = to_canonical(lab, table[lab].to_numpy(dtype=float), config.labs[lab].unit)
    table["label"] = early_recurrence_label(table["time_months"], table["event"])
    table["site_id"] = site.site_id
    return table


@pytest.fixture(scope="module")
def default_cohort(tmp_path_factory):
    """(data_dir, pooled canonical table joined with the oracle) of the default cohort, seed 0."""
    data_dir = tmp_path_factory.mktemp("default_cohort")
    synthesize_cohort(data_dir, seed=0, tabular_only=True, progress=False)
    pooled = pd.concat([read_canonical(data_dir, s) for s in DEFAULT_SITES], ignore_index=True)
    oracle = pd.read_csv(oracle_path(data_dir))
    return data_dir, pooled.merge(oracle, on=["site_id", "patient_id"], validate="one_to_one")


# ------------------------------------------------------------------ realism targets


def test_site_sizes(default_cohort):
    _, pooled = default_cohort
    assert pooled.groupby("site_id").size().to_dict() == SIZES


def test_early_recurrence_rate_of_every_site(default_cohort):
    _, pooled = default_cohort
    known = pooled[pooled["label"] >= 0]
    assert len(known) > 0.85 * len(pooled)  # few patients censored before 24 months
    for site_id, rate in known.groupby("site_id")["label"].mean().items():
        assert 0.30 <= rate <= 0.65, (site_id, rate)


def test_bayes_optimal_auc(default_cohort):
    _, pooled = default_cohort
    known = pooled[pooled["label"] >= 0]
    auc = roc_auc_score(known["label"], known["true_risk_24m"])
    assert 0.80 <= auc <= 0.92, auc


def clinical_design(table: pd.DataFrame) -> pd.DataFrame:
    """Clinical variables: logs of the skewed values, one-hot categories (first level dropped)."""
    x = pd.DataFrame({"age": table["age"], "tumour_number": table["tumour_number"],
                      "log_diameter": np.log(table["tumour_diameter_mm"])})
    for lab, spec in LABS.items():
        x[lab] = np.log(table[lab]) if spec.log_scale else table[lab]
    for column, levels in CATEGORIES.items():
        for level in levels[1:]:
            x[f"{column}_{level}"] = (table[column] == level).astype(float)
    return x


def test_clinical_only_model_is_moderate(default_cohort):
    """The labs carry only part of the signal: the images must carry the rest."""
    _, pooled = default_cohort
    known = pooled[pooled["label"] >= 0]
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
    auc = cross_val_score(model, clinical_design(known), known["label"], cv=folds, scoring="roc_auc").mean()
    assert 0.60 <= auc <= 0.78, auc


def test_manifests_look_like_a_hospital_export(default_cohort):
    data_dir, _ = default_cohort
    for site in DEFAULT_SITES:
        table = pd.read_csv(data_dir / site.site_id / "manifest.csv", dtype=str)
        assert list(table.columns) == manifest_columns()
        assert all(re.fullmatch(site.site_id[-1].upper() + r"\d{4}", pid) for pid in table["patient_id"])
        for column, levels in CATEGORIES.items():
            assert set(table[column]) <= set(levels), column
        assert set(table["event"]) <= {"0", "1"}
        assert set(table["tumour_number"]) <= {"1", "2", "3"}
        assert all(re.fullmatch(r"\d+(\.\d)?", t) for t in table["time_months"])
        for pid, row in zip(table["patient_id"], table.itertuples()):
            assert getattr(row, image_column("arterial")) == f"images/{pid}_arterial.nii.gz"
            assert getattr(row, MASK_COLUMN) == f"masks/{pid}_tumour.nii.gz"
        config = load_site_config(site.config_path)
        for lab, spec in LABS.items():
            canonical = to_canonical(lab, table[lab].astype(float).to_numpy(), config.labs[lab].unit)
            low, high = spec.physiological
            assert ((canonical >= low) & (canonical <= high)).all(), (site.site_id, lab)


def test_labs_are_written_in_each_sites_units(default_cohort):
    """Manifest labs, converted back with schema.to_canonical, are the generator's values up to rounding."""
    _, pooled = default_cohort
    for site in DEFAULT_SITES:
        truth = generate_tabular(site, seed=0)
        written = pooled[pooled["site_id"] == site.site_id].reset_index(drop=True)
        assert (written["patient_id"] == truth["patient_id"]).all()
        for lab in LABS:
            step = float(to_canonical(lab, 1.0, load_site_config(site.config_path).labs[lab].unit))
            assert np.allclose(written[lab], truth[lab], rtol=0, atol=step * 0.51), (site.site_id, lab)
    # the units really differ: albumin of hospital_b is in g/dL, hospital_c's enzymes in ukat/L
    data_dir, _ = default_cohort
    b = pd.read_csv(data_dir / "hospital_b" / "manifest.csv")
    c = pd.read_csv(data_dir / "hospital_c" / "manifest.csv")
    assert b["albumin"].median() < 6 and c["ast"].median() < 5


def test_oracle_is_the_hazard_models_risk_and_stays_outside_the_sites(default_cohort):
    data_dir, pooled = default_cohort
    assert np.allclose(pooled["true_risk_24m"], true_risk(pooled["linear_predictor"]))
    assert oracle_path(data_dir) == data_dir / "_oracle" / "oracle.csv"
    for site in DEFAULT_SITES:
        manifest = (data_dir / site.site_id / "manifest.csv").read_text()
        assert "aggressiveness" not in manifest and "risk" not in manifest
    info = json.loads((data_dir / "cohort.json").read_text())
    assert info["seed"] == 0 and info["counts"] == SIZES and info["tabular_only"] is True


# ------------------------------------------------------------------ volumes

SMALL = tuple(dataclasses.replace(s, n_patients=3) for s in DEFAULT_SITES)


def file_digests(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("small_cohort")
    synthesize_cohort(data_dir, seed=3, sites=SMALL, workers=1, progress=False)
    return data_dir


def signal(image: sitk.Image, site) -> np.ndarray:
    """Voxel values with the site's intensity scale and offset removed."""
    return (sitk.GetArrayFromImage(image).astype(float) - site.intensity_offset) / site.intensity_scale


def test_volumes_load_with_the_sites_geometry(small_cohort):
    for site in SMALL:
        table = pd.read_csv(small_cohort / site.site_id / "manifest.csv")
        for row in table.itertuples():
            mask = sitk.ReadImage(str(small_cohort / site.site_id / getattr(row, MASK_COLUMN)))
            assert mask.GetPixelID() == sitk.sitkUInt8
            for phase in PHASES:
                image = sitk.ReadImage(str(small_cohort / site.site_id / getattr(row, image_column(phase))))
                assert image.GetPixelID() == sitk.sitkInt16
                assert np.allclose(image.GetSpacing(), site.spacing_mm)
                assert np.allclose(image.GetDirection(), np.eye(3).ravel())
                assert image.GetSize() == mask.GetSize()
                assert np.allclose(image.GetOrigin(), mask.GetOrigin(), atol=1e-3)
            extent = np.array(mask.GetSize()) * np.array(site.spacing_mm)
            assert np.allclose(extent, (320.0, 320.0, 200.0), atol=max(site.spacing_mm))
    sizes = {s.site_id: sum(p.stat().st_size for p in (small_cohort / s.site_id).rglob("*.nii.gz")) / 3
             for s in SMALL}
    assert max(sizes.values()) < 4e6, sizes  # a few MB per patient


def test_tumour_is_in_the_liver_with_hcc_kinetics(small_cohort):
    """Per patient: arterial hyper-enhancement and portal wash-out against the liver around the
    tumour (medians: robust to a necrotic core and to vessels); pre-contrast hypointense on average."""
    pre_ratios = []
    for site in SMALL:
        for index in range(site.n_patients):
            rendered = render_site_patient(site, 3, index)
            pid = f"{site.prefix}{index + 1:04d}"
            mask_image = sitk.ReadImage(str(small_cohort / site.site_id / "masks" / f"{pid}_tumour.nii.gz"))
            mask = sitk.GetArrayFromImage(mask_image).astype(bool)
            assert np.array_equal(mask, rendered.mask.astype(bool))  # the render is what was written
            assert mask.sum() > 0
            assert (mask & rendered.liver).sum() >= 0.95 * mask.sum(), (site.site_id, pid)
            # liver parenchyma 4-20 mm around the tumour, against which a radiologist compares it
            distance = ndimage.distance_transform_edt(~mask, sampling=site.spacing_mm[::-1])
            around = rendered.liver & (distance > 4) & (distance < 20)
            median = {}
            for phase in PHASES:
                image = sitk.ReadImage(str(small_cohort / site.site_id / "images" / f"{pid}_{phase}.nii.gz"))
                values = signal(image, site)
                median[phase] = np.median(values[mask]), np.median(values[around])
            assert median["arterial"][0] > median["arterial"][1], (site.site_id, pid, median)
            assert median["portal"][0] < median["portal"][1], (site.site_id, pid, median)
            pre_ratios.append(median["pre"][0] / median["pre"][1])
    assert np.mean(pre_ratios) < 0.97, pre_ratios


def test_phases_are_misaligned_with_the_portal_phase():
    site = SMALL[1]
    moved = render_site_patient(site, 3, 0)
    still = render_site_patient(dataclasses.replace(site, max_rotation_deg=0.0, max_shift_mm=0.0), 3, 0)
    assert np.array_equal(moved.phases["portal"], still.phases["portal"])
    assert moved.motion["portal"] == (0.0, 0.0)
    for phase in ("pre", "arterial", "delayed"):
        angle, shift = moved.motion[phase]
        assert angle <= 3.0 + 1e-6 and 1.0 - 1e-6 <= shift <= 4.0 + 1e-6
        assert still.motion[phase] == (0.0, 0.0)
        changed = np.abs(moved.phases[phase].astype(float) - still.phases[phase]) > 3 * site.noise_sd * site.intensity_scale
        assert changed[moved.liver].mean() > 0.02, phase  # the liver edges and vessels moved


def test_sites_differ_in_intensity_scale(small_cohort):
    scales = sorted(s.intensity_scale for s in SMALL)
    assert all(hi >= 2 * lo for lo, hi in zip(scales, scales[1:]))
    medians = {}
    for site in SMALL:
        rendered = render_site_patient(site, 3, 0)
        image = sitk.ReadImage(str(small_cohort / site.site_id / "images" / f"{site.prefix}0001_portal.nii.gz"))
        medians[site.site_id] = float(np.median(sitk.GetArrayFromImage(image)[rendered.liver]))
    ordered = sorted(medians.values())
    assert all(hi >= 2 * lo for lo, hi in zip(ordered, ordered[1:])), medians


def test_same_seed_same_bytes_and_tabular_only_same_manifest(small_cohort, tmp_path):
    again = tmp_path / "again"
    synthesize_cohort(again, seed=3, sites=SMALL, workers=2, progress=False)
    assert file_digests(again) == file_digests(small_cohort)
    tabular = tmp_path / "tabular"
    synthesize_cohort(tabular, seed=3, sites=SMALL, tabular_only=True, progress=False)
    for site in SMALL:
        name = f"{site.site_id}/manifest.csv"
        assert (tabular / name).read_bytes() == (small_cohort / name).read_bytes()
        assert not list((tabular / site.site_id / "images").iterdir())
    assert oracle_path(tabular).read_bytes() == oracle_path(small_cohort).read_bytes()
    other = tmp_path / "other"
    synthesize_cohort(other, seed=4, sites=SMALL[:1], tabular_only=True, progress=False)
    assert (other / "hospital_a/manifest.csv").read_bytes() != (small_cohort / "hospital_a/manifest.csv").read_bytes()


def test_a_patient_does_not_depend_on_the_site_size():
    small = generate_tabular(dataclasses.replace(DEFAULT_SITES[0], n_patients=5), seed=0)
    full = generate_tabular(DEFAULT_SITES[0], seed=0).iloc[:5]
    pd.testing.assert_frame_equal(small, full)
