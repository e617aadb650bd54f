"""The patient-level fault kinds of the corpus: each damages its own patient(s) of a ``fault_corpus.Corpus``.

Each function takes patients with ``corpus.take()``, damages their manifest cells or files (private copies
only) and declares the reason each must end in with ``corpus.expect(kind, reason, patients...)``. Kinds
that must be *accepted* (a valid variant: another known unit, a valid DICOM series with a DICOMDIR and a
structured report beside it, a tumour touching the edge) declare no exclusion and are checked separately.
"""

from __future__ import annotations

import gzip
import os
import warnings

import numpy as np
import pydicom
import SimpleITK as sitk

from fault_corpus import (CUT_FIELD, EXTRA_FIELD, Corpus, as_transfer_syntax, copy_pydicom_file, edit_series, read,
                          pydicom_dicomdir, write_like)

CELL_FAULTS = [  # (kind, column, value, reason)
    ("age not a number", "age", "sixty", "invalid_value"),
    ("age 999", "age", "999", "implausible_value"),
    ("age negative", "age", "-5", "implausible_value"),
    ("age NA token", "age", "NA", "missing_value"),
    ("age with unit text", "age", "61 years", "invalid_value"),
    ("diameter negative", "tumour_diameter_mm", "-30", "implausible_value"),
    ("diameter 1e400", "tumour_diameter_mm", "1e400", "invalid_value"),
    ("tumour number fractional", "tumour_number", "2.5", "invalid_value"),
    ("tumour number zero", "tumour_number", "0", "implausible_value"),
    ("time inf", "time_months", "inf", "invalid_value"),
    ("time negative", "time_months", "-3", "implausible_value"),
    ("time zero", "time_months", "0", "implausible_value"),
    ("time empty", "time_months", "", "missing_outcome"),
    ("event inf", "event", "inf", "invalid_value"),
    ("event 2", "event", "2", "implausible_value"),
    ("event yes", "event", "yes", "invalid_value"),
    ("event empty", "event", "", "missing_outcome"),
    ("sex unknown", "sex", "X", "invalid_value"),
    ("child-pugh D", "child_pugh", "D", "invalid_value"),
    ("hepatitis unknown", "hepatitis", "HDV", "invalid_value"),
    ("lab decimal comma", "albumin", "4,2", "invalid_value"),
    ("lab nan", "ast", "nan", "missing_value"),
    ("lab empty", "alt", "", "missing_value"),
    ("lab 0x hex", "ggt", "0x1f", "invalid_value"),
    ("lab typed in another unit", "albumin", "4200", "lab_out_of_range"),
    ("lab negative", "ast", "-4", "lab_out_of_range"),
    ("id with a control character", "patient_id", "P\x07BEL", "invalid_value"),
    ("id too long", "patient_id", "P" * 80, "invalid_value"),
    ("phase path empty", "image_pre", "", "missing_value"),
    ("phase file missing", "image_arterial", "images/nobody_arterial.nii.gz", "missing_file"),
    ("windows path", "image_portal", "images\\P000_portal.nii.gz", "missing_file"),
    ("path leaves data_root with ..", "image_delayed", "../../outside/stolen.nii.gz", "path_outside_root"),
]


def cell_fault(kind: str, column: str, value: str, reason: str):
    def apply(c: Corpus) -> None:
        pid = c.take()
        c.set(pid, column, value)
        c.expect(kind, reason, pid if column != "patient_id" else f"row {c.row(value) + 2}")
    apply.__name__ = kind
    return apply


def unknown_unit(c: Corpus) -> None:
    pid = c.take()
    c.table["albumin_unit"] = c.table.get("albumin_unit", "")
    c.set(pid, "albumin_unit", "mmol/L")
    c.expect("unknown per-patient unit", "unknown_unit", pid)


def empty_id(c: Corpus) -> None:
    pid = c.take()
    c.set(pid, "patient_id", "")
    c.expect("empty patient id", "missing_value", f"row {c.row('') + 2}")


def duplicate_ids(c: Corpus) -> None:
    for kind, spelling in (("same id twice", "{}"), ("id with a trailing space", "{} "), ("id in lower case", "{}")):
        first, second = c.take(), c.take()
        written = spelling.format(first.lower() if "lower" in kind else first)
        c.set(second, "patient_id", written)
        c.expect(kind, "duplicate_patient", first, written.strip())


def extra_and_missing_fields(c: Corpus) -> None:
    pid = c.take()
    c.set(pid, "age", EXTRA_FIELD)  # "1,2": a value with an unquoted comma
    c.expect("row with an extra field", "invalid_row", pid)
    pid = c.take()
    c.set(pid, "mask", CUT_FIELD)  # the row ends one field early
    c.expect("row with a field missing", "invalid_row", pid)


def paths_leaving_the_root(c: Corpus) -> None:
    pid = c.take()
    outside = c.outside / f"{pid}_pre.nii.gz"
    os.replace(c.path(pid, "image_pre"), outside)
    c.set(pid, "image_pre", str(outside))
    c.expect("absolute path outside data_root", "path_outside_root", pid)
    pid = c.take()
    target = c.outside / f"{pid}_portal.nii.gz"
    os.replace(c.path(pid, "image_portal"), target)
    link = c.root / "images" / f"{pid}_portal_link.nii.gz"
    link.symlink_to(target)
    c.set(pid, "image_portal", f"images/{link.name}")
    c.expect("symlink leading out of data_root", "path_outside_root", pid)


def shared_files(c: Corpus) -> None:
    first, second = c.take(), c.take()
    for column in ("image_pre", "image_arterial", "image_portal", "image_delayed", "mask"):
        c.set(second, column, c.get(first, column))
    c.expect("second id pointing at the same images", "duplicate_image", first, second)
    first, second = c.take(), c.take()
    c.path(second, "image_arterial").unlink()
    c.path(second, "image_arterial").write_bytes(c.path(first, "image_arterial").read_bytes())
    c.expect("a copied image file in another patient", "duplicate_image", first, second)
    first, second = c.take(), c.take()
    c.path(second, "image_delayed").unlink()
    os.link(c.path(first, "image_delayed"), c.path(second, "image_delayed"))
    c.expect("a hard link to another patient's file", "duplicate_image", first, second)
    pid = c.take()
    c.set(pid, "image_delayed", c.get(pid, "image_portal"))
    c.expect("one file for two phases", "duplicate_image", pid)


def _phase_array(c: Corpus, pid: str, column: str):
    image = read(c.path(pid, column))
    return sitk.GetArrayFromImage(image), image


def broken_phase_files(c: Corpus) -> None:
    pid = c.take()
    path = c.path(pid, "image_pre")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    c.expect("truncated NIfTI", "unreadable_image", pid)
    pid = c.take()
    c.path(pid, "image_pre").write_text("patient notes, not an image\n")
    c.expect("text file named .nii.gz", "unreadable_image", pid)
    for kind, value in (("NaN voxels", np.nan), ("infinite voxels", np.inf)):
        pid = c.take()
        array, image = _phase_array(c, pid, "image_portal")
        array = array.astype(np.float32)
        array[5, 10:14, 10:14] = value
        write_like(array, image, c.path(pid, "image_portal"))
        c.expect(kind, "non_finite_voxels", pid)
    pid = c.take()
    array, image = _phase_array(c, pid, "image_arterial")
    write_like(np.full_like(array, 7), image, c.path(pid, "image_arterial"))
    c.expect("blank phase", "blank_image", pid)
    pid = c.take()
    mask = read(c.path(pid, "mask"))
    sitk.WriteImage(mask, str(c.path(pid, "image_delayed")), True)
    c.expect("the mask given as a phase", "blank_image", pid)
    pid = c.take()
    array, image = _phase_array(c, pid, "image_pre")
    huge = array.astype(np.float32)
    huge[3, 3, 3] = 3e30
    write_like(huge, image, c.path(pid, "image_pre"))
    c.expect("a voxel of 3e30", "implausible_intensity", pid)
    for kind, offset, value, reason in (("NIfTI data offset shifted", 108, 356.0, "unreadable_image"),
                                        ("NIfTI with an invalid qform_code", 252, 240, "image_geometry")):
        pid = c.take()
        raw = bytearray(gzip.decompress(c.path(pid, "image_pre").read_bytes()))
        raw[offset:offset + (4 if isinstance(value, float) else 2)] = (
            np.float32(value).tobytes() if isinstance(value, float) else np.int16(value).tobytes())
        c.path(pid, "image_pre").write_bytes(gzip.compress(bytes(raw)))
        c.expect(kind, reason, pid)
    pid = c.take()
    c.path(pid, "image_arterial").write_bytes(gzip.decompress(c.path(pid, "image_arterial").read_bytes()))
    c.accept("an uncompressed NIfTI named .nii.gz", pid)


def phase_geometry(c: Corpus) -> None:
    pid = c.take()
    array, image = _phase_array(c, pid, "image_pre")
    flat = sitk.GetImageFromArray(array[array.shape[0] // 2])
    sitk.WriteImage(flat, str(c.path(pid, "image_pre")), True)
    c.expect("2-D image as a phase", "image_geometry", pid)
    pid = c.take()
    array, _ = _phase_array(c, pid, "image_pre")
    import nibabel

    nibabel.save(nibabel.Nifti1Image(np.stack([array.T] * 3, axis=-1), np.eye(4)), str(c.path(pid, "image_pre")))
    c.expect("4-D image with 3 time points", "image_geometry", pid)
    pid = c.take()
    array, _ = _phase_array(c, pid, "image_arterial")
    nibabel.save(nibabel.Nifti1Image(array.T, None), str(c.path(pid, "image_arterial")))  # codes 0: no geometry
    c.expect("NIfTI without qform or sform", "image_geometry", pid)
    pid = c.take()
    array, image = _phase_array(c, pid, "image_portal")
    rgb = sitk.GetImageFromArray(np.stack([array] * 3, axis=-1), isVector=True)
    rgb.CopyInformation(image)
    sitk.WriteImage(rgb, str(c.path(pid, "image_portal")), True)
    c.expect("colour (vector) image", "image_geometry", pid)
    pid = c.take()
    image = read(c.path(pid, "image_delayed"))
    image.SetSpacing([0.001, 0.001, 0.001])
    sitk.WriteImage(image, str(c.path(pid, "image_delayed")), True)
    c.expect("absurd voxel spacing", "image_geometry", pid)


def mask_faults(c: Corpus) -> None:
    def mask_of(pid):
        mask = read(c.path(pid, "mask"))
        return sitk.GetArrayFromImage(mask), mask

    pid = c.take()
    array, mask = mask_of(pid)
    write_like(np.zeros_like(array), mask, c.path(pid, "mask"))
    c.expect("empty mask", "empty_mask", pid)
    pid = c.take()
    array, mask = mask_of(pid)
    liver = np.zeros_like(array)
    liver[4:-4, 8:-8, 8:-8] = 1
    liver[array > 0] = 2
    write_like(liver, mask, c.path(pid, "mask"))
    c.expect("LiTS-style label map (liver 1, tumour 2)", "mask_labels", pid)
    pid = c.take()
    array, mask = mask_of(pid)
    soft = np.clip(array.astype(np.float32) * 0.8 + 0.1 * (array == 0), 0, 1)
    write_like(soft, mask, c.path(pid, "mask"))
    c.expect("soft probability mask", "mask_labels", pid)
    pid = c.take()
    sitk.WriteImage(read(c.path(pid, "image_portal")), str(c.path(pid, "mask")), True)
    c.expect("the image given as the mask", "mask_labels", pid)
    pid = c.take()
    array, mask = mask_of(pid)
    write_like(np.where(array > 0, -1, 0).astype(np.int16), mask, c.path(pid, "mask"))
    c.expect("negative mask label", "mask_labels", pid)
    pid = c.take()
    array, mask = mask_of(pid)
    write_like(np.where(array > 0, np.nan, 0).astype(np.float32), mask, c.path(pid, "mask"))
    c.expect("NaN in the mask", "non_finite_voxels", pid)
    pid = c.take()
    mask = read(c.path(pid, "mask"))
    mask.SetOrigin([o + 1000.0 for o in mask.GetOrigin()])
    sitk.WriteImage(mask, str(c.path(pid, "mask")), True)
    c.expect("mask far from the image", "mask_outside_image", pid)
    pid = c.take()
    mask = read(c.path(pid, "mask"))
    mask.SetOrigin([mask.GetOrigin()[0] + 12.0, *mask.GetOrigin()[1:]])
    sitk.WriteImage(mask, str(c.path(pid, "mask")), True)
    c.expect("mask on the image grid with a shifted origin", "mask_geometry", pid)
    pid = c.take()
    array, mask = mask_of(pid)
    one = np.zeros_like(array)
    one[tuple(np.argwhere(array > 0)[0])] = 1
    write_like(one, mask, c.path(pid, "mask"))
    c.expect("one-voxel tumour", "implausible_mask", pid)
    pid = c.take()
    array, mask = mask_of(pid)
    write_like(np.ones_like(array), mask, c.path(pid, "mask"))
    c.expect("mask covering the whole volume", "implausible_mask", pid)
    pid = c.take()
    path = c.path(pid, "mask")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    c.expect("truncated mask", "unreadable_image", pid)


def accepted_variants(c: Corpus) -> dict[str, str]:
    """Valid data that must be prepared: {kind: patient}."""
    out = {}
    pid = out["albumin in g/dL on its row (converted)"] = c.take()
    c.table["albumin_unit"] = c.table.get("albumin_unit", "")
    c.set(pid, "albumin", f"{float(c.get(pid, 'albumin')) / 10.0:g}")
    c.set(pid, "albumin_unit", "g/dL")
    pid = out["id, sex and hepatitis with spaces and lower case"] = c.take()
    c.set(pid, "sex", c.get(pid, "sex").lower())
    c.set(pid, "hepatitis", f" {c.get(pid, 'hepatitis').upper()}")
    c.set(pid, "patient_id", f"  {pid} ")
    pid = out["mask cropped through the tumour (tumour_cut)"] = c.take()
    mask = read(c.path(pid, "mask"))
    z = np.argwhere(sitk.GetArrayFromImage(mask) > 0)[:, 0]
    cut = int(np.median(z)) + 1
    sitk.WriteImage(mask[:, :, :cut], str(c.path(pid, "mask")), True)
    return out


def registration_fault(c: Corpus) -> None:
    """Only preparation finds it: a phase of noise, not this patient's anatomy."""
    pid = c.take()
    array, image = _phase_array(c, pid, "image_delayed")
    noise = np.random.default_rng(0).normal(400, 80, array.shape).astype(np.int16)
    write_like(noise, image, c.path(pid, "image_delayed"))
    c.expect("phase of another anatomy (prepare only)", "registration_failed", pid)


def dicom_faults(c: Corpus, series) -> None:
    """Damaged copies of one exported DICOM series (``series``: a folder of the valid patient's portal)."""

    def use(kind, reason, change=None, extra=None, column="image_portal"):
        pid = c.take()
        folder = c.root / "dicom" / pid / column
        edit_series(series, folder, change)
        if extra is not None:
            extra(folder)
        c.set(pid, column, f"dicom/{pid}/{column}")
        c.expect(kind, reason, pid)
        return pid, folder

    def at(k, change):
        return lambda i, ds: change(ds) if i == k else None

    use("DICOM missing slice", "dicom_series", extra=lambda f: sorted(f.glob("*.dcm"))[4].unlink())
    use("DICOM slice at a duplicated position", "dicom_series",
        at(3, lambda ds: setattr(ds, "ImagePositionPatient", [float(v) for v in _position(series, 2)])))
    use("DICOM slice with another orientation", "dicom_geometry",
        at(2, lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 0.9950042, 0.0998334])))
    use("DICOM slice with another pixel spacing", "dicom_geometry",
        at(2, lambda ds: setattr(ds, "PixelSpacing", [3.5, 3.5])))
    use("DICOM slice shifted within its plane", "dicom_geometry",
        at(2, lambda ds: setattr(ds, "ImagePositionPatient", [float(ds.ImagePositionPatient[0]) + 9.0,
                                                               *ds.ImagePositionPatient[1:]])))
    use("DICOM uneven slice spacing", "dicom_geometry",
        lambda i, ds: setattr(ds, "ImagePositionPatient", [*ds.ImagePositionPatient[:2],
                                                           float(ds.ImagePositionPatient[2]) + 0.6 * (i >= 5)]))
    use("DICOM slice without PixelSpacing", "dicom_geometry", at(1, lambda ds: delattr(ds, "PixelSpacing")))
    use("DICOM slices of two patients", "patient_mismatch", at(2, lambda ds: setattr(ds, "PatientID", "OTHER")))
    use("DICOM folder with two series", "dicom_series",
        extra=lambda f: copy_pydicom_file("CT_small.dcm", f / "ct.dcm") and copy_pydicom_file(
            "CT_small.dcm", f / "ct2.dcm"))
    use("pydicom's truncated MR file in the folder", "unreadable_image",
        extra=lambda f: copy_pydicom_file("MR_truncated.dcm", f / "zz_truncated.dcm"))
    use("DICOM slice cut short", "unreadable_image",
        extra=lambda f: _cut(sorted(f.glob("*.dcm"))[3], 3000))
    use("DICOM slice cut inside its header", "unreadable_image",
        extra=lambda f: _cut(sorted(f.glob("*.dcm"))[3], 400))
    use("DICOM multi-frame object", "dicom_unsupported", at(0, _two_frames))
    use("pydicom's colour image in the folder", "dicom_unsupported",
        extra=lambda f: copy_pydicom_file("SC_rgb_small_odd.dcm", f / "zz_colour.dcm"))
    use("DICOM series of one slice", "dicom_series",
        extra=lambda f: [p.unlink() for p in sorted(f.glob("*.dcm"))[1:]])
    use("DICOM slices of different sizes", "dicom_geometry", at(1, _crop_slice))
    use("DICOM slice with a corrupt SOP class UID", "unreadable_image",
        at(2, _corrupt_sop_class))
    use("DICOM slice naming an unknown transfer syntax", "unreadable_image",
        extra=lambda f: _unknown_syntax(sorted(f.glob("*.dcm"))[2]))
    use("DICOM slice linked from outside data_root", "path_outside_root",
        extra=lambda f: _link_out(sorted(f.glob("*.dcm"))[3], c.outside))
    pid = c.take()
    (c.root / "dicom" / pid / "empty").mkdir(parents=True)
    c.set(pid, "image_pre", f"dicom/{pid}/empty")
    c.expect("empty DICOM folder", "dicom_series", pid)
    pid = c.take()
    single = c.root / "dicom" / pid / "one.dcm"
    edit_series(series, single.parent / "tmp")
    os.replace(sorted((single.parent / "tmp").glob("*.dcm"))[0], single)
    c.set(pid, "image_pre", f"dicom/{pid}/one.dcm")
    c.expect("a single DICOM slice as the phase", "image_geometry", pid)
    pid, _ = use("DICOM phases of two patients", "patient_mismatch")
    other = c.root / "dicom" / pid / "image_arterial"
    edit_series(series, other, lambda i, ds: setattr(ds, "PatientID", "SOMEONE_ELSE"))
    c.set(pid, "image_arterial", f"dicom/{pid}/image_arterial")


def _position(series, index):
    return pydicom.dcmread(sorted(series.glob("*.dcm"))[index]).ImagePositionPatient


def _link_out(path, outside):
    target = outside / f"{path.parent.parent.name}_{path.name}"
    os.replace(path, target)
    path.symlink_to(target)


def _corrupt_sop_class(ds):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns of the invalid UID it is asked to hold
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4x"


def _unknown_syntax(path):
    """Rewrite the file meta's transfer syntax UID in place, same length (pydicom refuses to write it)."""
    data = path.read_bytes()
    syntax = str(pydicom.dcmread(path).file_meta.TransferSyntaxUID).encode()
    at = data.index(syntax, 132)
    path.write_bytes(data[:at] + syntax.replace(b"10008", b"99999", 1) + data[at + len(syntax):])


def _cut(path, size):
    path.write_bytes(path.read_bytes()[:size])


def _two_frames(ds):
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2


def _crop_slice(ds):
    pixels = ds.pixel_array[:-2, :]
    ds.Rows = pixels.shape[0]
    ds.PixelData = pixels.tobytes()


def valid_dicom(c: Corpus, pid: str, series) -> None:
    """The valid patient's portal as DICOM in mixed transfer syntaxes, with a DICOMDIR, an SR and a README."""
    syntaxes = ["explicit", "implicit", "big", "rle", "deflate"]
    folder = c.root / "dicom" / pid / "portal"
    edit_series(series, folder, lambda i, ds: as_transfer_syntax(ds, syntaxes[i % len(syntaxes)]))
    copy_pydicom_file("test-SR.dcm", folder / "report_sr.dcm")
    copy_pydicom_file("rtdose.dcm", folder / "dose.dcm")
    (folder / "DICOMDIR").write_bytes(pydicom_dicomdir().read_bytes())
    (folder / "README.txt").write_text("exported by the PACS\n")
    c.set(pid, "image_portal", f"dicom/{pid}/portal")


PATIENT_FAULTS = [cell_fault(*f) for f in CELL_FAULTS] + [
    unknown_unit, empty_id, duplicate_ids, extra_and_missing_fields, paths_leaving_the_root, shared_files,
    broken_phase_files, phase_geometry, mask_faults]
