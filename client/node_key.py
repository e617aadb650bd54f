"""A site's node-authentication key pair, made at the site: the private key never leaves it.

``hccfed admin site-key --out DIR --site SITE`` writes ``SITE.key`` (an ECDSA P-384 private key in
OpenSSH format, owner-only, as ``flower-supernode --auth-supernode-private-key`` reads it) and
``SITE.pub`` (its OpenSSH public key, which the site sends to the coordinator for
``flwr supernode register``). An existing key is never overwritten.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec


def make_site_key(out: Path, site_id: str) -> tuple[Path, Path]:
    """(private key path, public key path); FileExistsError when either exists."""
    if not site_id or any(c in site_id for c in "/\\ ") or site_id.startswith("."):
        raise ValueError(f"site id {site_id!r}: letters, digits, '-' and '_' only")
    out = Path(out)
    private, public = out / f"{site_id}.key", out / f"{site_id}.pub"
    for path in (private, public):
        if path.exists():
            raise FileExistsError(f"{path} exists: a key is never overwritten (move it away first)")
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + f" {site_id}\n".encode())
    return private, public
