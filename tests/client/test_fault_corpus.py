"""The fault corpus: one site of ~100 tiny patients, each damaged by one fault kind (tests/fault_kinds.py).

`hccfed validate` and `prepare_site` must put every damaged patient in the QC report with the fault's own
reason (and no other exclusion reason), keep every valid variant, prepare every other patient, never
raise, and leave the data folder byte-identical. Real DICOM from ``pydicom.data`` is used throughout:
a truncated MR file, a DICOMDIR, a structured report, an RT dose object, a CT series and a colour image.
"""

import dataclasses

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

import hccfed_cli
from fault_corpus import Corpus, corpus_site, read, tree_digest
from fault_kinds import PATIENT_FAULTS, accepted_variants, dicom_faults, registration_fault, valid_dicom
from hccfed.client.ingest import read_volume
from hccfed.client.prepare import prepare_site
from hccfed.client.site_validation import validate_site
from hccfed.common.site_config import Preprocessing
from hccfed.simulation.dicom_export import write_dicom_series

N_PATIENTS = 112


@pytest.fixture(scope="module")
def corpus(tiny_cohort, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("corpus")
    config = corpus_site(tiny_cohort[1][2], tmp, N_PATIENTS)
    c = Corpus(config, tmp / "outside")
    for fault in PATIENT_FAULTS:
        fault(c)
    registration_fault(c)
    accepted = {**c.accepted, **accepted_variants(c)}
    valid = accepted["portal phase as DICOM: mixed transfer syntaxes, DICOMDIR, SR, RT dose, README"] = c.take()
    series = tmp / "series"  # the module's one DICOM export: the valid patient's portal phase
    write_dicom_series(read(c.path(valid, "image_portal")), series, valid, "portal phase", "1.2.826.0.1.1",
                       "1.2.826.0.1.1.1", 3)
    dicom_faults(c, series)
    valid_dicom(c, valid, series)
    c.write()
    assert len(c.clean) >= 5, "the corpus needs a few untouched patients"
    return c, accepted


def test_the_corpus_has_at_least_60_fault_kinds(corpus):
    c, _ = corpus
    assert len(c.kinds) >= 60, len(c.kinds)
    assert len(set(c.kinds.values())) >= 25  # and most reason codes


def _check_report(c: Corpus, accepted: dict[str, str], report, registration: bool) -> None:
    lines = c.config.manifest.read_text().splitlines()
    described = {pid: [i.describe() for i in report.issues if i.patient_id == pid] for pid in c.expected}
    for key, reasons in c.expected.items():
        if not registration:
            reasons = reasons - {"registration_failed"}
        got = set(report.reasons(key))
        assert got == reasons, (key, reasons, described[key])
        for issue in (i for i in report.issues if i.patient_id == key and i.severity == "excluded"):
            assert issue.field and issue.field in issue.message and issue.file, issue
            assert f"patient {key}" in issue.message or key.startswith("row"), issue
            if issue.row is not None:  # the row named is the patient's line of the file
                assert f"row {issue.row}" in issue.message and str(c.config.manifest) in issue.message
                assert key.startswith("row") or key in lines[issue.row - 1], (issue, lines[issue.row - 1])
    kept = set(accepted.values()) | set(c.clean)
    if not registration:
        kept |= {p for p, r in c.expected.items() if r == {"registration_failed"}}
    assert set(report.prepared) == kept, sorted(kept ^ set(report.prepared))
    assert not set(report.excluded) & kept


def test_validate_puts_every_fault_in_its_reason(corpus, capsys):
    c, accepted = corpus
    before = tree_digest(c.root)
    report = validate_site(c.config, workers=2)
    _check_report(c, accepted, report, registration=False)
    notes = {i.reason for i in report.issues if i.patient_id == accepted[next(k for k in accepted if "DICOM" in k)]}
    assert notes == {"ignored_file"}  # the DICOMDIR, SR, RT dose and README skipped with a note, not excluded
    cut = [i for i in report.issues if i.patient_id == accepted["mask cropped through the tumour (tumour_cut)"]]
    assert [i.reason for i in cut] == ["tumour_cut"] and cut[0].severity == "warning"
    capsys.readouterr()
    assert hccfed_cli.main(["validate", "--site", str(c.config.source), "--workers", "2"]) == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    for reason in set(c.kinds.values()) - {"registration_failed"}:
        assert reason in out
    assert tree_digest(c.root) == before


def test_prepare_excludes_the_faulty_and_prepares_the_rest(corpus):
    c, accepted = corpus
    before = tree_digest(c.root)
    config = dataclasses.replace(c.config, preprocessing=Preprocessing(crop_voxels=16))
    site = prepare_site(config, workers=2, progress=False)
    _check_report(c, accepted, site.qc, registration=True)
    assert list(site.patient_ids) == site.qc.prepared and np.isfinite(site.images.astype(np.float32)).all()
    assert np.isfinite(site.clinical).all()
    moved = accepted["albumin in g/dL on its row (converted)"]
    albumin = site.clinical[list(site.patient_ids).index(moved), site.clinical_names.index("albumin_rel")]
    limits = config.labs["albumin"]
    grams_per_litre = float(c.table.loc[c.table["patient_id"] == moved, "albumin"].iloc[0]) * 10.0
    assert albumin == pytest.approx((grams_per_litre - limits.lower) / (limits.upper - limits.lower) - 0.5, abs=1e-5)
    assert tree_digest(c.root) == before


def test_the_valid_dicom_series_reads_as_its_nifti(corpus):
    """Slices in five transfer syntaxes (explicit / implicit VR, big endian, RLE, deflate) beside a DICOMDIR,
    an SR, an RT dose and a README give exactly the volume they were exported from."""
    c, accepted = corpus
    pid = accepted[next(k for k in accepted if "DICOM" in k)]
    folder = c.root / "dicom" / pid / "portal"
    syntaxes = {pydicom.dcmread(f).file_meta.TransferSyntaxUID for f in folder.glob("slice_*.dcm")}
    assert len(syntaxes) == 5, syntaxes
    image, notes = read_volume(folder, "image_portal")
    nifti = read(c.root / "images" / f"{pid}_portal.nii.gz")
    assert np.array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(nifti))
    assert np.allclose(image.GetSpacing(), nifti.GetSpacing()) and np.allclose(image.GetOrigin(), nifti.GetOrigin())
    assert len(notes) == 2 and "DICOMDIR" in notes[0] and "report_sr.dcm" in notes[0] and "dose.dcm" in notes[0]
    assert "README.txt" in notes[1]
