"""The master's pinned client for one enrolled host: the registry's record, then the pin.

:func:`client_for_host` is the only master-specific part of talking to a
worker daemon; the transport itself, and everything it refuses, is
:class:`decnet.httpclient.PinnedClient`.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTCP, IReactorTime

from decnet import config
from decnet.errors import HostDecommissioned, PeerRefused
from decnet.httpclient import DEFAULT_TIMEOUT, PinnedClient
from decnet.master.registry import Host
from decnet.revocation import RevocationSet
from decnet.tls import Accept, TLSIdentity


def client_for_host(
    reactor: IReactorTCP,
    identity: TLSIdentity,
    host: Host,
    role: str,
    *,
    revocations: RevocationSet | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    persistent: bool = False,
    clock: IReactorTime | None = None,
) -> PinnedClient:
    """A :class:`PinnedClient` for an enrolled host's agent (``worker``) or ``updater``.

    Refuses, before any connection, a decommissioned host, a daemon enrolled
    without a certificate for ``role``, and a revoked certificate.  The peer
    must present exactly the role, CN and fingerprint recorded at enrollment,
    or, while a renewal is pending (``decnet-admin renew``), the new one.
    """
    if host.decommissioned:
        raise HostDecommissioned(
            f"{host.name!r} was decommissioned at {host.revoked_at}; refusing to contact it"
        )
    fingerprint: str | None
    if role == config.ROLE_WORKER:
        port, cn, fingerprint = host.agent_port, host.name, host.worker_fingerprint
        pending = host.pending_worker_fingerprint
    else:
        cn = config.UPDATER_CN_PREFIX + host.name
        port, fingerprint = host.updater_port, host.updater_fingerprint
        pending = host.pending_updater_fingerprint
        if not fingerprint:
            raise PeerRefused(
                f"{host.name} was enrolled without an updater certificate; "
                "refusing to connect unpinned (re-enroll with --updater)"
            )
    if revocations is not None and fingerprint in revocations:
        raise PeerRefused(f"the {role} certificate of {host.name!r} is revoked")
    return PinnedClient(
        reactor,
        identity,
        address=host.address,
        port=port,
        accept=Accept(role, cn=cn, fingerprint=fingerprint),
        timeout=timeout,
        persistent=persistent,
        clock=clock,
        also=[Accept(role, cn=cn, fingerprint=pending)] if pending else [],
    )
