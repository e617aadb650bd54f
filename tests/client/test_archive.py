"""A site's archive: scans without outcomes, named in its YAML (``archive:``), read as a scans-only
manifest, prepared as its labelled patients are, and pretrained on beside its training split; a
labelled patient's scan never enters it (same id, or the same prepared volume under another id)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml

from hccfed.client.manifest import ManifestError, read_manifest
from hccfed.client.site import Site
from hccfed.common.errors import ConfigError
from hccfed.common.plan import FederationPlan
from hccfed.common.site_config import ArchiveConfig, load_site_config, relocated_site_config, site_config_to_yaml
from hccfed.simulation.cohort import ARCHIVE_FIRST_INDEX, holdout_profiles, synthesize_cohort
from site_fixtures import TINY_FOV_MM, private_site_copy

IMAGE_COLUMNS = ["image_pre", "image_arterial", "image_portal", "image_delayed", "mask"]


def _yaml(tmp_path: Path, site_yaml: Path, archive) -> Path:
    raw = yaml.safe_load(Path(site_yaml).read_text())
    raw["cache_dir"] = str(tmp_path / "cache")
    raw["archive"] = archive
    out = tmp_path / "site.yaml"
    out.write_text(yaml.safe_dump(raw))
    return out


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() + str(p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_archive_section_is_parsed_checked_and_written_back(tiny_site_profiles, tmp_path):
    site_yaml = tiny_site_profiles[0].config_path
    data_root = load_site_config(site_yaml).data_root
    (tmp_path / "pacs").mkdir()
    config = load_site_config(_yaml(tmp_path, site_yaml, {"data_root": str(tmp_path / "pacs"),
                                                          "manifest": "archive.csv"}))
    assert config.archive == ArchiveConfig(tmp_path / "pacs", tmp_path / "pacs" / "archive.csv", "utf-8")
    derived = config.archive_site()
    assert (derived.data_root, derived.manifest, derived.archive) == (tmp_path / "pacs", config.archive.manifest, None)
    assert derived.cache_dir == config.cache_dir / "archive" and data_root in derived.allowed_roots
    assert load_site_config(site_yaml).archive is None and load_site_config(site_yaml).archive_site() is None
    again = tmp_path / "again.yaml"
    again.write_text(site_config_to_yaml(config))
    assert load_site_config(again).archive == config.archive
    default_root = load_site_config(_yaml(tmp_path, site_yaml, {"manifest": "archive.csv"})).archive
    assert default_root.data_root == data_root and default_root.manifest == data_root / "archive.csv"

    refusals = [
        ({"data_root": str(tmp_path / "pacs")}, "missing key 'archive.manifest'"),
        ({"manifest": "a.csv", "outcomes": "x"}, r"unknown keys \['archive.outcomes'\]"),
        ("archive.csv", "key 'archive' must be a mapping"),
        ({"manifest": "manifest.csv"}, "is the labelled manifest"),
        ({"manifest": "a.csv", "manifest_encoding": "klingon"}, "archive.manifest_encoding"),
        ({"data_root": str(tmp_path / "pacs"), "manifest": str(tmp_path / "elsewhere.csv")},
         "key 'archive.manifest' resolves to .*outside archive.data_root"),
        ({"data_root": str(tmp_path / "cache" / "x"), "manifest": "a.csv"}, "and the archive's folder .* overlap"),
        ({"data_root": str(tmp_path), "manifest": "a.csv"}, "and the archive's folder .* overlap"),
    ]
    for archive, message in refusals:
        with pytest.raises(ConfigError, match=message):
            load_site_config(_yaml(tmp_path, site_yaml, archive))


@pytest.fixture(scope="module")
def archive_source(tiny_site_profiles, tmp_path_factory):
    """Hospital A's synthetic archive of 6 unlabelled patients (the generator's own folder)."""
    root = tmp_path_factory.mktemp("archive_source")
    profile = holdout_profiles(tiny_site_profiles[:1], 6, ARCHIVE_FIRST_INDEX)
    synthesize_cohort(root, seed=7, sites=profile, fov_mm=TINY_FOV_MM, workers=1, progress=False)
    return root / "hospital_a"


def _copy_patient(row: pd.Series, source: Path, archive: Path, new_id: str) -> dict[str, str]:
    """One patient's five files copied into the archive folder under ``new_id``'s names."""
    out = {"patient_id": new_id}
    for column in IMAGE_COLUMNS:
        target = archive / "scans" / f"{new_id.strip()}_{column}.nii.gz"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / row[column], target)
        out[column] = str(target.relative_to(archive))
    return out


def test_a_scans_only_manifest_needs_the_id_and_image_columns_and_ignores_the_others(tiny_site_profiles,
                                                                                      archive_source, tmp_path):
    archive = tmp_path / "archive"
    shutil.copytree(archive_source, archive)
    config = load_site_config(_yaml(tmp_path, tiny_site_profiles[0].config_path,
                                    {"data_root": str(archive), "manifest": "manifest.csv"})).archive_site()
    manifest = read_manifest(config, scans_only=True)  # the generator's manifest: outcomes and labs beside
    assert len(manifest.patient_ids) == 6 and list(manifest.table.columns) == ["patient_id"]
    assert {"event", "time_months", "afp", "age"} <= set(manifest.ignored_columns)
    assert manifest.mask_paths[0] == (archive / pd.read_csv(archive / "manifest.csv")["mask"][0]).resolve()

    rows = pd.read_csv(archive / "manifest.csv")
    rows[["patient_id", *IMAGE_COLUMNS[:-1]]].to_csv(archive / "manifest.csv", index=False)
    with pytest.raises(ManifestError, match=r"archive/manifest.csv: 1 problem\(s\):\n  missing column 'mask'$"):
        read_manifest(config, scans_only=True)
    rows = rows[["patient_id", *IMAGE_COLUMNS]].copy()
    rows.loc[1, "image_arterial"] = "images/nowhere.nii.gz"
    rows.to_csv(archive / "manifest.csv", index=False)
    manifest = read_manifest(config, strict=False, scans_only=True)
    assert len(manifest.patient_ids) == 5
    (issue,) = manifest.issues
    assert (issue.patient_id, issue.field, issue.reason) == (rows.loc[1, "patient_id"], "image_arterial",
                                                             "missing_file")
    assert "row 3" in issue.message and "manifest.csv" in issue.message
    with pytest.raises(ManifestError, match="missing column 'age'"):  # as a labelled manifest it lacks them
        read_manifest(config)


PLAN = FederationPlan(spacing_mm=4.0, crop_voxels=24, normalisation="zscore_ring", ring_mm=10.0, box_margin_mm=None)


@pytest.fixture
def labelled_copy(tiny_site_profiles, tmp_path) -> Path:
    """A private copy of hospital A whose last manifest row QC excludes (an age of 999): the YAML."""
    config = private_site_copy(tiny_site_profiles[0].config_path, tmp_path / "labelled")
    rows = pd.read_csv(config.manifest, dtype=str, keep_default_na=False)
    rows.loc[len(rows) - 1, "age"] = "999"
    rows.to_csv(config.manifest, index=False)
    return config.source


def _mixed_archive(config, archive_source: Path, archive: Path) -> dict[str, str]:
    """An archive of eight rows beside a labelled site: two new scans (scan-1, scan-2) and, to be left out,
    a labelled id in other case and spaces, a row whose mask is missing, one naming a labelled patient's own
    files, one with copies of a labelled patient's phases and another mask, and the id of the labelled row
    QC excludes; returns {what: the labelled patient concerned}."""
    source = pd.read_csv(archive_source / "manifest.csv")
    own = pd.read_csv(config.manifest, dtype=str).set_index("patient_id", drop=False)
    p1, p2, p3, excluded = own.index[0], own.index[1], own.index[2], own.index[-1]
    direct = {"patient_id": "scan-6", **{c: str(config.data_root / own.loc[p2, c]) for c in IMAGE_COLUMNS}}
    copied = _copy_patient(own.loc[p3], config.data_root, archive, "scan-7")
    mask = sitk.ReadImage(str(archive / copied["mask"]))  # another segmentation of p3: one voxel wider
    sitk.WriteImage(sitk.BinaryDilate(mask, [1, 1, 1]), str(archive / copied["mask"]))
    lines = [_copy_patient(source.iloc[0], archive_source, archive, "scan-1"),
             _copy_patient(source.iloc[1], archive_source, archive, "scan-2"),
             _copy_patient(source.iloc[2], archive_source, archive, f" {p1.lower()} "),
             {**_copy_patient(source.iloc[3], archive_source, archive, "scan-5"), "mask": "scans/missing.nii.gz"},
             direct, copied,
             _copy_patient(source.iloc[5], archive_source, archive, excluded)]
    pd.DataFrame(lines).to_csv(archive / "archive.csv", index=False)
    return {"id": p1, "file": p2, "voxels": p3, "excluded row": excluded}


def test_the_archive_is_prepared_by_the_plan_without_any_labelled_patients_scan(labelled_copy, archive_source,
                                                                                tmp_path):
    config = load_site_config(labelled_copy)
    archive = tmp_path / "archive"
    twins = _mixed_archive(config, archive_source, archive)
    before = _tree(archive), _tree(config.data_root)
    yaml_path = relocated_site_config(config, config.data_root, tmp_path / "cache", tmp_path / "a.yaml",
                                      archive=ArchiveConfig(archive, archive / "archive.csv")).source
    site = Site.for_run(yaml_path, labelled_run(), "run-1", PLAN)
    scans = site.archive
    assert list(scans.patient_ids) == ["scan-1", "scan-2"]
    excluded = {i.patient_id.strip(): i for i in scans.qc.issues if i.severity == "excluded"}
    assert {p: i.reason for p, i in excluded.items()} == {
        twins["id"].lower(): "in_labelled_cohort", "scan-5": "missing_file", "scan-6": "in_labelled_cohort",
        "scan-7": "in_labelled_cohort", twins["excluded row"]: "in_labelled_cohort"}
    assert f"has the id of labelled patient {twins['id']}" in excluded[twins["id"].lower()].message
    assert f"has the id of labelled patient {twins['excluded row']}" in excluded[twins["excluded row"]].message
    assert f"a file of labelled patient {twins['file']}" in excluded["scan-6"].message
    assert f"the voxels of a phase of labelled patient {twins['voxels']}" in excluded["scan-7"].message
    assert twins["excluded row"] not in site.prepared.patient_ids  # QC excluded it from the labelled cohort
    assert (tmp_path / "cache" / "archive" / "qc_report.csv").exists()
    # the cubes are the ones the labelled pipeline makes of the same files under the same plan
    direct = Site(relocated_site_config(config, archive_source, tmp_path / "direct", tmp_path / "d.yaml"),
                  seed=7, plan=PLAN).prepared
    assert scans.images.shape[2:] == (24, 24, 24) and np.array_equal(scans.images, direct.images[:2])
    images = site.pretraining_images()
    train = site.split("train").images
    assert images.shape[0] == len(train) + 2 and np.array_equal(images[len(train):].numpy(),
                                                                 scans.images.astype(np.float32))
    # another process of the run reads the snapshot, not the files again
    again = Site.for_run(yaml_path, labelled_run(), "run-1", PLAN).archive
    assert list(again.patient_ids) == ["scan-1", "scan-2"] and np.array_equal(again.images, scans.images)
    assert (_tree(archive), _tree(config.data_root)) == before  # nothing written into either folder

    # a cache that lost its QC file is assembled again, its report whole; a later run sees an edited archive
    qc_files = list((tmp_path / "cache" / "archive").glob("qc-*.json"))
    assert qc_files
    for qc in qc_files:
        qc.unlink()
    later = Site.for_run(yaml_path, labelled_run(), "run-2", PLAN).archive
    assert list(later.patient_ids) == ["scan-1", "scan-2"]
    assert [i.reason for i in later.qc.issues if i.severity == "excluded"].count("in_labelled_cohort") == 4
    assert [i.patient_id for i in later.qc.issues if i.reason == "missing_file"] == ["scan-5"]
    rows = pd.read_csv(archive / "archive.csv", dtype=str, keep_default_na=False)
    rows[rows["patient_id"] != "scan-2"].to_csv(archive / "archive.csv", index=False)
    assert list(Site.for_run(yaml_path, labelled_run(), "run-3", PLAN).archive.patient_ids) == ["scan-1"]


def test_validate_prepare_and_site_check_cover_the_archive(labelled_copy, archive_source, tmp_path, capsys):
    from hccfed.client.site_check import check_site
    from hccfed_cli import EXIT_EXCLUDED, EXIT_OK, EXIT_SITE_ERROR, main

    config = load_site_config(labelled_copy)
    archive = tmp_path / "archive"
    twins = _mixed_archive(config, archive_source, archive)
    yaml_path = relocated_site_config(config, config.data_root, tmp_path / "cache", tmp_path / "a.yaml",
                                      archive=ArchiveConfig(archive, archive / "archive.csv")).source
    before = _tree(archive)

    assert main(["validate", "--site", str(yaml_path), "--report", str(tmp_path / "report")]) == EXIT_EXCLUDED
    out = capsys.readouterr().out
    assert f"archive ({archive / 'archive.csv'}): hospital_a: 6 patient(s) pass every check, 1 excluded" in out
    assert "scan-5" in out and "missing_file" in out
    assert (tmp_path / "report" / "archive" / "qc_report.csv").exists()
    # a report inside the archive's folder is refused before any work
    assert main(["validate", "--site", str(yaml_path), "--report", str(archive / "report")]) == EXIT_SITE_ERROR
    assert "lies inside the input folder" in capsys.readouterr().err and not (archive / "report").exists()

    checks = {c.name: c for c in check_site(yaml_path).checks}
    assert checks["archive"].status == "warning" and checks["archive"].details["usable"] == 4
    assert checks["archive"].details["labelled_ids"] == 2 and twins["excluded row"] in checks["archive"].reason

    assert main(["prepare", "--site", str(yaml_path), "--workers", "1"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "hospital_a archive: 2 scans prepared for pretraining" in out and "in_labelled_cohort" in out
    assert _tree(archive) == before


def labelled_run():
    from hccfed.common.run_config import RunConfig

    return RunConfig(seed=7)
