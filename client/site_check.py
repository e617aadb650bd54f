"""`hccfed site check`: a site's readiness before it joins a federation, one line per check.

Each check is ``ok``, ``warning`` or ``failed`` with a one-line reason naming the file or field:
the site YAML (``common.site_config``), its data (``client.site_validation.validate_site``: every
rule of ``hccfed validate``), its archive of scans without outcomes when the YAML names one, the
prepared cache (current exactly when ``client.prepare``'s cache file for this config and data
exists), the privacy policy, the cache folder, the TLS CA certificate and
the node-auth private key when given, and the device. Nothing is prepared or written: the data
folder is only read, and the cache folder only receives (and loses) one empty probe file.
An unexpected error in a check fails that check, in one line naming it; it never stops the others.
"""

from __future__ import annotations

import logging
import os
import stat
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from hccfed.common.errors import ConfigError
from hccfed.common.site_config import SiteConfig, load_site_config

log = logging.getLogger("hccfed.site")

OK, WARNING, FAILED = "ok", "warning", "failed"


@dataclass
class Check:
    """One line of the report."""

    name: str
    status: str
    reason: str
    details: dict = field(default_factory=dict)


@dataclass
class SiteCheckReport:
    site_yaml: str
    checks: list[Check]

    @property
    def ok(self) -> bool:
        """True when no check failed (warnings allowed)."""
        return all(c.status != FAILED for c in self.checks)

    def to_dict(self) -> dict:
        return {"site_yaml": self.site_yaml, "ok": self.ok, "checks": [asdict(c) for c in self.checks]}

    def table(self) -> str:
        width = max(len("check"), *(len(c.name) for c in self.checks))
        lines = [f"{'check':<{width}}  status   reason"]
        lines += [f"{c.name:<{width}}  {c.status:<7}  {c.reason}" for c in self.checks]
        failed = sum(c.status == FAILED for c in self.checks)
        warned = sum(c.status == WARNING for c in self.checks)
        lines.append(f"{self.site_yaml}: " + ("ready" if not failed else f"NOT ready: {failed} check(s) failed")
                     + (f", {warned} warning(s)" if warned else ""))
        return "\n".join(lines)


def _guarded(name: str, run: Callable[[], Check]) -> Check:
    """The check's result; an unexpected error fails this check in one line naming it."""
    log.info("site check: %s", name)
    try:
        return run()
    except Exception as err:  # noqa: BLE001 (the report must always come back, whole)
        return Check(name, FAILED, f"unexpected error in check '{name}' ({type(err).__name__}: {err}); please report it")


def check_config(site_yaml: Path) -> tuple[Check, SiteConfig | None]:
    try:
        config = load_site_config(site_yaml)
    except (ConfigError, OSError) as err:
        return Check("site config", FAILED, str(err)), None
    return Check("site config", OK, f"{site_yaml}: valid, site_id '{config.site_id}', data_root {config.data_root}"), config


def check_data(config: SiteConfig, workers: int | None = None) -> Check:
    """Every rule of `hccfed validate`, nothing written: patients accepted, excluded and why."""
    from hccfed.client.manifest import ManifestError
    from hccfed.client.site_validation import validate_site

    try:
        report = validate_site(config, workers=workers)
    except (ConfigError, ManifestError) as err:
        return Check("data", FAILED, str(err))
    reasons = Counter(r for pid in report.excluded for r in dict.fromkeys(report.reasons(pid)))
    details = {"accepted": len(report.prepared), "excluded": len(report.excluded), "reasons": dict(reasons)}
    counts = f"{config.manifest}: {len(report.prepared)} patient(s) accepted, {len(report.excluded)} excluded"
    why = f" ({', '.join(f'{r}: {n}' for r, n in reasons.most_common())}; see hccfed validate --site {config.source})"
    if not report.prepared:
        return Check("data", FAILED, counts + why, details)
    return Check("data", WARNING if report.excluded else OK, counts + (why if report.excluded else ""), details)


def check_archive(config: SiteConfig, workers: int | None = None) -> Check:
    """The archive's scans (its YAML's ``archive:``, a scans-only manifest): every rule of `hccfed validate`,
    nothing written; rows with the id of any labelled manifest row are counted (left out when the site
    pretrains; the files and voxels of labelled patients are compared once both are prepared)."""
    from hccfed.client.manifest import ManifestError, raw_rows
    from hccfed.client.site_validation import validate_site
    from hccfed.client.validation import normalised_id

    archive = config.archive_site()
    try:
        report = validate_site(archive, workers=workers, scans_only=True)
        labelled = {normalised_id(row.get("patient_id") or "") for _, row in raw_rows(config)}  # every row's
    except (ConfigError, ManifestError) as err:
        return Check("archive", FAILED, str(err))
    overlap = [p for p in report.prepared if normalised_id(p) in labelled]
    usable = len(report.prepared) - len(overlap)
    reasons = Counter(r for pid in report.excluded for r in dict.fromkeys(report.reasons(pid)))
    details = {"usable": usable, "excluded": len(report.excluded), "labelled_ids": len(overlap),
               "reasons": dict(reasons)}
    text = f"{archive.manifest}: {usable} scan(s) for pretraining, {len(report.excluded)} excluded"
    if reasons:
        text += f" ({', '.join(f'{r}: {n}' for r, n in reasons.most_common())})"
    if overlap:
        text += f"; {len(overlap)} row(s) with a labelled patient's id ({', '.join(overlap[:3])}), left out"
    status = FAILED if not usable else WARNING if report.excluded or overlap else OK
    return Check("archive", status, text, details)


def check_cache(config: SiteConfig) -> Check:
    """The prepared cache is current for this config and data (read-only: nothing is prepared)."""
    from hccfed.client.prepare import PreparedSite, prepared_cache_file
    from hccfed.client.prepare_cache import load_site
    from hccfed.client.site_validation import screen_site

    try:
        cache_file = prepared_cache_file(config, screen_site(config).jobs)
    except ConfigError as err:
        return Check("prepared cache", FAILED, str(err))
    prepare = f"run hccfed prepare --site {config.source}"
    if cache_file.exists():
        site = load_site(cache_file, PreparedSite)
        if site is None:
            return Check("prepared cache", FAILED, f"{cache_file} is unreadable: {prepare}")
        return Check("prepared cache", OK, f"{cache_file}: current, {len(site)} patient(s)", {"file": str(cache_file)})
    stale = sorted(config.cache_dir.glob("prepared-*.npz")) if config.cache_dir.is_dir() else []
    if stale:
        return Check("prepared cache", FAILED, f"{config.cache_dir}: out of date (prepared for other data or another "
                     f"config, {len(stale)} older file(s)): {prepare}")
    return Check("prepared cache", FAILED, f"{config.cache_dir}: not prepared yet: {prepare}")


def check_privacy(config: SiteConfig) -> Check:
    values = config.privacy.to_dict()
    return Check("privacy policy", OK, f"{config.source} 'privacy': " + ", ".join(f"{k}={v}" for k, v in values.items()),
                 values)


def check_cache_dir(config: SiteConfig) -> Check:
    """cache_dir outside every input folder, and writable (or creatable) by this user."""
    from hccfed.client.site_validation import check_outputs

    try:
        check_outputs(config)
    except ConfigError as err:
        return Check("cache_dir", FAILED, str(err))
    where = f"{config.source} key 'cache_dir' ({config.cache_dir})"
    if config.cache_dir.exists():
        if not config.cache_dir.is_dir():
            return Check("cache_dir", FAILED, f"{where} is not a folder")
        try:
            with tempfile.NamedTemporaryFile(dir=config.cache_dir, prefix=".hccfed-site-check-"):
                pass
        except OSError as err:
            return Check("cache_dir", FAILED, f"{where} is not writable: {err.strerror or err}")
        return Check("cache_dir", OK, f"{where}: writable, outside data_root")
    parent = next(p for p in config.cache_dir.parents if p.exists())
    if not os.access(parent, os.W_OK | os.X_OK):
        return Check("cache_dir", FAILED, f"{where} does not exist and {parent} is not writable")
    return Check("cache_dir", OK, f"{where}: will be created (in {parent}, writable), outside data_root")


def _read(path: Path, name: str) -> tuple[bytes | None, Check | None]:
    try:
        return path.read_bytes(), None
    except OSError as err:
        return None, Check(name, FAILED, f"{path} is not readable: {err.strerror or err}")


def _first(err: Exception) -> str:
    """cryptography's message without its FAQ link."""
    return str(err).split(". See ")[0]


def check_certificate(path: Path, now: datetime | None = None) -> Check:
    """The TLS CA certificate: a readable PEM X.509 certificate, valid now."""
    from cryptography import x509

    data, failed = _read(path, "CA certificate")
    if failed:
        return failed
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError as err:
        return Check("CA certificate", FAILED, f"{path} is not a PEM X.509 certificate ({_first(err)})")
    now = now or datetime.now(timezone.utc)
    subject = cert.subject.rfc4514_string()
    details = {"subject": subject, "not_valid_after": cert.not_valid_after_utc.isoformat()}
    if cert.not_valid_after_utc < now:
        return Check("CA certificate", FAILED, f"{path} ({subject}) expired on {cert.not_valid_after_utc:%Y-%m-%d}", details)
    if cert.not_valid_before_utc > now:
        return Check("CA certificate", FAILED,
                     f"{path} ({subject}) is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC", details)
    return Check("CA certificate", OK, f"{path}: {subject}, valid until {cert.not_valid_after_utc:%Y-%m-%d}", details)


def check_auth_key(path: Path) -> Check:
    """The SuperNode's authentication key: a readable, unencrypted EC private key in OpenSSH format (as
    ``hccfed admin site-key`` writes it and ``flower-supernode --auth-supernode-private-key`` reads it),
    readable by its owner only."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    data, failed = _read(path, "node auth key")
    if failed:
        return failed
    try:
        key = load_ssh_private_key(data, password=None)
    except TypeError:
        return Check("node auth key", FAILED, f"{path} is encrypted; the SuperNode needs it without a password")
    except ValueError as err:
        return Check("node auth key", FAILED, f"{path} is not an OpenSSH private key, the format flower-supernode reads "
                     f"(make one with hccfed admin site-key) ({_first(err)})")
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return Check("node auth key", FAILED, f"{path} is a {type(key).__name__.lstrip('_')}, not an EC private key")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        return Check("node auth key", WARNING, f"{path} is readable by group or others (mode {mode:04o}): chmod 600 {path}",
                     {"curve": key.curve.name, "mode": f"{mode:04o}"})
    return Check("node auth key", OK, f"{path}: EC private key ({key.curve.name}), mode {mode:04o}", {"curve": key.curve.name})


def check_device() -> Check:
    import torch

    cpus = os.cpu_count() or 1
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        return Check("device", OK, f"CUDA GPU: {name} ({torch.cuda.device_count()} device(s)); {cpus} CPU core(s)",
                     {"cuda": True, "gpu": name, "cpus": cpus})
    return Check("device", WARNING, f"no CUDA GPU seen by torch {torch.__version__}: training runs on the {cpus} CPU "
                 "core(s), slowly", {"cuda": False, "cpus": cpus})


def check_site(site_yaml: str | Path, root_certificates: str | Path | None = None, auth_key: str | Path | None = None,
               workers: int | None = None) -> SiteCheckReport:
    """Every readiness check of one site; never raises."""
    site_yaml = Path(site_yaml)
    loaded: list[SiteConfig | None] = [None]

    def config_check() -> Check:
        check, loaded[0] = check_config(site_yaml)
        return check

    checks = [_guarded("site config", config_check)]
    config = loaded[0]
    for name, run in (("data", lambda: check_data(config, workers)), ("prepared cache", lambda: check_cache(config)),
                      ("privacy policy", lambda: check_privacy(config)), ("cache_dir", lambda: check_cache_dir(config))):
        checks.append(_guarded(name, run) if config is not None
                      else Check(name, WARNING, f"not checked: {site_yaml} is not a valid site YAML"))
        if name == "data" and config is not None and config.archive is not None:
            checks.append(_guarded("archive", lambda: check_archive(config, workers)))
    if root_certificates is not None:
        checks.append(_guarded("CA certificate", lambda: check_certificate(Path(root_certificates))))
    if auth_key is not None:
        checks.append(_guarded("node auth key", lambda: check_auth_key(Path(auth_key))))
    checks.append(_guarded("device", check_device))
    return SiteCheckReport(str(site_yaml), checks)
