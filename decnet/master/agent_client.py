"""The master's client for one worker agent, and the fleet-wide health check.

:class:`AgentClient` sends ``health`` / ``status`` / ``deploy`` / ``teardown``
over mutual TLS with the master identity.  The worker must present a
certificate from our CA, with the ``worker`` role, the host's name as CN and
the fingerprint recorded at enrollment — checked by the verify callback inside
the handshake of the very connection that carries the request
(:class:`decnet.httpclient.PinnedClient`).  A decommissioned or revoked host
is refused before any connection is attempted.

Every reply is checked against its schema (:mod:`decnet.replies`)
before it is returned, within one deadline per request and without following
redirects (:mod:`decnet.httpclient`).  Errors are typed (:mod:`decnet.errors`):
``Unreachable``, ``FingerprintMismatch``, ``PeerRefused``, ``RemoteError``
(with the agent's own problem list), ``BadReply``, ``HostDecommissioned``.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from decnet import config, replies
from decnet.errors import BadReply, DecnetError
from decnet.httpclient import DEFAULT_TIMEOUT
from decnet.interfaces import IDecnetReactor
from decnet.master.http import client_for_host
from decnet.master.registry import Host, Registry
from decnet.revocation import RevocationSet
from decnet.threads import run_in_pool
from decnet.tls import TLSIdentity

DEPLOY_TIMEOUT = config.AGENT_DEPLOY_TIMEOUT


class AgentClient:
    """Commands for the agent of one enrolled ``host``."""

    def __init__(
        self,
        reactor,
        identity: TLSIdentity,
        host: Host,
        *,
        revocations: RevocationSet | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        persistent: bool = False,
        clock=None,
    ):
        self.host = host
        self._http = client_for_host(
            reactor,
            identity,
            host,
            config.ROLE_WORKER,
            revocations=revocations,
            timeout=timeout,
            persistent=persistent,
            clock=clock,
        )

    async def health(self) -> dict:
        """``{"status", "host", "version", "release", "engine", "uptime"}``."""
        return await self._http.call("GET", "health", reply=replies.AGENT_HEALTH)

    async def status(self) -> dict:
        """The deployed spec, its hash, and per decky/service live state and counters."""
        return await self._http.call("GET", "status", reply=replies.AGENT_STATUS)

    async def deploy(self, spec: dict, timeout: float = DEPLOY_TIMEOUT) -> dict:
        """Send a spec; returns per-service results once listeners are bound."""
        return await self._http.call(
            "POST", "deploy", json=spec, timeout=timeout, reply=replies.AGENT_APPLY
        )

    async def teardown(self, decky: str | None = None, timeout: float = DEPLOY_TIMEOUT) -> dict:
        """Stop ``decky`` (everything when ``None``); ``RemoteError`` 404 if it is unknown."""
        body = {"decky": decky} if decky is not None else {}
        return await self._http.call(
            "POST", "teardown", json=body, timeout=timeout, reply=replies.AGENT_APPLY
        )

    async def close(self) -> None:
        await self._http.close()


@attrs.frozen
class HealthResult:
    """One row of ``decnet-admin check``."""

    name: str
    address: str
    ok: bool
    status: str  # the registry status recorded for the host
    detail: str
    health: dict = attrs.field(factory=dict)
    bad_reply: bool = False  # it answered, but not with a valid /health

    def as_dict(self) -> dict:
        return attrs.asdict(self)


log = Logger(namespace="decnet.master.agent_client")


async def check_host(
    reactor: IDecnetReactor,
    identity: TLSIdentity,
    host: Host,
    revocations: RevocationSet | None = None,
    timeout: float = DEFAULT_TIMEOUT,
):
    """Probe one host's ``/health``; never raises for an expected failure."""
    try:
        client = AgentClient(reactor, identity, host, revocations=revocations, timeout=timeout)
        try:
            health = await client.health()
        finally:
            await client.close()
    except BadReply as exc:
        return HealthResult(host.name, host.address, False, "unreachable", str(exc), bad_reply=True)
    except DecnetError as exc:  # Unreachable, PeerRefused, RemoteError, HostDecommissioned
        return HealthResult(host.name, host.address, False, "unreachable", str(exc))
    ok = health["status"] == "ok"
    detail = "ok" if ok else f"agent reports status {health['status']!r}"
    return HealthResult(
        host.name, host.address, ok, "active" if ok else "unreachable", detail, health
    )


async def check_hosts(
    reactor,
    identity: TLSIdentity,
    registry: Registry,
    hosts: list[Host],
    *,
    revocations: RevocationSet | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    arrived: Callable[[HealthResult], None] = lambda result: None,
) -> list[HealthResult]:
    """Probe every host concurrently and record each one's status in the registry.

    ``arrived(result)`` is called for each host as soon as its probe ends, so a
    caller can show it at once; a slow host (bounded by ``timeout``) never holds
    back another's result.  Returns the results in the order of ``hosts``.
    """

    async def probe(host: Host) -> HealthResult:
        try:
            result = await check_host(reactor, identity, host, revocations, timeout)
        except Exception:
            log.failure("Health check of {host} crashed", host=host.name)
            result = HealthResult(host.name, host.address, False, "unreachable", "internal error")
        arrived(result)
        return result

    results = await defer.gatherResults(
        [defer.ensureDeferred(probe(h)) for h in hosts], consumeErrors=True
    )
    for result in results:
        await run_in_pool(reactor, registry.set_status, result.name, result.status)
    return list(results)
