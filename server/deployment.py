"""The coordinator's deployment helpers: a consortium CA, the SuperLink's TLS certificate, the commands.

``hccfed admin coordinator --out DIR --host NAME [--address IP ...]`` writes, with owner-only
permissions on the keys:

- ``ca.pem`` / ``ca.key``: the consortium's certificate authority (ECDSA P-384). ``ca.pem`` is
  given to every site (it verifies the SuperLink); ``ca.key`` stays offline with the coordinator;
- ``superlink.pem`` / ``superlink.key``: the SuperLink's certificate, signed by the CA, valid for
  the names and addresses given *and* for ``localhost`` / ``127.0.0.1`` (the SuperLink's own
  launcher connects there: without it runs stay pending while ``flwr run`` reports success).

Each site makes its own node-authentication key pair (client/node_key.py, ``hccfed admin site-key``);
only its public key comes to the coordinator, who registers it with ``flwr supernode register``.
:func:`deployment_commands` prints the exact coordinator and site commands. Nothing here is ever
written into the repository by the project: ``.gitignore`` keeps ``*.key`` and ``deploy/`` out.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_NAMES = ("localhost",)
LOOPBACK_ADDRESSES = ("127.0.0.1", "::1")
DEFAULT_PORT = 9092
DEFAULT_DAYS = 825  # the CA/Browser forum's longest validity for a server certificate


@dataclass(frozen=True)
class CoordinatorFiles:
    ca_cert: Path
    ca_key: Path
    cert: Path
    key: Path


def write_private(path: Path, data: bytes) -> None:
    """Write a key readable by its owner only (created 0600, never world-readable for an instant)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        raise FileExistsError(f"{path} exists: a key is never overwritten (move it away first)")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hccfed consortium"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _alt_names(hosts: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([*hosts, *LOOPBACK_NAMES, *LOOPBACK_ADDRESSES]):  # ordered, deduplicated
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_coordinator_certificates(out: Path, hosts: Iterable[str], days: int = DEFAULT_DAYS) -> CoordinatorFiles:
    """The CA and the SuperLink's certificate in ``out`` (see the module docstring); refuses to overwrite."""
    out = Path(out)
    files = CoordinatorFiles(out / "ca.pem", out / "ca.key", out / "superlink.pem", out / "superlink.key")
    existing = [str(p) for p in vars(files).values() if p.exists()]
    if existing:
        raise FileExistsError(f"{', '.join(existing)} exist: certificates and keys are never overwritten")
    hosts = [h for h in hosts if h]
    if not hosts:
        raise ValueError("give the SuperLink's host name or address (--host), as the sites will reach it")
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = _name("hccfed consortium CA")
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA384()))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(_alt_names(hosts)), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA384()))
    write_private(files.ca_key, _pem_key(ca_key))
    write_private(files.key, _pem_key(key))
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return files


def certificate_names(cert_path: Path) -> list[str]:
    """The DNS names and IP addresses a certificate is valid for."""
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [*sans.get_values_for_type(x509.DNSName), *(str(a) for a in sans.get_values_for_type(x509.IPAddress))]


def superlink_command(files: CoordinatorFiles, state_dir: Path, host: str = "0.0.0.0",
                      port: int = DEFAULT_PORT) -> list[str]:
    """The SuperLink of a deployment: TLS, node authentication, persistent state, no runtime installs."""
    return ["flower-superlink", "--ssl-ca-certfile", str(files.ca_cert), "--ssl-certfile", str(files.cert),
            "--ssl-keyfile", str(files.key), "--enable-supernode-auth",
            "--database", str(Path(state_dir) / "superlink.db"), "--disable-runtime-dependency-installation",
            "--isolation", "subprocess", "--host", host, "--port", str(port)]


def supernode_command(superlink: str, ca_cert: Path, private_key: Path, site_config: Path,
                      runtime_port: int = 9094) -> list[str]:
    """One hospital's SuperNode: verifies the SuperLink with the CA, authenticates with its own key."""
    return ["flower-supernode", "--superlink", superlink, "--root-certificates", str(ca_cert),
            "--auth-supernode-private-key", str(private_key),
            "--node-config", f'site-config="{Path(site_config)}"', "--isolation", "subprocess",
            "--host", "127.0.0.1", "--port", str(runtime_port)]


def flwr_connection_toml(name: str, superlink: str, ca_cert: Path) -> str:
    """The ``[superlink.<name>]`` block of ``$FLWR_HOME/config.toml`` for ``flwr run`` and ``flwr supernode``."""
    return (f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{superlink}"\n'
            f'root-certificates = "{Path(ca_cert)}"\n')


def _shell(command: list[str]) -> str:
    import shlex

    return " ".join(shlex.quote(part) for part in command)


def deployment_commands(files: CoordinatorFiles, public_address: str, sites: list[str], port: int = DEFAULT_PORT,
                        state_dir: Path = Path("/var/lib/hccfed/superlink"), app_dir: Path = Path("."),
                        runs_dir: Path = Path("/var/lib/hccfed/runs")) -> str:
    """The exact commands of a deployment, in the order they are run, for the guide and ``hccfed admin``."""
    superlink = f"{public_address}:{port}"
    lines = ["# 1. Coordinator: the SuperLink (keep it running under a supervisor; port "
             f"{port}/tcp open to the sites only)",
             _shell(superlink_command(files, state_dir, port=port)), "",
             "# 2. Coordinator: flwr's connection to it ($FLWR_HOME/config.toml, FLWR_HOME defaults to ~/.flwr)",
             flwr_connection_toml("hccfed", f"127.0.0.1:{port}", files.ca_cert), "",
             "# 3. Coordinator: register each site's public key (the site sends <site>.pub; its private key "
             "never leaves it)"]
    lines += [_shell(["flwr", "supernode", "register", f"{site}.pub", "hccfed"]) for site in sites]
    lines += ["", "# 4. Each site (after `hccfed admin site-key --out /etc/hccfed --site SITE` and "
              "`hccfed site check --site SITE.yaml`): its SuperNode"]
    lines += [f"#    {site}:\n" + _shell(supernode_command(superlink, Path("/etc/hccfed/ca.pem"),
                                                          Path(f"/etc/hccfed/{site}.key"),
                                                          Path(f"/etc/hccfed/{site}.yaml")))
              for site in sites]
    run_config = [f'sites="{",".join(sites)}"', f'run-dir="{runs_dir}/{{run-id}}"']
    lines += ["", "# 5. Coordinator: start a run (the roster names the sites; results, report.html included, under "
              f"{runs_dir}/flwr-run-<id>/; to resume one: --run-config 'run-dir=\"<that folder>\"' "
              "--run-config resume=true)",
              _shell(["flwr", "run", str(app_dir), "hccfed", "--stream",
                      *[arg for value in run_config for arg in ("--run-config", value)]])]
    return "\n".join(lines)
