"""Reading phases from NIfTI files and DICOM series folders, with real DICOM files from pydicom."""

import copy
import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from hccfed.client.image_checks import binary_tumour, check_tumour_inside
from hccfed.client.ingest import read_volume
from hccfed.client.prepare import prepare_site
from hccfed.client.qc import PatientQCError
from hccfed.common.site_config import MaskLabels, load_site_config, site_config_to_yaml
from hccfed.simulation.dicom_export import export_site_dicom


def mr_series(folder: Path, n: int = 6, step: float = 5.0, skip=(), prefix: str = "im") -> Path:
    """A DICOM series made of pydicom's real MR_small.dcm: slice k at k * step mm along the normal,
    its pixels + 100 k; file names deliberately out of position order."""
    base = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    folder.mkdir(parents=True, exist_ok=True)
    uid = generate_uid()
    iop = np.array(base.ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    origin = np.array(base.ImagePositionPatient, float)
    for k in range(n):
        if k in skip:
            continue
        ds = copy.deepcopy(base)
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImagePositionPatient = [float(v) for v in origin + k * step * normal]
        ds.InstanceNumber = n - k  # misleading on purpose: order comes from the position
        ds.SliceThickness = step
        ds.PixelData = (base.pixel_array.astype(np.int16) + 100 * k).tobytes()
        ds.save_as(folder / f"{prefix}{(n - k) * 7 % 11:02d}_{k}.dcm")
    return folder


def _reason(call) -> PatientQCError:
    with pytest.raises(PatientQCError) as err:
        call()
    return err.value


def test_dicom_series_is_ordered_by_position_and_keeps_geometry(tmp_path):
    folder = mr_series(tmp_path / "pre")
    (folder / "README.txt").write_text("exported by the PACS\n")  # not DICOM: ignored, with a warning
    image, warnings = read_volume(folder, "image_pre")
    base = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    assert image.GetSize() == (64, 64, 6)
    assert image.GetSpacing() == pytest.approx((0.3125, 0.3125, 5.0))
    assert image.GetOrigin() == pytest.approx([float(v) for v in base.ImagePositionPatient], abs=1e-3)
    assert image.GetDirection() == pytest.approx(np.eye(3).ravel())
    means = sitk.GetArrayFromImage(image).reshape(6, -1).mean(axis=1)
    assert np.allclose(np.diff(means), 100.0)  # slices in position order, not file-name order
    assert len(warnings) == 1 and "README.txt" in warnings[0]


SYNTAXES = ["MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm", "MR_small_RLE.dcm",
            "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_padded.dcm"]


def test_pydicom_transfer_syntaxes_read_as_the_same_volume(tmp_path):
    """pydicom's MR_small in implicit VR, big endian, RLE, JPEG 2000, JPEG-LS (and deflate, re-encoded here):
    a series of each gives the explicit little-endian series' volume exactly."""
    baseline = sitk.GetArrayFromImage(read_volume(syntax_series(tmp_path / "base", "MR_small.dcm"), "x")[0])
    for name in SYNTAXES + ["deflate"]:
        folder = syntax_series(tmp_path / name, name)
        if name != "deflate":
            assert pydicom.dcmread(next(folder.iterdir())).file_meta.TransferSyntaxUID == \
                pydicom.dcmread(get_testdata_file(name)).file_meta.TransferSyntaxUID
        image, notes = read_volume(folder, "image_pre")
        assert np.array_equal(sitk.GetArrayFromImage(image), baseline), name
        assert image.GetSize() == (64, 64, 4) and notes == []


def syntax_series(folder: Path, name: str, n: int = 4) -> Path:
    """n copies of one of pydicom's files at 5 mm steps; pixels untouched (still in the file's transfer syntax)."""
    base = pydicom.dcmread(get_testdata_file("MR_small.dcm" if name == "deflate" else name))
    if name == "deflate":
        base.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    folder.mkdir(parents=True)
    uid = generate_uid()
    for k in range(n):
        ds = copy.deepcopy(base)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = uid, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImagePositionPatient = [0.0, 0.0, 5.0 * k]
        ds.save_as(folder / f"s{k}.dcm", enforce_file_format=True)
    return folder


def test_per_slice_rescaling_is_applied_exactly(tmp_path):
    """Slices with their own RescaleSlope / Intercept (as some scanners write): ITK alone would cast every
    slice to the first slice's integer type and lose the fractions."""
    folder = mr_series(tmp_path / "pre", n=4)
    files = sorted(folder.glob("*.dcm"), key=lambda f: int(f.stem.split("_")[-1]))
    rescale = [(1.0, 0.0), (1.0, 10.0), (2.5, 0.0), (0.5, -3.0)]
    for file, (slope, intercept) in zip(files, rescale):
        ds = pydicom.dcmread(file)
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.save_as(file)
    volume = sitk.GetArrayFromImage(read_volume(folder, "image_pre")[0])
    stored = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array.astype(float)
    for k, (slope, intercept) in enumerate(rescale):
        assert np.array_equal(volume[k], (stored + 100 * k) * slope + intercept), k


def test_dicomdir_and_structured_report_are_skipped_with_a_note(tmp_path):
    folder = mr_series(tmp_path / "pre")
    shutil.copy(get_testdata_file("test-SR.dcm"), folder / "sr.dcm")
    shutil.copy(Path(get_testdata_file("MR_small.dcm")).parent / "dicomdirtests" / "DICOMDIR", folder / "DICOMDIR")
    image, notes = read_volume(folder, "image_pre")
    assert image.GetSize() == (64, 64, 6)
    assert len(notes) == 1 and "DICOMDIR" in notes[0] and "sr.dcm" in notes[0] and "not image slices" in notes[0]


def test_missing_slice_is_reported_with_the_files_around_it(tmp_path):
    folder = mr_series(tmp_path / "arterial", skip=(3,))
    err = _reason(lambda: read_volume(folder, "image_arterial"))
    assert err.reason == "dicom_series" and err.field == "image_arterial"
    assert "missing slice" in str(err) and "_2.dcm" in str(err) and "_4.dcm" in str(err)


def test_truncated_dicom_files_are_named(tmp_path):
    real = mr_series(tmp_path / "real")
    shutil.copy(get_testdata_file("MR_truncated.dcm"), real / "MR_truncated.dcm")  # pydicom's truncated file
    err = _reason(lambda: read_volume(real, "image_portal"))
    assert err.reason == "unreadable_image" and err.file.endswith("MR_truncated.dcm")
    cut = mr_series(tmp_path / "cut")
    victim = sorted(cut.glob("*.dcm"))[2]
    victim.write_bytes(victim.read_bytes()[:5000])  # a copy interrupted half-way through the pixels
    err = _reason(lambda: read_volume(cut, "image_portal"))
    assert err.reason == "unreadable_image" and err.file == str(victim) and "re-export" in str(err)


def test_folder_with_two_series_lists_them(tmp_path):
    folder = mr_series(tmp_path / "mixed")
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "ct.dcm")
    err = _reason(lambda: read_volume(folder, "image_delayed"))
    assert err.reason == "dicom_series" and "holds 2 DICOM series" in str(err) and "own folder" in str(err)


def test_missing_empty_and_truncated_files(tmp_path):
    assert _reason(lambda: read_volume(tmp_path / "nothing.nii.gz", "mask")).reason == "missing_file"
    (tmp_path / "empty_dir").mkdir()
    assert _reason(lambda: read_volume(tmp_path / "empty_dir", "image_pre")).reason == "dicom_series"
    image = sitk.GetImageFromArray(np.arange(8 * 9 * 10, dtype=np.int16).reshape(8, 9, 10))
    path = tmp_path / "v.nii.gz"
    sitk.WriteImage(image, str(path), True)
    assert sitk.GetArrayFromImage(read_volume(path, "image_pre")[0]).sum() == sitk.GetArrayFromImage(image).sum()
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # ITK alone would read zeros silently
    err = _reason(lambda: read_volume(path, "image_pre"))
    assert err.reason == "unreadable_image" and "truncated" in str(err)
    text = tmp_path / "notes.nii"
    text.write_text("not an image")
    assert _reason(lambda: read_volume(text, "image_pre")).reason == "unreadable_image"


def test_mask_geometry_checks():
    image = sitk.Image([20, 20, 10], sitk.sitkInt16)
    image.SetSpacing([2.0, 2.0, 4.0])
    mask = sitk.Image([20, 20, 10], sitk.sitkUInt8)
    mask.CopyInformation(image)
    labels = MaskLabels()
    assert _reason(lambda: binary_tumour(mask, labels, "mask", "m.nii.gz")).reason == "empty_mask"
    mask[10, 10, 5] = 1
    binary = binary_tumour(mask, labels, "mask", "m.nii.gz")
    assert check_tumour_inside(binary, image, "image_pre", "pre.nii.gz", "m.nii.gz") is None
    finer = sitk.Resample(binary, [40, 40, 20], sitk.Transform(), sitk.sitkNearestNeighbor, image.GetOrigin(),
                          [1.0, 1.0, 2.0], image.GetDirection())
    assert check_tumour_inside(finer, image, "image_pre", "pre.nii.gz", "m.nii.gz") is None  # another grid: fine
    binary.SetOrigin([500.0, 0.0, 0.0])  # e.g. another patient's mask, or a lost origin
    err = _reason(lambda: check_tumour_inside(binary, image, "image_pre", "pre.nii.gz", "m.nii.gz"))
    assert err.reason == "mask_outside_image" and "pre.nii.gz" in str(err) and "m.nii.gz" in str(err)


def test_dicom_and_nifti_forms_prepare_the_same(tiny_cohort, tmp_path):
    config = load_site_config(tiny_cohort[1][1])
    nifti = tmp_path / "nifti"
    shutil.copytree(config.data_root, nifti)
    table = (nifti / "manifest.csv").read_text().splitlines()
    (nifti / "manifest.csv").write_text("\n".join(table[:4]) + "\n")  # 3 patients keep the test fast
    dicom = tmp_path / "dicom"
    export_site_dicom(nifti, dicom)
    series = dicom / "dicom" / "B0001" / "arterial"
    first = pydicom.dcmread(sorted(series.glob("*.dcm"))[0])
    assert first.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4" and first.Modality == "MR"
    assert [float(v) for v in first.PixelSpacing] == pytest.approx(list(config_spacing(nifti)[1::-1]))
    sites = []
    for root in (nifti, dicom):
        site_config = dataclasses.replace(config, data_root=root, manifest=root / "manifest.csv",
                                          cache_dir=tmp_path / f"cache-{root.name}")
        yaml_path = tmp_path / f"{root.name}.yaml"
        yaml_path.write_text(site_config_to_yaml(site_config))
        sites.append(prepare_site(load_site_config(yaml_path), workers=1, progress=False))
    a, b = sites
    assert list(a.patient_ids) == list(b.patient_ids) == ["B0001", "B0002", "B0003"]
    difference = np.abs(a.images.astype(np.float32) - b.images.astype(np.float32))
    assert difference.mean() < 1e-3 and np.quantile(difference, 0.999) < 0.01 and difference.max() < 0.5
    assert np.array_equal(a.clinical, b.clinical) and np.array_equal(a.times, b.times)


def config_spacing(site_root: Path) -> tuple[float, ...]:
    return sitk.ReadImage(str(site_root / "images" / "B0001_arterial.nii.gz")).GetSpacing()


def test_cli_synth_dicom_then_prepare(tiny_site_profiles, tmp_path, monkeypatch, capsys):
    import hccfed_cli
    import hccfed.simulation.cohort as cohort

    real = cohort.synthesize_cohort
    two_patients = (dataclasses.replace(tiny_site_profiles[2], n_patients=2),)
    monkeypatch.setattr(cohort, "synthesize_cohort", lambda out, **kw: real(
        out, **{**kw, "sites": two_patients, "fov_mm": (160.0, 160.0, 100.0)}))
    out = tmp_path / "synthetic"
    assert hccfed_cli.main(["synth", "--out", str(out), "--dicom", "--workers", "1"]) == 0
    site_dir = out / "hospital_c"
    manifest = (site_dir / "manifest.csv").read_text()
    assert "dicom/C0001/arterial" in manifest and not list((site_dir / "images").glob("*.nii.gz"))
    config = load_site_config(two_patients[0].config_path)
    config = dataclasses.replace(config, data_root=site_dir, manifest=site_dir / "manifest.csv",
                                 cache_dir=tmp_path / "cache")
    yaml_path = tmp_path / "hospital_c.yaml"
    yaml_path.write_text(site_config_to_yaml(config))
    capsys.readouterr()
    assert hccfed_cli.main(["prepare", "--site", str(yaml_path), "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "2 patient(s) prepared, 0 excluded" in printed and "qc_report.csv" in printed
    assert (tmp_path / "cache" / "qc_report.json").exists() and not list(site_dir.glob("qc_report*"))
