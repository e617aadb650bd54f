"""Site-level faults: one clear error naming the file and the key or line, before any work, exit code 2.

Each case damages a private copy of the tiny hospital_c (its YAML, its manifest or its folders) and runs
`hccfed validate` and `hccfed prepare`: no traceback, the error names what to fix, the data folder is
byte-identical and no cache was made. The valid variants (a declared encoding, an allowed extra root,
declared mask labels, a BOM, CRLF line ends) are accepted.
"""

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

import hccfed_cli
from fault_corpus import tree_digest
from hccfed.client.image_checks import load_patient
from hccfed.client.manifest import read_manifest
from hccfed.client.radiomics import site_jobs
from hccfed.client.site_validation import patient_jobs, validate_site
from hccfed.common.site_config import load_site_config
from site_fixtures import private_site_copy


@pytest.fixture
def site(tiny_cohort, tmp_path):
    """(yaml path, raw YAML dict, data folder) of a private copy of hospital_c."""
    config = private_site_copy(tiny_cohort[1][2], tmp_path)
    return config.source, yaml.safe_load(config.source.read_text()), config.data_root


def _write(path: Path, raw) -> None:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def _manifest_text(root: Path) -> str:
    return (root / "manifest.csv").read_text()


def _run_both(yaml_path: Path, root: Path, cache: Path, capsys) -> str:
    """Both commands fail with exit code 2 and one message; nothing written anywhere. Returns the message."""
    before = tree_digest(root)
    messages = []
    for command in ("validate", "prepare"):
        capsys.readouterr()
        assert hccfed_cli.main([command, "--site", str(yaml_path), "--workers", "1"]) == 2, command
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err and err.startswith(f"hccfed {command}: error:"), err
        messages.append(err)
    assert tree_digest(root) == before and not cache.exists()
    return messages[0]


YAML_FAULTS = [  # (kind, change of the raw YAML dict or text, what the message must name)
    ("unknown key", lambda r: r.update(mask_lables={"tumour": [2]}), "mask_lables"),
    ("site id with a slash", lambda r: r.update(site_id="a/b"), "site_id"),
    ("empty data_root", lambda r: r.update(data_root=""), "data_root"),
    ("manifest not a string", lambda r: r.update(manifest=5), "manifest"),
    ("manifest outside data_root", lambda r: r.update(manifest="../elsewhere.csv"), "manifest"),
    ("data_root missing", lambda r: r.update(data_root=r["data_root"] + "_gone"), "data_root"),
    ("cache inside data_root", lambda r: r.update(cache_dir=r["data_root"] + "/cache"), "cache_dir"),
    ("cache around data_root", lambda r: r.update(cache_dir=str(Path(r["data_root"]).parent)), "cache_dir"),
    ("lab range in another unit", lambda r: r["labs"]["albumin"].update(unit="g/dL", lower=35, upper=50),
     "labs.albumin"),
    ("lab bound infinite", lambda r: r["labs"]["ast"].update(upper=float("inf")), "labs.ast.upper"),
    ("lab bound a boolean", lambda r: r["labs"]["ast"].update(lower=True), "labs.ast"),
    ("lab with an extra key", lambda r: r["labs"]["ast"].update(units="U/L"), "labs.ast"),
    ("spacing NaN", lambda r: r["preprocessing"].update(spacing_mm=float("nan")), "preprocessing.spacing_mm"),
    ("crop absurdly large", lambda r: r["preprocessing"].update(crop_voxels=100000), "preprocessing.crop_voxels"),
    ("preprocessing not a mapping", lambda r: r.update(preprocessing=[1, 2]), "preprocessing"),
    ("mask label 0 as tumour", lambda r: r.update(mask_labels={"tumour": [0]}), "mask_labels.tumour"),
    ("mask label both tumour and ignored", lambda r: r.update(mask_labels={"tumour": [1], "ignore": [1]}),
     "mask_labels"),
    ("two phases on one column", lambda r: r["phases"].update(arterial="image_pre"), "phases"),
    ("unknown manifest encoding", lambda r: r.update(manifest_encoding="klingon"), "manifest_encoding"),
    ("allowed_roots not a list", lambda r: r.update(allowed_roots="/data"), "allowed_roots"),
]


@pytest.mark.parametrize("kind, change, key", YAML_FAULTS, ids=[f[0] for f in YAML_FAULTS])
def test_yaml_faults_name_the_key(site, tmp_path, capsys, kind, change, key):
    path, raw, root = site
    change(raw)
    _write(path, raw)
    message = _run_both(path, root, tmp_path / "cache", capsys)
    assert str(path) in message and key in message, message


YAML_TEXT_FAULTS = [
    ("YAML syntax error", lambda t: t + "\nsite_id: [unclosed\n", "not valid YAML"),
    ("key given twice", lambda t: t + "\ntreatment: ablation\ntreatment: resection\n", "appears twice"),
    ("YAML in latin-1", lambda t: t.replace("site_id: hospital_c", "site_id: hospital_c # h\xf4pital"), "UTF-8"),
    ("YAML a list", lambda t: "- " + t.replace("\n", "\n  "), "mapping"),
]


@pytest.mark.parametrize("kind, change, shown", YAML_TEXT_FAULTS, ids=[f[0] for f in YAML_TEXT_FAULTS])
def test_broken_yaml_files(site, tmp_path, capsys, kind, change, shown):
    path, _, root = site
    text = change(path.read_text())
    path.write_bytes(text.encode("latin-1"))
    message = _run_both(path, root, tmp_path / "cache", capsys)
    assert str(path) in message and shown in message, message


def test_yaml_that_is_a_folder(site, tmp_path, capsys):
    _, _, root = site
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    assert "is a folder" in _run_both(folder, root, tmp_path / "cache", capsys)


def test_cache_through_a_symlink_into_data_root(site, tmp_path, capsys):
    path, raw, root = site
    (tmp_path / "innocent").symlink_to(root)
    raw["cache_dir"] = str(tmp_path / "innocent" / "cache")
    _write(path, raw)
    message = _run_both(path, root, root / "cache", capsys)
    assert "cache_dir" in message and "inside the input folder" in message


def _latin1(text: str) -> bytes:
    lines = text.splitlines()
    lines[3] = lines[3].replace(",M,", ",M,", 1)
    cells = lines[3].split(",")
    cells[6] = "autre-h\xe9patite"
    lines[3] = ",".join(cells)
    return ("\n".join(lines) + "\n").encode("latin-1")


MANIFEST_FAULTS = [  # (kind, new manifest bytes from the clean text, what the message must name)
    ("latin-1 byte", _latin1, "line 4, field 7"),
    ("semicolon delimiter", lambda t: t.replace(",", ";").encode(), "delimiter"),
    ("missing column", lambda t: t.replace("albumin,", "albumen,", 1).encode(), "missing column 'albumin'"),
    ("misspelled unit column", lambda t: "\n".join(
        [line + (",albumin_units" if i == 0 else ",g/dL") for i, line in enumerate(t.splitlines())]).encode(),
     "albumin_units"),
    ("duplicated column", lambda t: "\n".join(
        [line + (",age" if i == 0 else ",50") for i, line in enumerate(t.splitlines())]).encode(), "'age' appears 2"),
    ("empty file", lambda t: b"", "empty"),
    ("header only", lambda t: t.splitlines()[0].encode() + b"\n", "no patient row"),
    ("Excel workbook", lambda t: b"PK\x03\x04" + b"\x00" * 64, "Excel"),
    ("UTF-16 text", lambda t: t.encode("utf-16"), "UTF-16"),
    ("unclosed quote", lambda t: t.replace(",A,", ',"A,', 1).encode(), "line"),
    ("NUL byte", lambda t: t.replace("\n", "\n\x00", 1).encode(), "NUL"),
    ("values under an unnamed column", lambda t: "\n".join(
        [line + ("," if i == 0 else ",x") for i, line in enumerate(t.splitlines())]).encode(), "no name"),
]


@pytest.mark.parametrize("kind, damage, shown", MANIFEST_FAULTS, ids=[f[0] for f in MANIFEST_FAULTS])
def test_manifest_faults_name_file_and_line(site, tmp_path, capsys, kind, damage, shown):
    path, _, root = site
    manifest = root / "manifest.csv"
    manifest.write_bytes(damage(_manifest_text(root)))
    message = _run_both(path, root, tmp_path / "cache", capsys)
    assert str(manifest) in message and shown in message, message


def test_manifest_missing_or_a_folder(site, tmp_path, capsys):
    path, _, root = site
    (root / "manifest.csv").unlink()
    assert "not found" in _run_both(path, root, tmp_path / "cache", capsys)
    (root / "manifest.csv").mkdir()
    assert "not a file" in _run_both(path, root, tmp_path / "cache", capsys)


def test_report_inside_the_data_folder_is_refused(site, tmp_path, capsys):
    path, _, root = site
    before = tree_digest(root)
    assert hccfed_cli.main(["validate", "--site", str(path), "--report", str(root / "qc")]) == 2
    assert "inside the input folder" in capsys.readouterr().err and tree_digest(root) == before


def test_validate_writes_its_report_only_where_asked(site, tmp_path, capsys):
    path, _, root = site
    before = tree_digest(root)
    assert hccfed_cli.main(["validate", "--site", str(path), "--workers", "1", "--report", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "9 patient(s) pass every check, 0 excluded" in out and (tmp_path / "r" / "qc_report.csv").exists()
    assert tree_digest(root) == before and not (tmp_path / "cache").exists()


def test_declared_encoding_bom_and_crlf_are_read(site, tmp_path):
    path, raw, root = site
    manifest = root / "manifest.csv"
    manifest.write_bytes(_latin1(_manifest_text(root)))
    raw["manifest_encoding"] = "latin-1"
    _write(path, raw)
    issues = read_manifest(load_site_config(path), strict=False).issues
    assert [i.field for i in issues if i.severity == "excluded"] == ["hepatitis"]  # read, then refused by its rule
    assert "autre-h\xe9patite" in issues[0].message and issues[0].row == 4
    text = manifest.read_bytes().decode("latin-1")
    manifest.write_bytes(b"\xef\xbb\xbf" + text.replace("autre-h\xe9patite", "other").replace("\n", "\r\n").encode())
    raw["manifest_encoding"] = "utf-8"
    _write(path, raw)
    assert read_manifest(load_site_config(path), strict=True).patient_ids[0] == "C0001"


def test_an_allowed_root_admits_paths_outside_data_root(site, tmp_path):
    path, raw, root = site
    pacs = tmp_path / "pacs"
    pacs.mkdir()
    shutil.move(root / "images" / "C0002_pre.nii.gz", pacs / "C0002_pre.nii.gz")
    text = _manifest_text(root).replace("images/C0002_pre.nii.gz", str(pacs / "C0002_pre.nii.gz"))
    (root / "manifest.csv").write_text(text)
    refused = read_manifest(load_site_config(path), strict=False).issues
    assert [(i.patient_id, i.reason) for i in refused] == [("C0002", "path_outside_root")]
    raw["allowed_roots"] = [str(pacs)]
    _write(path, raw)
    assert "C0002" in read_manifest(load_site_config(path), strict=True).patient_ids
    raw["cache_dir"] = str(pacs / "cache")
    _write(path, raw)
    with pytest.raises(ValueError, match="cache_dir"):
        load_site_config(path)  # an allowed root is an input: no cache in it


def test_declared_mask_labels_read_a_lits_label_map(site, tmp_path):
    """Liver 1, tumour 2: refused by default, read as the tumour alone once declared."""
    path, raw, root = site
    for mask_path in sorted((root / "masks").glob("*.nii.gz")):
        mask = sitk.ReadImage(str(mask_path))
        tumour = sitk.GetArrayFromImage(mask) > 0
        labels = np.zeros(tumour.shape, np.uint8)
        labels[2:-2, 6:-6, 6:-6] = 1
        labels[tumour] = 2
        out = sitk.GetImageFromArray(labels)
        out.CopyInformation(mask)
        sitk.WriteImage(out, str(mask_path), True)
    report = validate_site(load_site_config(path), workers=1)
    assert set(i.reason for i in report.issues if i.severity == "excluded") == {"mask_labels"}
    assert "mask_labels: {tumour: [2], ignore: [1]}" in report.issues[0].message
    raw["mask_labels"] = {"tumour": [2], "ignore": [1]}
    _write(path, raw)
    config = load_site_config(path)
    assert validate_site(config, workers=1).excluded == []
    job = patient_jobs(config, read_manifest(config))[0]
    tumour = sitk.GetArrayFromImage(load_patient(job).mask)
    assert np.array_equal(tumour, sitk.GetArrayFromImage(sitk.ReadImage(job.mask_path)) == 2)
    assert {j.mask_labels for j in site_jobs(config)} == {config.mask_labels}  # radiomics reads the same tumour


def test_exit_codes_when_no_patient_is_usable_and_on_an_unforeseen_error(site, tmp_path, capsys, monkeypatch):
    path, _, root = site
    text = _manifest_text(root).splitlines()
    column = text[0].split(",").index("event")
    rows = [",".join(c if i != column else "" for i, c in enumerate(line.split(","))) for line in text[1:]]
    (root / "manifest.csv").write_text("\n".join([text[0], *rows]) + "\n")
    assert hccfed_cli.main(["validate", "--site", str(path), "--workers", "1"]) == 1
    assert "missing_outcome" in capsys.readouterr().out
    assert hccfed_cli.main(["prepare", "--site", str(path), "--workers", "1"]) == 3
    assert "no patient could be prepared" in capsys.readouterr().err
    import hccfed.client.site_validation as site_validation

    monkeypatch.setattr(site_validation, "validate_site", lambda *a, **k: 1 / 0)
    assert hccfed_cli.main(["validate", "--site", str(path)]) == 4
    err = capsys.readouterr().err
    assert "unexpected error (ZeroDivisionError" in err and "Traceback" not in err


def test_readme_documents_every_reason_code_and_exit_code():
    from hccfed.client.qc import REASONS

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("## Pointing it at a hospital's own data"):]
    section = section[:section.index("\n## ", 10)]
    missing = [r for r in REASONS if f"| `{r}` |" not in section]
    assert missing == [] and all(f"**{code}**" in section for code in range(5))
