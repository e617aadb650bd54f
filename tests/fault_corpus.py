"""Builders of the fault corpus: a private site of many tiny patients, damaged one fault per patient.

``corpus_site`` clones the tiny hospital_c into ``n`` patients with distinct voxels (patient k is patient
``k % 9`` of hospital_c with every phase voxel + ``k // 9`` and its ``k // 9``-th tumour voxel removed), so
no two patients share content unless a fault makes them. ``Corpus`` gives each fault its own patients and
records the reason it must end in; ``Corpus.write`` writes the manifest (with the row-level damage the
CSV writer cannot produce). Everything is written under the test's tmp_path, never in the shared cohort.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import SimpleITK as sitk

from hccfed.common.schema import PHASES
from hccfed.common.site_config import SiteConfig, load_site_config, site_config_to_yaml

#: Cell markers replaced in the written CSV text: an extra unquoted field, or the row's last field removed.
EXTRA_FIELD, CUT_FIELD = "__EXTRA_FIELD__", "__CUT_FIELD__"


def tree_digest(root: Path) -> dict[str, str]:
    """Every file's and link's content hash and modification time (the data folder must not change)."""
    out = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            out[key] = f"link->{path.readlink()}"
        elif path.is_file():
            out[key] = hashlib.sha256(path.read_bytes()).hexdigest() + f"|{path.stat().st_mtime_ns}"
        else:
            out[key] = "dir"
    return out


def write_yaml(config: SiteConfig, path: Path) -> SiteConfig:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(site_config_to_yaml(config))
    return load_site_config(path)


def corpus_site(source_yaml: Path, tmp_path: Path, n: int) -> SiteConfig:
    """A private site of ``n`` distinct tiny patients P000... cloned from ``source_yaml``'s site."""
    source = load_site_config(source_yaml)
    table = pd.read_csv(source.manifest, dtype=str, keep_default_na=False)
    root = tmp_path / "data" / "corpus"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = []
    for k in range(n):
        row = table.iloc[k % len(table)].copy()
        offset = k // len(table)
        pid = row["patient_id"] = f"P{k:03d}"
        for phase in PHASES:
            image = sitk.ReadImage(str(source.data_root / row[f"image_{phase}"]))
            target = f"images/{pid}_{phase}.nii.gz"
            sitk.WriteImage(image + offset, str(root / target), True)
            row[f"image_{phase}"] = target
        mask = sitk.ReadImage(str(source.data_root / row["mask"]))
        if offset:
            array = sitk.GetArrayFromImage(mask)
            z, y, x = np.argwhere(array > 0)[offset]
            mask[int(x), int(y), int(z)] = 0
        row["mask"] = f"masks/{pid}_tumour.nii.gz"
        sitk.WriteImage(mask, str(root / row["mask"]), True)
        rows.append(row)
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    config = dataclasses.replace(source, site_id="corpus", data_root=root, manifest=root / "manifest.csv",
                                 cache_dir=tmp_path / "cache")
    return write_yaml(config, tmp_path / "corpus.yaml")


class Corpus:
    """The corpus site's manifest being damaged: patients handed out one fault at a time."""

    def __init__(self, config: SiteConfig, outside: Path):
        self.config = config
        self.root = config.data_root
        self.outside = outside  # a folder beside the data folder, for paths that leave it
        self.outside.mkdir(parents=True, exist_ok=True)
        self.table = pd.read_csv(config.manifest, dtype=str, keep_default_na=False)
        self.free = list(self.table["patient_id"])
        self.expected: dict[str, set[str]] = {}  # patient (or "row N") -> the reason(s) it must end in
        self.kinds: dict[str, str] = {}  # fault kind -> its reason
        self.accepted: dict[str, str] = {}  # valid variant -> its patient (who must be prepared)

    def take(self) -> str:
        return self.free.pop(0)

    def row(self, pid: str) -> int:
        return int(self.table.index[self.table["patient_id"] == pid][0])

    def set(self, pid: str, column: str, value: str) -> None:
        self.table.at[self.row(pid), column] = value

    def get(self, pid: str, column: str) -> str:
        return self.table.at[self.row(pid), column]

    def path(self, pid: str, column: str) -> Path:
        return self.root / self.get(pid, column)

    def expect(self, kind: str, reason: str, *keys: str) -> None:
        self.kinds[kind] = reason
        for key in keys:
            self.expected.setdefault(key, set()).add(reason)

    def accept(self, kind: str, pid: str) -> None:
        """A valid variant: ``pid`` must be prepared."""
        self.accepted[kind] = pid

    def write(self) -> None:
        text = self.table.to_csv(index=False)
        text = text.replace(EXTRA_FIELD, "1,2").replace("," + CUT_FIELD, "")
        self.config.manifest.write_text(text)

    @property
    def clean(self) -> list[str]:
        return [p for p in self.table["patient_id"] if p in self.free]


# ----------------------------------------------------------------------------- volumes


def read(path: Path) -> sitk.Image:
    return sitk.ReadImage(str(path))


def write_like(array: np.ndarray, like: sitk.Image, path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(like)
    sitk.WriteImage(image, str(path), True)


# ----------------------------------------------------------------------------- DICOM


def edit_series(source: Path, target: Path, change=None) -> list[Path]:
    """Copy a DICOM series folder, applying ``change(index, dataset)`` to each slice (in file order)."""
    target.mkdir(parents=True, exist_ok=True)
    files = sorted(source.glob("*.dcm"))
    out = []
    for index, file in enumerate(files):
        ds = pydicom.dcmread(file)
        if change is not None:
            ds = change(index, ds) or ds
        path = target / file.name
        big = ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRBigEndian
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a fault may write an invalid value on purpose
            if big:  # pydicom converts to big endian only when forced, and then writes the dataset as given
                ds.preamble = ds.preamble or b"\0" * 128
                pydicom.dcmwrite(path, ds, implicit_vr=False, little_endian=False, force_encoding=True)
            else:
                ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


def as_transfer_syntax(ds: pydicom.Dataset, syntax: str) -> pydicom.Dataset:
    """The same slice stored in another transfer syntax (pixels unchanged)."""
    from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                             ImplicitVRLittleEndian, RLELossless)

    ds = copy.deepcopy(ds)
    if syntax == "explicit":
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    elif syntax == "rle":
        ds.compress(RLELossless)
    elif syntax == "implicit":
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    elif syntax == "deflate":
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    elif syntax == "big":
        pixels = ds.pixel_array
        ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
        ds.PixelData = pixels.astype(pixels.dtype.newbyteorder(">")).tobytes()
    return ds


def copy_pydicom_file(name: str, target: Path) -> Path:
    """One of the files pydicom ships (``pydicom.data``), copied to ``target``."""
    from pydicom.data import get_testdata_file

    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(get_testdata_file(name), target)
    return target


def pydicom_dicomdir() -> Path:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("MR_small.dcm")).parent / "dicomdirtests" / "DICOMDIR"
