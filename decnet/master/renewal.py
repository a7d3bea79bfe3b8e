"""Certificate renewal, master side: a small state machine over the registry's pending pins.

``decnet-admin renew`` (docs/Operations.md, "Renewing certificates") walks each
host through four steps.  Which ones are left is decided by :func:`steps_for`
from the registry row alone (pure), so a renewal interrupted anywhere (the CLI
killed, the updater or the agent killed, a lost connection) is completed by
running ``renew`` again:

``REQUEST``
    Over the current mTLS identity, ask the worker's updater for CSRs (it makes
    new keys, or offers the ones it made for an earlier, interrupted request).
    The master signs them with its own values (:func:`decnet.pki.certify`:
    subject, SANs, EKUs, role, ``CA:FALSE``; the CSR asks for nothing) and
    records the new fingerprints *next to* the current ones.  From here both
    pins are accepted (the overlap window: :func:`overlap_host`).
``PUSH``
    Send the recorded certificates; the worker installs each with its pending
    key.  Pushing again is answered the same (idempotent).  A worker without
    the matching key (it lost it) answers 409: the pending pins are dropped and
    the renewal starts over from ``REQUEST``.
``CONFIRM``
    Call the agent and the updater pinned to the *new* certificates only, until
    both answer (they reload the bundle within seconds, without a restart).
``COMMIT``
    Revoke the old certificates, then make the new pins the only ones.  Both
    under the registry lock, so a decommission is strictly before or after.

The worker is never left unreachable: until ``COMMIT`` the master accepts the
old and the new certificate, and after it the worker has proved it presents
the new one.
"""

from __future__ import annotations

import datetime
import enum
import json
from collections.abc import Callable

import attrs
from cryptography import x509
from twisted.internet import task

from decnet import config, pki, replies, revocation
from decnet.clock import utc_iso
from decnet.errors import (
    BadReply,
    DecnetError,
    HostDecommissioned,
    RemoteError,
    RenewalFailed,
    ValidationError,
)
from decnet.master.enrollment import MasterState, revocation_entries
from decnet.master.http import client_for_host
from decnet.master.registry import Host, Registry
from decnet.tls import TLSIdentity

#: How long the worker's daemons get to present the new certificate (they look every
#: config.IDENTITY_RELOAD_INTERVAL seconds).
CONFIRM_TIMEOUT = 30.0
CONFIRM_INTERVAL = 0.5


class Step(enum.Enum):
    REQUEST = "requesting CSRs"
    PUSH = "pushing certificates"
    CONFIRM = "confirming"
    COMMIT = "revoking the old certificates"


def steps_for(host: Host) -> tuple[Step, ...]:
    """The steps left for ``host`` (pure): all four, or three when new pins are recorded."""
    if host.decommissioned:
        raise HostDecommissioned(f"{host.name!r} is decommissioned; there is nothing to renew")
    if not host.has_updater:
        raise RenewalFailed(
            f"{host.name!r} was enrolled without an updater, which renewal goes through; "
            "re-enroll it with --updater"
        )
    if host.renewing:
        return (Step.PUSH, Step.CONFIRM, Step.COMMIT)
    return (Step.REQUEST, Step.PUSH, Step.CONFIRM, Step.COMMIT)


def parse_days(text: str) -> int:
    """``--before 30d`` (or ``30``): a number of days, at least 0."""
    raw = text.strip().lower().removesuffix("d")
    if not raw.isdigit():
        raise ValidationError(f"--before {text!r}: give a number of days, e.g. 30d")
    return int(raw)


def expires(host: Host) -> datetime.datetime | None:
    if host.expires_at is None:
        return None
    return datetime.datetime.fromisoformat(host.expires_at)


def days_left(host: Host, now: float) -> float | None:
    """Days until the worker certificate expires (``None``: enrolled before this was recorded)."""
    end = expires(host)
    return None if end is None else (end.timestamp() - now) / 86400


def is_due(host: Host, now: float, before_days: int) -> bool:
    """Renew ``host`` now?  Within ``before_days`` of expiry, expiry unknown, or half-done."""
    if host.decommissioned:
        return False
    left = days_left(host, now)
    return host.renewing or left is None or left < before_days


def overlap_host(host: Host) -> Host:
    """``host`` as the clients see it while a renewal is pending: the new pins only."""
    return attrs.evolve(
        host,
        worker_fingerprint=host.pending_worker_fingerprint or host.worker_fingerprint,
        updater_fingerprint=host.pending_updater_fingerprint or host.updater_fingerprint,
        pending_worker_fingerprint=None,
        pending_updater_fingerprint=None,
        pending_certificates=None,
    )


#: Renewal goes through the updater, so a renewed host always has both identities.
RENEWED_ROLES = (config.ROLE_WORKER, config.ROLE_UPDATER)


def _sans_of(cert: x509.Certificate, host: Host) -> list[str]:
    """The addresses the current certificate carries (the master chose them at enrollment)."""
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [host.address]
    found = [str(ip) for ip in names.get_values_for_type(x509.IPAddress)]
    found += [d for d in names.get_values_for_type(x509.DNSName) if d != host.name]
    return [host.address, *[a for a in found if a != host.address]]


def sign(master: MasterState, host: Host, doc: dict) -> tuple[dict[str, str], str]:
    """The certificates for a worker's CSR reply, all fields the master's own; and notAfter.

    The worker's current certificate (``current``) is read only after its
    fingerprint proved it is the one the registry pins; its SANs and lifetime
    are kept.  Without it the host's address and the default lifetime are used.
    """
    addresses, days = [host.address], config.LEAF_VALIDITY_DAYS
    current = doc.get("current")
    if isinstance(current, str):
        try:
            cert = x509.load_pem_x509_certificate(current.encode("ascii"))
        except (ValueError, UnicodeEncodeError):
            raise BadReply(host.name, "the current certificate it sent is not PEM") from None
        if pki.fingerprint(cert) != host.worker_fingerprint:
            raise BadReply(host.name, "the current certificate it sent is not the pinned one")
        addresses = _sans_of(cert, host)
        days = max(1, (cert.not_valid_after_utc - cert.not_valid_before_utc).days)
    certs: dict[str, x509.Certificate] = {}
    for role in RENEWED_ROLES:
        if role not in doc["csrs"]:
            raise BadReply(host.name, f"no CSR for the {role} certificate")
        try:
            public = pki.csr_public_key(doc["csrs"][role])
        except ValidationError as exc:
            raise BadReply(host.name, f"{role} CSR refused: {exc}") from None
        certs[role] = pki.certify(
            master.ca, public, role, host.name, addresses=addresses, validity_days=days
        )
    if pki.spki(certs["worker"].public_key()) == pki.spki(certs["updater"].public_key()):
        raise BadReply(host.name, "the worker and updater CSRs share one key")
    not_after = utc_iso(certs[config.ROLE_WORKER].not_valid_after_utc.timestamp())
    return {role: pki.cert_pem(c).decode("ascii") for role, c in certs.items()}, not_after


@attrs.frozen
class Outcome:
    """How one host's renewal ended, for the CLI's table and ``--json``."""

    name: str
    result: str  # renewed, would-renew, skipped, failed
    expires_at: str | None = None
    detail: str = ""
    worker_fingerprint: str | None = None

    def as_dict(self) -> dict[str, object]:
        return attrs.asdict(self)


class Renewal:
    """Runs :func:`steps_for` for one host at a time against the real registry and worker.

    ``progress(host, step)`` is told each step as it starts (the CLI's live lines).
    """

    def __init__(
        self,
        reactor,
        master: MasterState,
        identity: TLSIdentity,
        registry: Registry,
        *,
        timeout: float = config.HTTP_TIMEOUT,
        confirm_timeout: float = CONFIRM_TIMEOUT,
        progress: Callable[[str, Step], None] = lambda _name, _step: None,
    ):
        self.reactor = reactor
        self.master = master
        self.identity = identity
        self.registry = registry
        self.timeout = timeout
        self.confirm_timeout = confirm_timeout
        self.progress = progress

    async def renew(self, name: str, *, restarted: bool = False) -> Outcome:
        host = self.registry.get(name)
        for step in steps_for(host):
            self.progress(name, step)
            try:
                host = await self._run(step, host)
            except RemoteError as exc:
                if step is not Step.PUSH or exc.status != 409 or restarted:
                    raise
                # The worker holds no key for the recorded certificates: start over.
                self.registry.abandon_renewal(host)
                return await self.renew(name, restarted=True)
        renewed = self.registry.get(name)
        return Outcome(
            name,
            "renewed",
            expires_at=renewed.expires_at,
            worker_fingerprint=renewed.worker_fingerprint,
        )

    async def _run(self, step: Step, host: Host) -> Host:
        if step is Step.REQUEST:
            return await self._request(host)
        if step is Step.PUSH:
            await self._push(host)
        elif step is Step.CONFIRM:
            await self._confirm(host)
        else:
            self._commit(host)
        return host

    def _client(self, host: Host, role: str):
        return client_for_host(self.reactor, self.identity, host, role, timeout=self.timeout)

    async def _call(self, host: Host, role: str, *args, **kwargs) -> dict:
        client = self._client(host, role)
        try:
            return await client.call(*args, timeout=self.timeout, **kwargs)
        finally:
            await client.close()

    async def _request(self, host: Host) -> Host:
        doc = await self._call(
            host, config.ROLE_UPDATER, "POST", "renew", "csr", reply=replies.RENEW_CSR
        )
        certificates, not_after = sign(self.master, host, doc)
        fingerprints = {
            role: pki.fingerprint(x509.load_pem_x509_certificate(pem.encode()))
            for role, pem in certificates.items()
        }
        record = json.dumps({"certificates": certificates, "expires_at": not_after})
        with self.registry.lock():
            return self.registry.begin_renewal(
                host, fingerprints["worker"], fingerprints["updater"], record
            )

    async def _push(self, host: Host) -> None:
        record = json.loads(host.pending_certificates or "{}")
        doc = await self._call(  # pinned to the current and the new certificate
            host,
            config.ROLE_UPDATER,
            "POST",
            "renew",
            "install",
            json={"certificates": record["certificates"]},
            reply=replies.RENEW_INSTALL,
        )
        wanted = {
            config.ROLE_WORKER: host.pending_worker_fingerprint,
            config.ROLE_UPDATER: host.pending_updater_fingerprint,
        }
        if doc["installed"] != wanted:
            raise BadReply(host.name, "the updater reports other certificates than those sent")

    async def _confirm(self, host: Host) -> None:
        """Both daemons answer over connections pinned to the new certificates only."""
        new = overlap_host(host)
        deadline = self.reactor.seconds() + self.confirm_timeout
        waiting = [config.ROLE_UPDATER, config.ROLE_WORKER]
        last = "no answer yet"
        while waiting:
            for role in list(waiting):
                try:
                    await self._call(new, role, "GET", "health", reply=_health_schema(role))
                except DecnetError as exc:
                    last = f"{role}: {exc}"
                else:
                    waiting.remove(role)
            if not waiting:
                return
            if self.reactor.seconds() >= deadline:
                raise RenewalFailed(
                    f"{host.name} did not present its new certificates within "
                    f"{self.confirm_timeout:g}s ({last}); run `decnet-admin renew {host.name}` "
                    "again: both certificates stay accepted until it does"
                )
            await task.deferLater(self.reactor, CONFIRM_INTERVAL, lambda: None)

    def _commit(self, host: Host) -> None:
        record = json.loads(host.pending_certificates or "{}")
        with self.registry.lock():
            current = self.registry.get(host.name)
            if current.worker_fingerprint == host.pending_worker_fingerprint:
                return  # another operator's `renew` committed this same renewal first
            if current.decommissioned or current.pending_worker_fingerprint is None:
                raise RenewalFailed(
                    f"{host.name!r} was decommissioned or renewed by another command meanwhile"
                )
            # Revoke first: a crash before the registry update leaves the renewal
            # pending, and the next `renew` commits it (both steps are idempotent).
            revocation.add_entries(
                self.master.paths.revocations, revocation_entries(_old_pins(current), _now())
            )
            self.registry.confirm_renewal(current, record["expires_at"])


def _now() -> str:
    return utc_iso(datetime.datetime.now(datetime.UTC).timestamp())


def _health_schema(role: str) -> replies.Schema:
    return replies.UPDATER_HEALTH if role == config.ROLE_UPDATER else replies.AGENT_HEALTH


def _old_pins(host: Host) -> Host:
    """``host`` without its pending pins: what is revoked at ``COMMIT``."""
    return attrs.evolve(
        host,
        pending_worker_fingerprint=None,
        pending_updater_fingerprint=None,
        pending_certificates=None,
    )
