import hashlib
from pathlib import Path

import pandas as pd
import pytest

from hccfed.client.manifest import ManifestError, read_manifest
from hccfed.client.prepare import prepare_site
from hccfed.common.site_config import load_site_config
from site_fixtures import private_site_copy


def _copy_site(tiny_cohort, tmp_path, index=1):
    """A private copy of one tiny site (data and YAML) that a test may damage."""
    return private_site_copy(tiny_cohort[1][index], tmp_path)


def _edit(config, change):
    table = pd.read_csv(config.manifest, dtype=str, keep_default_na=False)
    change(table)
    table.to_csv(config.manifest, index=False)
    return table


def test_clean_manifest_reads(tiny_cohort):
    config = load_site_config(tiny_cohort[1][0])
    manifest = read_manifest(config)
    assert len(manifest.patient_ids) == len(set(manifest.patient_ids)) > 0
    assert all(p.exists() for p in manifest.mask_paths)


def test_missing_file_names_patient_and_field(tiny_cohort, tmp_path):
    config = _copy_site(tiny_cohort, tmp_path)
    table = pd.read_csv(config.manifest, dtype=str)
    victim = table.iloc[2]
    (config.data_root / victim["image_arterial"]).unlink()
    with pytest.raises(ManifestError) as err:
        read_manifest(config)
    message = str(err.value)
    assert f"patient {victim['patient_id']}" in message and "'image_arterial'" in message
    assert "file not found" in message and str(config.manifest) in message


def test_missing_column_is_named(tiny_cohort, tmp_path):
    config = _copy_site(tiny_cohort, tmp_path)
    _edit(config, lambda t: t.drop(columns=["albumin"], inplace=True))
    with pytest.raises(ManifestError, match="missing column 'albumin'"):
        read_manifest(config)


def test_unparsable_values_name_patient_and_field(tiny_cohort, tmp_path):
    config = _copy_site(tiny_cohort, tmp_path)

    def damage(t):
        t.loc[0, "age"] = "sixty"
        t.loc[1, "event"] = "yes"
        t.loc[3, "child_pugh"] = "D"
        t.loc[4, "time_months"] = ""

    table = _edit(config, damage)
    with pytest.raises(ManifestError) as err:
        read_manifest(config)
    problems = err.value.problems
    expected = [(0, "age", "'sixty'"), (1, "event", "'yes'"), (3, "child_pugh", "'D'"), (4, "time_months", "empty")]
    for row, field, shown in expected:
        pid = table.loc[row, "patient_id"]
        assert any(f"patient {pid}" in p and f"'{field}'" in p and shown in p for p in problems), (field, problems)
    assert len(problems) == 4  # every problem reported at once, nothing else


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
            digest.update(str(path.stat().st_mtime_ns).encode())
    return digest.hexdigest()


def test_preparation_never_modifies_the_data_folder(tiny_cohort, tmp_path):
    config = _copy_site(tiny_cohort, tmp_path, index=2)
    before = _tree_digest(config.data_root)
    prepare_site(config, workers=1, progress=False)
    assert _tree_digest(config.data_root) == before


def test_lenient_mode_excludes_bad_rows_with_reasons(tiny_cohort, tmp_path):
    config = _copy_site(tiny_cohort, tmp_path)

    def damage(t):
        t.loc[0, "age"] = "sixty"
        t.loc[1, "event"] = ""
        t.loc[2, "patient_id"] = t.loc[3, "patient_id"]

    table = _edit(config, damage)
    manifest = read_manifest(config, strict=False)
    reasons = {(i.patient_id, i.reason, i.field) for i in manifest.issues}
    assert (table.loc[0, "patient_id"], "invalid_value", "age") in reasons
    assert (table.loc[1, "patient_id"], "missing_outcome", "event") in reasons
    assert (table.loc[3, "patient_id"], "duplicate_patient", "patient_id") in reasons
    kept = set(table["patient_id"]) - {table.loc[r, "patient_id"] for r in (0, 1, 3)}
    assert set(manifest.patient_ids) == kept and len(manifest.mask_paths) == len(kept)
    assert all(len(paths) == len(kept) for paths in manifest.image_paths.values())


def test_clinical_only_reading_needs_no_image_column(tiny_cohort, tmp_path):
    config = _copy_site(tiny_cohort, tmp_path)
    table = _edit(config, lambda t: t.drop(columns=["mask", "image_pre"], inplace=True))
    with pytest.raises(ManifestError, match="missing column 'image_pre'"):
        read_manifest(config)
    manifest = read_manifest(config, images=False)
    assert manifest.patient_ids == list(table["patient_id"]) and manifest.mask_paths == []
