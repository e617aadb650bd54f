"""Fault injection: every faulty patient is excluded with its reason, every clean one is prepared,
the data folder is untouched, and a fixed patient is re-prepared alone."""

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

import hccfed.client.prepare as prepare_module
from hccfed.client.prepare import PreparationError, prepare_site
from hccfed.client.qc import QCIssue, QCReport, read_qc_report
from hccfed.common.errors import ConfigError
from hccfed.common.site_config import load_site_config
from site_fixtures import private_site_copy
from hccfed.simulation.dicom_export import write_dicom_series


def _tree_digest(root: Path) -> dict[str, str]:
    """Every file's content hash and modification time."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() + f"|{p.stat().st_mtime_ns}"
            for p in sorted(root.rglob("*")) if p.is_file()}


def _copy_site(tiny_cohort, tmp_path, index=0):
    """A private copy of one tiny site (data and YAML) that a test may damage."""
    return private_site_copy(tiny_cohort[1][index], tmp_path)


def _inject_faults(config) -> dict[str, str]:
    """Damage one patient per kind of fault; return {patient id: expected reason}."""
    root = config.data_root
    table = pd.read_csv(config.manifest, dtype=str, keep_default_na=False)
    ids = list(table["patient_id"])
    expected = {}

    def row(pid):
        return table.index[table["patient_id"] == pid][0]

    def path(pid, column):
        return root / table.at[row(pid), column]

    pid = ids[0]  # a phase file missing
    path(pid, "image_arterial").unlink()
    expected[pid] = "missing_file"
    pid = ids[1]  # a truncated NIfTI
    victim = path(pid, "image_pre")
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    expected[pid] = "unreadable_image"
    pid = ids[2]  # an empty mask
    mask = sitk.ReadImage(str(path(pid, "mask")))
    sitk.WriteImage(mask * 0, str(path(pid, "mask")), True)
    expected[pid] = "empty_mask"
    pid = ids[3]  # a mask far from the image (e.g. another patient's, or a lost origin)
    mask = sitk.ReadImage(str(path(pid, "mask")))
    mask.SetOrigin([o + 1000.0 for o in mask.GetOrigin()])
    sitk.WriteImage(mask, str(path(pid, "mask")), True)
    expected[pid] = "mask_outside_image"
    pid = ids[4]  # a phase that is not this patient's anatomy: registration cannot succeed
    image = sitk.ReadImage(str(path(pid, "image_delayed")))
    noise = sitk.GetImageFromArray(np.random.default_rng(0).normal(400, 80, image.GetSize()[::-1]).astype(np.int16))
    noise.CopyInformation(image)
    sitk.WriteImage(noise, str(path(pid, "image_delayed")), True)
    expected[pid] = "registration_failed"
    pid = ids[5]  # a lab value typed in the wrong unit
    table.at[row(pid), "albumin"] = "4200"
    expected[pid] = "lab_out_of_range"
    pid = ids[6]  # a per-patient unit nobody knows
    table["albumin_unit"] = ""
    table.at[row(pid), "albumin_unit"] = "mmol/L"
    expected[pid] = "unknown_unit"
    pid = ids[7]  # no outcome
    table.at[row(pid), "time_months"] = ""
    expected[pid] = "missing_outcome"
    pid = ids[8]  # a DICOM series with a slice cut short
    image = sitk.ReadImage(str(path(pid, "image_portal")))
    folder = root / "dicom" / pid / "portal"
    files = write_dicom_series(image, folder, pid, "portal phase", "1.2.3.4", "1.2.3.4.5", 3)
    files[len(files) // 2].write_bytes(files[len(files) // 2].read_bytes()[:4000])
    table.at[row(pid), "image_portal"] = f"dicom/{pid}/portal"
    expected[pid] = "unreadable_image"
    pid = ids[9]  # a value that is not a number
    table.at[row(pid), "age"] = "sixty"
    expected[pid] = "invalid_value"
    pid = ids[10]  # a missing slice in a DICOM series
    image = sitk.ReadImage(str(path(pid, "image_pre")))
    folder = root / "dicom" / pid / "pre"
    files = write_dicom_series(image, folder, pid, "pre phase", "1.2.3.6", "1.2.3.6.7", 1)
    files[3].unlink()
    table.at[row(pid), "image_pre"] = f"dicom/{pid}/pre"
    expected[pid] = "dicom_series"
    # a clean patient in another known unit is converted, not excluded
    clean = ids[11]
    table.at[row(clean), "albumin"] = str(float(table.at[row(clean), "albumin"]) / 10.0)
    table.at[row(clean), "albumin_unit"] = "g/dL"
    table.to_csv(config.manifest, index=False)
    return expected


def test_faulty_patients_are_reported_and_the_rest_prepared(tiny_cohort, tmp_path, monkeypatch):
    config = _copy_site(tiny_cohort, tmp_path)
    reference = prepare_site(dataclasses.replace(config, cache_dir=tmp_path / "clean-cache"), workers=1,
                             progress=False)
    expected = _inject_faults(config)
    assert len(set(expected.values())) >= 10
    before = _tree_digest(config.data_root)

    site = prepare_site(config, workers=2, progress=False)

    report = site.qc
    all_ids = pd.read_csv(config.manifest, dtype=str)["patient_id"].tolist()
    clean = [p for p in all_ids if p not in expected]
    assert list(site.patient_ids) == clean and site.images.shape[0] == len(clean)
    assert report.prepared == clean and set(report.excluded) == set(expected)
    for pid, reason in expected.items():
        assert reason in report.reasons(pid), (pid, reason, [i.describe() for i in report.issues])
        issue = next(i for i in report.issues if i.patient_id == pid and i.reason == reason)
        assert f"patient {pid}" in issue.message and issue.field and issue.file, issue
        assert issue.field in issue.message, issue
    # the unit conversion made the g/dL patient's albumin equal to the clean run's
    names = site.clinical_names
    moved = all_ids[11]
    assert np.allclose(site.clinical[list(site.patient_ids).index(moved)],
                       reference.clinical[list(reference.patient_ids).index(moved)], atol=1e-4)
    assert np.array_equal(site.images[[list(site.patient_ids).index(p) for p in clean[:2]]],
                          reference.images[[list(reference.patient_ids).index(p) for p in clean[:2]]])
    assert "albumin_rel" in names

    # the report: in the cache folder, CSV and JSON, nothing written in the data folder
    assert _tree_digest(config.data_root) == before
    table = pd.read_csv(config.cache_dir / "qc_report.csv", dtype=str, keep_default_na=False)
    assert set(table.loc[table["status"] == "excluded", "patient_id"]) == set(expected)
    assert set(table.loc[table["status"] == "prepared", "patient_id"]) == set(clean)
    assert read_qc_report(config.cache_dir).to_dict() == report.to_dict()
    assert "excluded" in report.summary() and str(len(expected)) in report.summary()

    # nothing changed: no work at all
    calls = []
    real = prepare_module._prepare_one
    monkeypatch.setattr(prepare_module, "_prepare_one", lambda job: calls.append(job.patient_id) or real(job))
    again = prepare_site(config, workers=1, progress=False)
    assert calls == [] and np.array_equal(again.images, site.images) and again.qc.excluded == report.excluded

    # one patient fixed: that patient alone is prepared
    fixed = next(p for p, r in expected.items() if r == "invalid_value")
    manifest = pd.read_csv(config.manifest, dtype=str, keep_default_na=False)
    manifest.loc[manifest["patient_id"] == fixed, "age"] = "61"
    manifest.to_csv(config.manifest, index=False)
    third = prepare_site(config, workers=1, progress=False)
    assert calls == [fixed] and fixed in third.patient_ids and len(third) == len(clean) + 1
    # a lab-range change reuses every cube
    calls.clear()
    labs = dict(config.labs)
    labs["albumin"] = dataclasses.replace(labs["albumin"], lower=30.0)
    fourth = prepare_site(dataclasses.replace(config, labs=labs), workers=1, progress=False)
    assert calls == [] and np.array_equal(fourth.images, third.images)


def test_a_site_with_no_usable_patient_stops_with_the_report(tiny_cohort, tmp_path):
    config = _copy_site(tiny_cohort, tmp_path, index=2)
    table = pd.read_csv(config.manifest, dtype=str, keep_default_na=False)
    table["event"] = ""
    table.to_csv(config.manifest, index=False)
    with pytest.raises(PreparationError, match="no patient could be prepared.*qc_report.csv"):
        prepare_site(config, workers=1, progress=False)
    assert all(i.reason == "missing_outcome" for i in read_qc_report(config.cache_dir).issues)


def test_a_bad_config_still_stops_with_a_config_error(tmp_path):
    configs = Path(__file__).resolve().parents[2] / "site_configs"
    assert load_site_config(configs / "template.yaml").preprocessing.register  # the template is valid
    path = tmp_path / "site.yaml"
    text = (configs / "hospital_a.yaml").read_text()
    path.write_text(text.replace("labs:", "preprocessing:\n  register: maybe\nlabs:", 1))
    with pytest.raises(ConfigError, match=r"site.yaml: key 'preprocessing.register' must be bool"):
        load_site_config(path)
    path.write_text(text.replace("unit: g/L", "unit: g/l"))
    with pytest.raises(ConfigError, match=r"key 'labs.albumin.unit' is 'g/l'"):
        load_site_config(path)


def test_report_round_trip_and_reason_codes(tmp_path):
    report = QCReport("site_x", ["P1"], [QCIssue("P2", "empty_mask", "mask", "m.nii.gz", "patient P2: empty")])
    csv_path, json_path = report.write(tmp_path)
    assert json.loads(json_path.read_text())["n_excluded"] == 1
    assert "re-export the segmentation" in csv_path.read_text()
    assert read_qc_report(tmp_path) == report
    with pytest.raises(ValueError, match="unknown QC reason"):
        QCIssue("P3", "bad_luck", "", "", "")


def _write_reports(folder: str, times: int) -> int:
    from hccfed.client.qc import QCReport

    report = QCReport("hospital_a", ["A1", "A2"], [])
    for _ in range(times):
        report.write(Path(folder))
    return times


def test_processes_writing_one_sites_reports_at_once_never_collide(tmp_path):
    """Two processes preparing the same site (two benchmarks sharing a cohort's cache, a SuperNode and
    `hccfed prepare`) write its QC report and cache files at once: each through its own temporary file."""
    from concurrent.futures import ProcessPoolExecutor

    from hccfed.client.qc import read_qc_report

    with ProcessPoolExecutor(max_workers=3) as pool:
        assert list(pool.map(_write_reports, [str(tmp_path)] * 3, [150] * 3)) == [150] * 3
    assert read_qc_report(tmp_path).prepared == ["A1", "A2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qc_report.csv", "qc_report.json"]
