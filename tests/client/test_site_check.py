"""`hccfed site check` on the tiny cohort: a ready site passes; each fault gives its status and a reason
naming the file; the data folder is never written."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from hccfed.client.prepare import prepare_site
from hccfed.client.node_key import make_site_key
from hccfed.client.site_check import FAILED, OK, WARNING, _guarded, check_auth_key, check_cache, check_certificate, \
    check_site
from hccfed.common.site_config import load_site_config
from hccfed_cli import main
from site_fixtures import private_site_copy


def _tree(root: Path) -> dict[str, str]:
    """Every file and folder under root, with its content hash and modification time."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            + f"|{p.stat().st_mtime_ns}" for p in sorted(root.rglob("*"))}


def _ca(path: Path, days_valid: int = 30, start_days_ago: int = 1) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hccfed test CA")])
    start = datetime.now(timezone.utc) - timedelta(days=start_days_ago)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start)
            .not_valid_after(start + timedelta(days=days_valid))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _key(path: Path, mode: int = 0o600, key=None) -> Path:
    key = key or ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    path.chmod(mode)
    return path


def _by_name(report) -> dict:
    return {c.name: c for c in report.checks}


def test_a_ready_site_passes_and_its_data_folder_is_unchanged(tiny_cohort, tmp_path, capsys):
    site_yaml = tiny_cohort[1][2]
    config = load_site_config(site_yaml)
    prepared = prepare_site(config, workers=1, progress=False)
    before = _tree(config.data_root)
    ca, key = _ca(tmp_path / "ca.pem"), _key(tmp_path / "node.key")
    report = check_site(site_yaml, root_certificates=ca, auth_key=key, workers=1)
    checks = _by_name(report)
    assert report.ok, report.table()
    for name in ("site config", "prepared cache", "privacy policy", "cache_dir", "CA certificate", "node auth key"):
        assert checks[name].status == OK, checks[name]
    data = checks["data"]
    assert data.details["accepted"] >= len(prepared) > 0
    assert data.status == (WARNING if data.details["excluded"] else OK)
    assert str(config.manifest) in data.reason
    assert f"{len(prepared)} patient(s)" in checks["prepared cache"].reason
    assert checks["privacy policy"].details == config.privacy.to_dict()
    assert f"min_cell_size={config.privacy.min_cell_size}" in checks["privacy policy"].reason
    assert checks["device"].status == (OK if torch.cuda.is_available() else WARNING)
    assert checks["node auth key"].details["curve"] == "secp384r1"
    assert _tree(config.data_root) == before

    assert main(["site", "check", "--site", str(site_yaml), "--root-certificates", str(ca), "--json",
                 "--workers", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is True and [c["name"] for c in out["checks"]][-1] == "device"
    assert _tree(config.data_root) == before


def test_a_broken_yaml_fails_naming_the_file_and_skips_what_needs_it(tmp_path, capsys):
    bad = tmp_path / "hospital_x.yaml"
    bad.write_text("site_id: hospital_x\nmanifest: manifest.csv\n")  # no data_root
    report = check_site(bad)
    checks = _by_name(report)
    assert checks["site config"].status == FAILED
    assert str(bad) in checks["site config"].reason and "data_root" in checks["site config"].reason
    assert checks["data"].status == WARNING and "not checked" in checks["data"].reason
    assert not report.ok
    bad.write_text("site_id: [unclosed\n")
    assert main(["site", "check", "--site", str(bad)]) == 1
    table = capsys.readouterr().out
    assert "site config     failed" in table and str(bad) in table and "NOT ready" in table


def test_an_unprepared_cache_says_how_to_prepare(tiny_cohort, tmp_path):
    config = private_site_copy(tiny_cohort[1][2], tmp_path)
    before = _tree(config.data_root)
    check = check_cache(config)
    assert check.status == FAILED
    assert "not prepared yet" in check.reason and f"hccfed prepare --site {config.source}" in check.reason
    assert not config.cache_dir.exists() and _tree(config.data_root) == before  # read-only: nothing prepared


def test_node_auth_key_faults_name_the_file(tmp_path):
    missing = tmp_path / "missing.key"
    assert check_auth_key(missing).status == FAILED and str(missing) in check_auth_key(missing).reason
    assert check_auth_key(tmp_path).status == FAILED  # a folder: not readable as a file
    loose = _key(tmp_path / "loose.key", mode=0o644)
    check = check_auth_key(loose)
    assert check.status == WARNING and str(loose) in check.reason and "0644" in check.reason
    rsa_key = _key(tmp_path / "rsa.key", key=rsa.generate_private_key(public_exponent=65537, key_size=2048))
    assert check_auth_key(rsa_key).status == FAILED and "not an EC private key" in check_auth_key(rsa_key).reason
    text = tmp_path / "notes.txt"
    text.write_text("not a key\n")
    assert check_auth_key(text).status == FAILED and str(text) in check_auth_key(text).reason
    assert check_auth_key(_key(tmp_path / "good.key")).status == OK
    pkcs8 = tmp_path / "pkcs8.key"  # a PEM key in another format: flower-supernode would refuse it
    pkcs8.write_bytes(ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    assert check_auth_key(pkcs8).status == FAILED and "OpenSSH" in check_auth_key(pkcs8).reason
    site_key, _ = make_site_key(tmp_path / "made", "hospital_a")
    assert check_auth_key(site_key).status == OK  # what hccfed admin site-key writes


def test_certificate_faults_name_the_file(tmp_path):
    expired = _ca(tmp_path / "expired.pem", days_valid=10, start_days_ago=20)
    check = check_certificate(expired)
    assert check.status == FAILED and "expired" in check.reason and str(expired) in check.reason
    future = _ca(tmp_path / "future.pem", days_valid=10, start_days_ago=-5)
    assert check_certificate(future).status == FAILED and "not valid before" in check_certificate(future).reason
    der = tmp_path / "ca.der"
    der.write_bytes(x509.load_pem_x509_certificate(_ca(tmp_path / "ok.pem").read_bytes())
                    .public_bytes(serialization.Encoding.DER))
    check = check_certificate(der)
    assert check.status == FAILED and "not a PEM X.509 certificate" in check.reason and str(der) in check.reason
    assert check_certificate(tmp_path / "ok.pem").status == OK
    assert check_certificate(tmp_path / "none.pem").status == FAILED


def test_an_unexpected_error_fails_one_check_in_one_line():
    check = _guarded("device", lambda: 1 / 0)
    assert check.status == FAILED and "'device'" in check.reason and "ZeroDivisionError" in check.reason
    assert "\n" not in check.reason


@pytest.mark.parametrize("flag", ["--root-certificates", "--auth-key"])
def test_the_cli_exits_1_on_a_failed_tls_file(tmp_path, flag, capsys):
    bad = tmp_path / "bad.pem"
    bad.write_text("junk\n")
    assert main(["site", "check", "--site", "/nonexistent/site.yaml", flag, str(bad)]) == 1
    assert str(bad) in capsys.readouterr().out
