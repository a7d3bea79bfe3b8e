"""Helpers for the token-enrollment tests: a fresh master, CSRs, tampered CSRs, registry dumps."""

from __future__ import annotations

import ipaddress
import shutil
import sqlite3
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from decnet import config, pki
from decnet.master import enrollment


def fresh_master(shared: config.MasterPaths, tmp_path: Path) -> enrollment.MasterState:
    """A master of its own (registry, revocations) with the session's CA and master identity."""
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    for sub in ("ca", "master"):
        shutil.copytree(shared.home / sub, home / sub)
    paths = config.MasterPaths.resolve(home)
    enrollment.init_master(paths)
    return enrollment.load_master(paths)


def keys_and_csrs(key_type: str = "ec-p256") -> tuple[dict, dict]:
    keys = {role: pki.generate_key(key_type) for role in ("worker", "updater")}
    return keys, {role: pki.make_csr(k).decode() for role, k in keys.items()}


def hostile_csr(key, *, cn: str = "decnet-master", ou: str = "master") -> str:
    """A CSR asking for the master's name and role, a foreign SAN and ``CA:TRUE``."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "DECNET"),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou),
                    x509.NameAttribute(NameOID.COMMON_NAME, cn),
                ]
            )
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("evil.example"),
                    x509.DNSName("decnet-master"),
                    x509.IPAddress(ipaddress.ip_address("203.0.113.9")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def registry_dump(path: Path) -> dict[str, list]:
    """Every row of every table, to compare a registry before and after a refusal."""
    db = sqlite3.connect(path)
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {t: sorted(db.execute(f"SELECT * FROM {t}").fetchall()) for t in tables}  # noqa: S608
    finally:
        db.close()
