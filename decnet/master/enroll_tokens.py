"""Token enrollment on the master: issue a one-time token, redeem it for certificates.

Blocking (SQLite, the registry's ``flock``, signing with the CA key): the CLI
calls :func:`issue_token` directly; ``twistd decnet-enroll`` calls
:func:`redeem` through :mod:`decnet.threads`.

* A token is 256 random bits (:mod:`secrets`).  Only its sha256 is stored,
  with the name, the settings the operator chose, and an expiry.
* :func:`redeem` checks the CSRs, then in one registry transaction (under the
  registry's lock, like ``decommission``) finds the token unused and
  unexpired, finds the name free, signs, adds the host and marks the token
  used.  Any refusal leaves the registry exactly as it was.
* The master decides every field of the certificates (:func:`decnet.pki.certify`):
  the CSR contributes its public key and nothing else.  No private key of the
  worker ever reaches the master.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping, Sequence

import attrs
from cryptography.hazmat.primitives import serialization

from decnet import config, pki
from decnet.clock import utc_iso
from decnet.errors import ValidationError
from decnet.master.enrollment import MasterState, bundle_settings, check_enrollment
from decnet.master.registry import Host, PendingEnrollment, Registry, Tokens, token_digest

DEFAULT_TTL = 15 * 60
MAX_TTL = 7 * 24 * 3600
MIN_TTL = 60
TOKEN_BYTES = 32

_TTL_RE = re.compile(r"([0-9]{1,7})([smhd]?)")
_TTL_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(text: str) -> int:
    """``15m``, ``900s``, ``2h``, ``1d`` or plain seconds; 1 minute to 7 days."""
    match = _TTL_RE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"expected a duration like 15m, 900s, 2h or 1d, got {text!r}")
    seconds = int(match[1]) * _TTL_UNITS[match[2]]
    if not MIN_TTL <= seconds <= MAX_TTL:
        raise ValueError(f"a token lives from 1m to 7d, got {text!r}")
    return seconds


parse_ttl.__name__ = "duration"  # argparse: "invalid duration value: 'x'"


@attrs.frozen
class IssuedToken:
    """A token as the operator is shown it, once: the only time the secret exists."""

    token: str
    name: str
    address: str
    updater: bool
    expires_at: str
    ca_fingerprint: str

    def as_dict(self) -> dict[str, object]:
        return attrs.asdict(self)


def issue_token(
    master: MasterState,
    name: str,
    address: str,
    *,
    sans: Sequence[str] = (),
    updater: bool = False,
    agent_port: int = config.AGENT_PORT,
    updater_port: int = config.UPDATER_PORT,
    syslog_port: int | None = None,
    master_host: str | None = None,
    validity_days: int = config.LEAF_VALIDITY_DAYS,
    ttl: int = DEFAULT_TTL,
    registry: Registry | None = None,
) -> IssuedToken:
    """Record a one-time token for ``name`` and return it (the registry keeps its hash)."""
    check_enrollment(name, address, sans, agent_port, updater_port, validity_days, None)
    registry = registry or Registry(master.paths.registry)
    token = secrets.token_urlsafe(TOKEN_BYTES)
    now = registry.now()
    settings = {
        "bundle": bundle_settings(
            master, name, address, agent_port, updater_port, syslog_port, master_host
        ),
        "sans": [address, *sans],
        "updater": updater,
        "validity_days": validity_days,
    }
    pending = PendingEnrollment(token_digest(token), name, settings, now, now + ttl)
    with registry.lock():
        Tokens(registry).add(pending)
    return IssuedToken(
        token=token,
        name=name,
        address=address,
        updater=updater,
        expires_at=utc_iso(now + ttl),
        ca_fingerprint=master.ca.fingerprint,
    )


@attrs.frozen
class Joined:
    """What a successful join sends back: certificates by role, the CA and ``bundle.json``."""

    host: Host
    certificates: Mapping[str, str]
    ca: str
    bundle: Mapping[str, object]

    def as_reply(self) -> dict[str, object]:
        return {"certificates": dict(self.certificates), "ca": self.ca, "bundle": dict(self.bundle)}


def parse_csrs(doc: object) -> dict[str, pki.LeafPublicKey]:
    """The public keys of the ``worker`` (required) and ``updater`` (optional) CSRs.

    Any other key of ``doc`` is ignored: the token, not the request, says which
    roles are issued.  One key for both roles is refused.
    """
    if not isinstance(doc, dict) or config.ROLE_WORKER not in doc:
        raise ValidationError("'csrs' must be an object with at least a 'worker' CSR")
    keys = {
        role: pki.csr_public_key(doc[role])
        for role in (config.ROLE_WORKER, config.ROLE_UPDATER)
        if role in doc
    }
    der = {role: _spki(key) for role, key in keys.items()}
    if len(set(der.values())) != len(der):
        raise ValidationError("the worker and updater CSRs must have different keys")
    return keys


def _spki(key: pki.LeafPublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def redeem(master: MasterState, registry: Registry, token: object, csrs: object) -> Joined:
    """Use ``token`` once for the CSRs in ``csrs``; the host is enrolled when this returns.

    :class:`ValidationError` for a malformed request (nothing is looked up),
    :class:`decnet.errors.EnrollmentRefused` for a token that is unknown, used
    or expired, or a name that is taken.  Either way the registry is unchanged.
    """
    if not isinstance(token, str) or not 1 <= len(token) <= 256:
        raise ValidationError("'token' must be a string of 1-256 characters")
    keys = parse_csrs(csrs)
    issued: dict[str, str] = {}
    out: dict[str, Mapping[str, object]] = {}

    def complete(pending: PendingEnrollment) -> Host:
        settings = pending.settings
        bundle = dict(settings["bundle"])
        wanted = [config.ROLE_WORKER] + ([config.ROLE_UPDATER] if settings["updater"] else [])
        missing = [role for role in wanted if role not in keys]
        if missing:
            raise ValidationError(f"this token also needs a CSR for: {', '.join(missing)}")
        fingerprints: dict[str, str] = {}
        for role in wanted:
            cert = pki.certify(
                master.ca,
                keys[role],
                role,
                pending.name,
                addresses=settings["sans"],
                validity_days=settings["validity_days"],
            )
            issued[role] = pki.cert_pem(cert).decode("ascii")
            fingerprints[role] = pki.fingerprint(cert)
        out["bundle"] = bundle
        return Host(
            name=pending.name,
            address=str(bundle["address"]),
            agent_port=int(bundle["agent_port"]),
            updater_port=int(bundle["updater_port"]),
            worker_fingerprint=fingerprints[config.ROLE_WORKER],
            updater_fingerprint=fingerprints.get(config.ROLE_UPDATER),
            enrolled_at=utc_iso(registry.now()),
        )

    with registry.lock():
        host = Tokens(registry).redeem(token, complete)
    return Joined(
        host=host,
        certificates=issued,
        ca=pki.cert_pem(master.ca.cert).decode("ascii"),
        bundle=out["bundle"],
    )
