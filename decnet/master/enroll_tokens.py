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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
from cryptography import x509

from decnet import config, pki
from decnet.clock import utc_iso
from decnet.errors import EnrollmentRefused, ValidationError
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


def new_token(draw: Callable[[int], str] = secrets.token_urlsafe) -> str:
    """A one-time token (URL-safe base64 of TOKEN_BYTES random bytes) that does not start
    with ``-``: one in 64 would, and ``decnet-worker join ... --token -xYz...`` would then
    be read as an option, not as the token (the join command printed would fail)."""
    while True:
        token = draw(TOKEN_BYTES)
        if not token.startswith("-"):
            return token


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
    token = new_token()
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
    reply: Mapping[str, Any]

    @property
    def certificates(self) -> Mapping[str, str]:
        return self.reply["certificates"]

    @property
    def bundle(self) -> Mapping[str, object]:
        return self.reply["bundle"]

    def as_reply(self) -> dict[str, object]:
        return dict(self.reply)


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
    der = {role: pki.spki(key) for role, key in keys.items()}
    if len(set(der.values())) != len(der):
        raise ValidationError("the worker and updater CSRs must have different keys")
    return keys


def redeem(master: MasterState, registry: Registry, token: object, csrs: object) -> Joined:
    """Use ``token`` once for the CSRs in ``csrs``; the host is enrolled when this returns.

    :class:`ValidationError` for a malformed request (nothing is looked up),
    :class:`decnet.errors.EnrollmentRefused` for a token that is unknown, used
    or expired, or a name that is taken.  Either way the registry is unchanged.

    A used token presented again with CSRs for the very keys it was used with
    (the worker retrying after a lost answer) gets the same answer again, and
    nothing changes; with any other key it is refused as used.
    """
    if not isinstance(token, str) or not 1 <= len(token) <= 256:
        raise ValidationError("'token' must be a string of 1-256 characters")
    keys = parse_csrs(csrs)

    def complete(pending: PendingEnrollment) -> tuple[Host, dict]:
        return _sign(master, registry, pending, keys)

    with registry.lock():
        tokens = Tokens(registry)
        used = tokens.used(token)
        if used is not None:
            return _replay(registry, used, keys)
        host, answer = tokens.redeem(token, complete)
    return Joined(host=host, reply=answer)


def _sign(
    master: MasterState,
    registry: Registry,
    pending: PendingEnrollment,
    keys: Mapping[str, pki.LeafPublicKey],
) -> tuple[Host, dict]:
    """The host row and the answer for ``pending``: every field decided here, not by the CSRs."""
    settings = pending.settings
    bundle = dict(settings["bundle"])
    wanted = [config.ROLE_WORKER] + ([config.ROLE_UPDATER] if settings["updater"] else [])
    missing = [role for role in wanted if role not in keys]
    if missing:
        raise ValidationError(f"this token also needs a CSR for: {', '.join(missing)}")
    certs = {
        role: pki.certify(
            master.ca,
            keys[role],
            role,
            pending.name,
            addresses=settings["sans"],
            validity_days=settings["validity_days"],
        )
        for role in wanted
    }
    host = Host(
        name=pending.name,
        address=str(bundle["address"]),
        agent_port=int(bundle["agent_port"]),
        updater_port=int(bundle["updater_port"]),
        worker_fingerprint=pki.fingerprint(certs[config.ROLE_WORKER]),
        updater_fingerprint=(
            pki.fingerprint(certs[config.ROLE_UPDATER]) if config.ROLE_UPDATER in certs else None
        ),
        enrolled_at=utc_iso(registry.now()),
        expires_at=utc_iso(certs[config.ROLE_WORKER].not_valid_after_utc.timestamp()),
    )
    answer = {
        "certificates": {role: pki.cert_pem(c).decode("ascii") for role, c in certs.items()},
        "ca": pki.cert_pem(master.ca.cert).decode("ascii"),
        "bundle": bundle,
    }
    return host, answer


def _replay(
    registry: Registry, used: PendingEnrollment, keys: Mapping[str, pki.LeafPublicKey]
) -> Joined:
    """The stored answer of a used token, for the holder of the keys it was used with."""
    refused = EnrollmentRefused("this enrollment token has already been used")
    answer = used.answer
    if answer is None:
        raise refused
    for role, pem in answer["certificates"].items():
        cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
        if role not in keys or pki.spki(cert.public_key()) != pki.spki(keys[role]):
            raise refused
    host = registry.get(used.name)
    if host.decommissioned:
        raise EnrollmentRefused(
            f"{used.name!r} was decommissioned at {host.revoked_at}; enroll under a new name"
        )
    return Joined(host=host, reply=answer)
