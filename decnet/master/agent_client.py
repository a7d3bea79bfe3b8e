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

from collections.abc import Awaitable, Callable, Mapping

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from decnet import config, replies
from decnet.errors import BadReply, DecnetError
from decnet.httpclient import DEFAULT_TIMEOUT
from decnet.interfaces import IDecnetReactor
from decnet.listener.workers import LogHealth
from decnet.master import health as health_rules
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
    """One row of ``decnet-admin check``: the verdict (:mod:`decnet.master.health`) and why."""

    name: str
    address: str
    ok: bool  # the agent answered /health with status "ok"
    status: str  # the registry status recorded for the host
    detail: str
    health: dict = attrs.field(factory=dict)
    bad_reply: bool = False  # it answered, but not with a valid /health
    verdict: str = health_rules.UNREACHABLE
    problems: tuple[str, ...] = ()
    deckies: int | None = None
    failed: tuple[health_rules.FailedService, ...] = ()
    updater: health_rules.UpdaterHealth | None = None
    logs: LogHealth | None = None

    def as_dict(self) -> dict:
        return attrs.asdict(self)


log = Logger(namespace="decnet.master.agent_client")


@attrs.frozen
class Probe:
    """What ``check`` probes besides the agent's ``/health``, and the log pipeline's state."""

    status: bool = True  # ask the agent's /status for failed services
    updater: bool = True  # ask the updater's /health
    logs: Mapping[str, LogHealth] = attrs.field(factory=dict)  # by host name
    now: float = 0.0
    stale: float = 300.0


async def _ask(call: Callable[[], Awaitable[dict]]) -> tuple[dict | None, DecnetError | None]:
    try:
        return await call(), None
    except DecnetError as exc:
        return None, exc


async def _updater_health(reactor, identity, host: Host, revocations, timeout: float):
    from decnet.master.updater_client import UpdaterClient

    client = UpdaterClient(reactor, identity, host, timeout=timeout, revocations=revocations)
    try:
        return await _ask(lambda: client.health(timeout=timeout))
    finally:
        await client.close()


async def check_host(
    reactor: IDecnetReactor,
    identity: TLSIdentity,
    host: Host,
    revocations: RevocationSet | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    probe: Probe = Probe(status=False, updater=False),
) -> HealthResult:
    """Probe one host (agent, and as ``probe`` says its updater); never raises for its failures."""
    try:
        client = AgentClient(reactor, identity, host, revocations=revocations, timeout=timeout)
    except DecnetError as exc:  # decommissioned, revoked: refused before connecting
        return HealthResult(host.name, host.address, False, "unreachable", str(exc))
    try:
        asked = [_ask(client.health)]
        if probe.status:
            asked.append(_ask(client.status))
        if probe.updater and host.has_updater:
            asked.append(_updater_health(reactor, identity, host, revocations, timeout))
        answers = await defer.gatherResults(
            [defer.ensureDeferred(a) for a in asked], consumeErrors=True
        )
    finally:
        await client.close()
    return _result(host, probe, answers)


def _result(host: Host, probe: Probe, answers: list) -> HealthResult:
    (health, error), rest = answers[0], list(answers[1:])
    status, status_error = rest.pop(0) if probe.status else (None, None)
    upd_reply, upd_error = rest.pop(0) if rest else (None, None)
    updater = health_rules.updater_health(
        host.has_updater, upd_reply, None if upd_error is None else str(upd_error)
    )
    logs = probe.logs.get(host.name)
    ok = health is not None and health["status"] == "ok"
    agent_problem = None
    if error is not None:
        agent_problem = str(error)
    elif not ok:
        agent_problem = f"agent reports status {health['status']!r}"
    failed = health_rules.failed_services(status)
    verdict, problems = health_rules.verdict(
        reachable=health is not None,
        agent_problem=agent_problem,
        status_problem=None if status_error is None else str(status_error),
        failed=failed,
        updater=updater,
        log_issues=health_rules.log_problems(logs, probe.now, probe.stale),
    )
    return HealthResult(
        host.name,
        host.address,
        ok,
        "active" if ok else "unreachable",
        "; ".join(problems) or "ok",
        health or {},
        bad_reply=isinstance(error, BadReply),
        verdict=verdict,
        problems=problems,
        deckies=None if status is None else status["summary"]["deckies"],
        failed=failed,
        updater=updater if probe.updater else None,
        logs=logs,
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
    probe: Probe = Probe(status=False, updater=False),
) -> list[HealthResult]:
    """Probe every host concurrently and record each one's status in the registry.

    ``arrived(result)`` is called for each host as soon as its probe ends, so a
    caller can show it at once; a slow host (bounded by ``timeout``) never holds
    back another's result.  Returns the results in the order of ``hosts``.
    """

    async def one(host: Host) -> HealthResult:
        try:
            result = await check_host(reactor, identity, host, revocations, timeout, probe)
        except Exception:
            log.failure("Health check of {host} crashed", host=host.name)
            result = HealthResult(host.name, host.address, False, "unreachable", "internal error")
        arrived(result)
        return result

    results = await defer.gatherResults(
        [defer.ensureDeferred(one(h)) for h in hosts], consumeErrors=True
    )
    for result in results:
        await run_in_pool(reactor, registry.set_status, result.name, result.status)
    return list(results)
