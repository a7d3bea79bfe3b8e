"""The private CA, role-bound leaf certificates, bundles and fingerprints.

Pure ``cryptography`` plus file I/O; nothing here touches the reactor.

Roles are not decided by the operator-chosen CN alone.  Every leaf carries a
role marker in its subject's ``OU`` that only this module writes, and
:func:`identity_of` accepts a certificate only when the marker and the CN agree
(``master`` ⇔ ``decnet-master``, ``updater`` ⇔ ``updater@<valid name>``,
``worker`` ⇔ a valid, non-reserved host name).  Because the operator can only
choose a *name*, and names are validated, nobody can enroll a worker that
verifies as a master or as another host's updater.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import cast

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from decnet import config
from decnet.errors import InvalidName, MissingFileError, PKIError, ValidationError
from decnet.fsutil import (
    PRIVATE_FILE_MODE,
    atomic_write,
    ensure_private_dir,
    fsync_dir,
    lock_path_for,
    locked,
    write_new_file,
)

ORGANIZATION = "DECNET"
CA_COMMON_NAME = "DECNET swarm root CA"

KEY_TYPES = ("ec-p256", "rsa-2048", "rsa-3072")
DEFAULT_KEY_TYPE = "ec-p256"

# Host names: lowercase DNS-style labels, 1-63 characters in all, so they fit a
# CN, a DNS SAN and a file name without quoting.  Always ``fullmatch``: ``$``
# with ``match`` also accepts a trailing newline ("web-01\n").
HOST_NAME_RE = re.compile(r"[a-z0-9][a-z0-9.-]{0,62}")

# Names that would be confusing or dangerous as a worker CN: the master's CN,
# the role words themselves, and names that look like infrastructure.
RESERVED_NAMES = frozenset(
    {
        config.MASTER_CN,
        "master",
        "worker",
        "updater",
        "ca",
        "decnet",
        "localhost",
        "localhost.localdomain",
    }
)


def validate_host_name(name: object) -> str:
    """Return ``name`` if it may be enrolled as a worker, else raise :class:`InvalidName`."""
    if isinstance(name, str) and (
        name in RESERVED_NAMES or name.startswith(config.UPDATER_CN_PREFIX)
    ):
        raise InvalidName(f"host name {name!r} is reserved; choose another name")
    if not isinstance(name, str) or not HOST_NAME_RE.fullmatch(name):
        raise InvalidName(
            f"invalid host name {name!r}: use 1-63 characters of a-z, 0-9, '.' and '-', "
            "starting with a letter or digit"
        )
    if ".." in name or name.endswith((".", "-")):
        raise InvalidName(f"invalid host name {name!r}: empty label or trailing '.'/'-'")
    return name


_DNS_NAME_RE = re.compile(
    r"(?=.{1,253}\Z)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*"
)


def parse_address(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | str:
    """An IP address object, or a validated lowercase DNS name.

    A scoped IPv6 address (``fe80::1%eth0``) is refused: a certificate SAN
    cannot carry the scope, and ``ipaddress`` accepts any text after the ``%``.
    """
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        pass
    else:
        if getattr(address, "scope_id", None) is None:
            return address
        raise ValidationError(f"invalid address {value!r}: a scoped IPv6 address cannot be a SAN")
    lowered = value.lower() if isinstance(value, str) else ""
    if not _DNS_NAME_RE.fullmatch(lowered):
        raise ValidationError(f"invalid address {value!r}: expected an IP address or a DNS name")
    return lowered


# A bundle names at most this many listeners (a hostile list is refused, not truncated).
MAX_LISTENERS = 32


def parse_listener(value: object) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) as ``(host, port)``; the host is validated
    like every other address (:func:`parse_address`), the port is 1-65535."""
    text = value if isinstance(value, str) else ""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ":" not in host:
            host = ""  # brackets are for IPv6 only
    elif ":" in host:
        host = ""  # an IPv6 address needs its brackets: [::1]:6514
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValidationError(
            f"invalid listener {value!r}: expected HOST:PORT (an IPv6 address in brackets: "
            "[2001:db8::1]:6514) with a port in 1-65535"
        )
    return str(parse_address(host)), int(port)


def format_listener(host: str, port: int) -> str:
    """The ``HOST:PORT`` spelling of a listener (IPv6 in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def validate_listeners(values: object) -> list[str]:
    """An ordered listener list: each ``HOST:PORT`` valid, no duplicates, at most
    :data:`MAX_LISTENERS`; returned in canonical spelling, order kept."""
    if not isinstance(values, list) or not values:
        raise ValidationError("the listener list must be a non-empty list of HOST:PORT strings")
    if len(values) > MAX_LISTENERS:
        raise ValidationError(f"{len(values)} listeners is more than {MAX_LISTENERS}")
    problems: list[str] = []
    canonical: list[str] = []
    for value in values:
        try:
            spelled = format_listener(*parse_listener(value))
        except ValidationError as exc:
            problems.extend(exc.problems)
            continue
        if spelled in canonical:
            problems.append(f"listener {spelled} is listed twice")
        canonical.append(spelled)
    if problems:
        raise ValidationError(problems)
    return canonical


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER encoding, lowercase hex."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def colon_fingerprint(fp: str) -> str:
    """``ab12…`` → ``AB:12:…``, the form ``openssl x509 -fingerprint -sha256`` prints."""
    fp = fp.upper()
    return ":".join(fp[i : i + 2] for i in range(0, len(fp), 2))


def normalize_fingerprint(fp: str) -> str:
    """Accept either the hex or the colon form; return lowercase hex.

    Nothing else is cleaned away: surrounding whitespace or a newline is refused.
    """
    cleaned = fp.replace(":", "").lower() if isinstance(fp, str) else ""
    if not re.fullmatch(r"[0-9a-f]{64}", cleaned):
        raise ValidationError(f"not a SHA-256 fingerprint: {fp!r}")
    return cleaned


# ---------------------------------------------------------------------------
# Identities read off certificates


@attrs.frozen
class CertIdentity:
    """Who a certificate says it is, once the role marker and CN agree."""

    cn: str
    role: str | None  # None when marker and CN disagree: never accepted
    fingerprint: str

    @property
    def host(self) -> str | None:
        """The worker host this identity belongs to (``None`` for the master)."""
        if self.role == config.ROLE_WORKER:
            return self.cn
        if self.role == config.ROLE_UPDATER:
            return self.cn[len(config.UPDATER_CN_PREFIX) :]
        return None


def _subject_value(cert: x509.Certificate, oid) -> str | None:
    values = cert.subject.get_attributes_for_oid(oid)
    if len(values) != 1:
        return None
    value = values[0].value
    return value if isinstance(value, str) else None


def _role_matches_cn(role: str, cn: str) -> bool:
    try:
        if role == config.ROLE_MASTER:
            return cn == config.MASTER_CN
        if role == config.ROLE_UPDATER:
            prefix = config.UPDATER_CN_PREFIX
            return cn.startswith(prefix) and bool(validate_host_name(cn[len(prefix) :]))
        if role == config.ROLE_WORKER:
            return bool(validate_host_name(cn))
    except InvalidName:
        return False
    return False


def identity_of(cert: x509.Certificate) -> CertIdentity:
    """Read CN, role and fingerprint; ``role`` is ``None`` unless they are consistent."""
    cn = _subject_value(cert, NameOID.COMMON_NAME) or ""
    marker = _subject_value(cert, NameOID.ORGANIZATIONAL_UNIT_NAME)
    role = marker if marker in config.ROLES and _role_matches_cn(marker, cn) else None
    return CertIdentity(cn=cn, role=role, fingerprint=fingerprint(cert))


def cn_for(role: str, name: str | None = None) -> str:
    if role == config.ROLE_MASTER:
        return config.MASTER_CN
    host = validate_host_name(name)
    if role == config.ROLE_WORKER:
        return host
    if role == config.ROLE_UPDATER:
        return config.UPDATER_CN_PREFIX + host
    raise ValueError(f"unknown role {role!r}")


# ---------------------------------------------------------------------------
# PEM


def key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _read_pem(path: str | os.PathLike, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise MissingFileError(path, what) from None
    except PermissionError:
        # Each daemon runs as its own user (docs/Operations.md): say which file.
        raise PKIError(
            f"cannot read the {what} {path}: permission denied for uid {os.getuid()}"
        ) from None


def load_cert(path: str | os.PathLike, what: str = "certificate") -> x509.Certificate:
    data = _read_pem(path, what)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise PKIError(f"{path} is not a PEM certificate") from None


def load_key(path: str | os.PathLike, what: str = "private key"):
    data = _read_pem(path, what)
    try:
        # Our own keys, written 0600 by us: skip the slow RSA consistency
        # check (it dominates CA load time for a 4096-bit key).
        return serialization.load_pem_private_key(
            data, password=None, unsafe_skip_rsa_key_validation=True
        )
    except (ValueError, TypeError):
        raise PKIError(f"{path} is not an unencrypted PEM private key") from None


# ---------------------------------------------------------------------------
# The CA


@attrs.frozen
class CertificateAuthority:
    cert: x509.Certificate
    key: rsa.RSAPrivateKey

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert)


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _generate_ca(validity_days: int, key_size: int) -> CertificateAuthority:
    key = rsa.generate_private_key(public_exponent=65537, key_size=key_size)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME),
        ]
    )
    now = _utcnow()
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=validity_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertificateAuthority(cert=cert, key=key)


def load_ca(ca_dir: str | os.PathLike) -> CertificateAuthority:
    ca_dir = Path(ca_dir)
    cert = load_cert(ca_dir / "ca.crt", "CA certificate")
    key = load_key(ca_dir / "ca.key", "CA private key")
    return CertificateAuthority(cert=cert, key=key)


def ensure_ca(
    ca_dir: str | os.PathLike,
    *,
    validity_days: int = config.CA_VALIDITY_DAYS,
    key_size: int = 4096,
) -> CertificateAuthority:
    """Load the CA in ``ca_dir``, creating it on first use.

    Idempotent and safe under concurrency: an ``flock`` serialises creators, so
    two processes racing on an empty directory end up with the same single CA.
    The key is written 0600 from its first byte and the certificate last, so a
    crash mid-way leaves a directory that the next call simply completes.
    """
    ca_dir = ensure_private_dir(ca_dir)
    cert_path, key_path = ca_dir / "ca.crt", ca_dir / "ca.key"
    with locked(ca_dir / ".lock"):
        if cert_path.exists() and key_path.exists():
            return load_ca(ca_dir)
        for leftover in (cert_path, key_path):
            if leftover.exists():
                # A previous creator died between the two writes: the CA was
                # never complete, so it cannot have signed anything.
                leftover.unlink()
        ca = _generate_ca(validity_days, key_size)
        write_new_file(key_path, key_pem(ca.key), PRIVATE_FILE_MODE)
        write_new_file(cert_path, cert_pem(ca.cert), 0o644)
        fsync_dir(ca_dir)
        return ca


# ---------------------------------------------------------------------------
# Leaves


@attrs.frozen
class Leaf:
    cert: x509.Certificate
    key: object

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert)


LeafPrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
LeafPublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


def generate_key(key_type: str = DEFAULT_KEY_TYPE) -> LeafPrivateKey:
    if key_type == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type in ("rsa-2048", "rsa-3072"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[4:]))
    raise ValidationError(f"unknown key type {key_type!r}: choose one of {', '.join(KEY_TYPES)}")


def issue_leaf(
    ca: CertificateAuthority,
    role: str,
    name: str | None = None,
    *,
    addresses: Iterable[str] = (),
    key_type: str = DEFAULT_KEY_TYPE,
    validity_days: int = config.LEAF_VALIDITY_DAYS,
    not_before: datetime.datetime | None = None,
) -> Leaf:
    """Issue a leaf for ``role`` (``name`` is the worker host name, unused for the master).

    Every leaf has serverAuth and clientAuth (each daemon both serves and
    calls), the role marker in ``OU``, and SANs: the host name (or
    ``decnet-master``) as a DNS name plus each address as an IP or DNS SAN.
    """
    key = generate_key(key_type)
    cert = certify(
        ca,
        key.public_key(),
        role,
        name,
        addresses=addresses,
        validity_days=validity_days,
        not_before=not_before,
    )
    return Leaf(cert=cert, key=key)


def _sans(role: str, name: str | None, addresses: Iterable[str]) -> list[x509.GeneralName]:
    dns_names: list[str] = [config.MASTER_CN if role == config.ROLE_MASTER else str(name)]
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for raw in addresses:
        parsed = parse_address(raw)
        if isinstance(parsed, str):
            if parsed not in dns_names:
                dns_names.append(parsed)
        elif parsed not in ips:
            ips.append(parsed)
    return [x509.DNSName(d) for d in dns_names] + [x509.IPAddress(ip) for ip in ips]


def certify(
    ca: CertificateAuthority,
    public: LeafPublicKey,
    role: str,
    name: str | None = None,
    *,
    addresses: Iterable[str] = (),
    validity_days: int = config.LEAF_VALIDITY_DAYS,
    not_before: datetime.datetime | None = None,
) -> x509.Certificate:
    """The CA's certificate for ``public`` as ``role`` / ``name``: every field is decided here.

    Subject, SANs, EKUs, key usage and ``CA:FALSE`` come from the arguments and
    this module's rules, never from what a requester asked for.
    """
    cn = cn_for(role, name)
    start = not_before or (_utcnow() - datetime.timedelta(minutes=5))
    is_rsa = isinstance(public, rsa.RSAPublicKey)
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                    x509.NameAttribute(NameOID.COMMON_NAME, cn),
                ]
            )
        )
        .issuer_name(ca.cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=validity_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=is_rsa,
                data_encipherment=False,
                key_agreement=not is_rsa,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(_sans(role, name, addresses)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    return builder.sign(ca.key, hashes.SHA256())


# ---------------------------------------------------------------------------
# Certificate signing requests (token enrollment: the worker keeps its keys)

#: A CSR is a few hundred bytes; anything much larger is not one of ours.
MAX_CSR_SIZE = 16 * 1024


def spki(public: CertificatePublicKeyTypes) -> bytes:
    """A public key's DER SubjectPublicKeyInfo: how two keys are compared for equality."""
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def make_csr(key: LeafPrivateKey) -> bytes:
    """A PEM CSR proving possession of ``key``; it asks for nothing (the master decides)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def csr_public_key(pem: object) -> LeafPublicKey:
    """The public key of a PEM CSR whose self-signature is valid; everything else is ignored.

    Refused (:class:`ValidationError`): not a string, too large, not a PEM CSR,
    a bad signature (no proof of possession), a key type other than EC P-256
    or RSA 2048-4096.  The subject, SANs, extensions and attributes the CSR
    asks for are never read: :func:`certify` decides them.
    """
    if not isinstance(pem, str) or len(pem) > MAX_CSR_SIZE:
        raise ValidationError(f"a CSR must be a PEM string of at most {MAX_CSR_SIZE} characters")
    try:
        csr = x509.load_pem_x509_csr(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise ValidationError("not a PEM certificate signing request") from None
    if not csr.is_signature_valid:
        raise ValidationError("the CSR's signature does not verify (no proof of key possession)")
    public = csr.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey) and isinstance(public.curve, ec.SECP256R1):
        return public
    if isinstance(public, rsa.RSAPublicKey) and 2048 <= public.key_size <= 4096:
        return public
    raise ValidationError("unsupported CSR key: use EC P-256 or RSA 2048-4096")


# ---------------------------------------------------------------------------
# Bundles: a directory of PEM files plus a small JSON config


def write_bundle(
    target: str | os.PathLike,
    files: Mapping[str, bytes],
    private: Iterable[str] = (),
) -> Path:
    """Write ``files`` into a new directory ``target`` atomically.

    Everything goes to a sibling temporary directory first (keys 0600 from
    creation, directory 0700) and is renamed into place at the end, so a
    refusal or a crash never leaves a half-written bundle.  ``target`` must not
    exist or must be an empty directory.
    """
    target = Path(target).absolute()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ValidationError(
            f"{target} already exists and is not empty; choose a new directory or remove it"
        )
    private = set(private)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.staging-{os.getpid()}")
    ensure_private_dir(staging)
    try:
        for name, data in files.items():
            write_new_file(staging / name, data, PRIVATE_FILE_MODE if name in private else 0o644)
        fsync_dir(staging)
        os.rename(staging, target)  # replaces an empty directory atomically
    except BaseException:
        for child in staging.glob("*"):
            child.unlink()
        if staging.exists():
            staging.rmdir()
        raise
    fsync_dir(target.parent)
    return target


@attrs.frozen
class WorkerBundle:
    """A worker's enrolled bundle directory, as written by ``decnet-admin enroll``."""

    directory: Path
    name: str
    master_fingerprint: str
    settings: Mapping[str, object]
    # The log listener's own leaf (``decnet-admin init`` gives it a key of its
    # own); a bundle enrolled before that pins the master's for both.
    listener_fingerprint: str

    @classmethod
    def load(cls, directory: str | os.PathLike) -> WorkerBundle:
        directory = Path(directory).absolute()
        cfg_path = directory / config.BUNDLE_CONFIG
        if not directory.is_dir():
            raise MissingFileError(directory, "bundle directory")
        try:
            settings = json.loads(cfg_path.read_text())
        except FileNotFoundError:
            raise MissingFileError(cfg_path, "bundle config") from None
        except ValueError:
            raise PKIError(f"{cfg_path} is not valid JSON") from None
        try:
            master_fp = normalize_fingerprint(settings["master_fingerprint"])
            listener_fp = settings.get("listener_fingerprint")
            if "listeners" in settings:
                validate_listeners(settings["listeners"])
            return cls(
                directory=directory,
                name=validate_host_name(settings["name"]),
                master_fingerprint=master_fp,
                settings=settings,
                listener_fingerprint=(
                    master_fp if listener_fp is None else normalize_fingerprint(listener_fp)
                ),
            )
        except (KeyError, TypeError, ValidationError) as exc:
            raise PKIError(f"{cfg_path} is incomplete or invalid: {exc}") from None

    @property
    def listeners(self) -> list[tuple[str, int]]:
        """The ordered listener list (``listeners`` in bundle.json); a bundle without one
        names the single master listener (``master_host`` and ``syslog_port``)."""
        listed = self.settings.get("listeners")
        if listed is None:
            host = self.settings.get("master_host")
            port = self.settings.get("syslog_port") or config.SYSLOG_PORT
            return [] if not host else [(str(host), int(cast(int, port)))]
        return [parse_listener(item) for item in validate_listeners(listed)]

    @property
    def ca_path(self) -> Path:
        return self.directory / config.BUNDLE_CA

    def cert_path(self, role: str) -> Path:
        return self.directory / f"{role}.crt"

    def key_path(self, role: str) -> Path:
        return self.directory / f"{role}.key"

    @property
    def has_updater(self) -> bool:
        return self.cert_path(config.ROLE_UPDATER).exists()


def replace_bundle_listeners(
    directory: str | os.PathLike, listeners: object
) -> tuple[list[str], bool]:
    """Replace only the listener list of the bundle in ``directory``.  Blocking.

    ``listeners`` is validated first (:func:`validate_listeners`): a hostile list
    changes nothing.  Every other field of ``bundle.json`` is kept as it is; the
    file is replaced atomically and durably, under its lock, so two refreshes at
    once leave one of the two lists, never a mix.  Returns the list now in force
    and whether it changed.
    """
    wanted = validate_listeners(listeners)
    path = Path(directory) / config.BUNDLE_CONFIG
    with locked(lock_path_for(path)):
        settings = WorkerBundle.load(directory).settings
        if settings.get("listeners") == wanted:
            return wanted, False
        updated = {**settings, "listeners": wanted}
        atomic_write(path, (json.dumps(updated, indent=2) + "\n").encode(), 0o644)
        fsync_dir(path.parent)
    return wanted, True
