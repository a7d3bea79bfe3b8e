"""Deployment engines: what turns a :class:`DeploymentSpec` into listening decoys.

:class:`IDeckyEngine` is the seam for other engines (e.g. docker compose on
hosts that have it); :class:`BuiltinEngine` — Twisted decoy services inside the
agent process — is the default and the one tested.

An engine's :meth:`~IDeckyEngine.apply` is idempotent and minimal: services
whose canonical spec is unchanged and that are listening are left alone (their
connections and counters survive), removed or changed services are stopped
first (so a changed service can take over its own port), then new, changed and
previously failed services are started.  A bind failure is a per-service
result, never an exception.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import cast

import attrs
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from decnet import config
from decnet.agent.decoys import banner, ftp, http, redis, smtp, ssh, telnet
from decnet.agent.decoys.base import ServiceRuntime, random_session_id
from decnet.agent.decoys.budget import (
    ConnectionBudget,
    TurnBudget,
    default_connection_budget,
    nofile_limit,
)
from decnet.agent.eventlog import Event
from decnet.agent.spec import DeploymentSpec, ServiceSpec
from decnet.threads import run_in_pool

# Kernel send and receive buffer of each decoy connection (Linux doubles it).
DECOY_SOCKET_BUFFER = 32 * 1024

STARTING = "starting"
LISTENING = "listening"
FAILED = "failed"


class IDeckyEngine(Interface):
    """Runs the deckies of one worker."""

    name = Attribute("short engine name, reported by GET /health")

    def apply(spec: DeploymentSpec):
        """Make the running services match ``spec``.

        Returns a Deferred firing with ``{(decky, service): result}``, where a
        result is :meth:`status`'s per-service dict plus ``action``
        (``started``, ``restarted``, ``retried``, ``unchanged``, ``removed``).
        """

    def status() -> dict:
        """``{decky: {service: {type, bind, port, state, reason, address, counters…}}}``."""

    def stop():
        """Stop every service (agent shutdown); a Deferred."""


@attrs.define
class RunningService:
    spec: ServiceSpec
    runtime: ServiceRuntime
    state: str = STARTING
    reason: str | None = None
    port: IListeningPort | None = None

    def address(self) -> str | None:
        if self.port is None:
            return None
        host = cast(IPv4Address | IPv6Address, self.port.getHost())  # a TCP endpoint's
        return f"[{host.host}]:{host.port}" if ":" in host.host else f"{host.host}:{host.port}"

    def describe(self) -> dict:
        rt = self.runtime
        return {
            "type": self.spec.type,
            "bind": self.spec.bind,
            "port": self.spec.port,
            "state": self.state,
            "reason": self.reason,
            "address": self.address(),
            "connections": rt.connections,
            "active": len(rt.active),
            "refused": rt.refused,
            "events": rt.events,
        }


def describe_bind_error(spec: ServiceSpec, exc: CannotListenError) -> str:
    code = getattr(exc.socketError, "errno", None)
    if code == errno.EADDRINUSE:
        why = "address already in use"
    elif code == errno.EACCES:
        why = "permission denied (ports below 1024 need CAP_NET_BIND_SERVICE)"
    elif code == errno.EADDRNOTAVAIL:
        why = "address not available on this host"
    elif code:
        why = os.strerror(code).lower()
    else:
        why = "cannot listen"
    where = f"[{spec.bind}]:{spec.port}" if ":" in spec.bind else f"{spec.bind}:{spec.port}"
    return f"cannot listen on {where}: {why}"


@implementer(IDeckyEngine)
class BuiltinEngine:
    """Decoys as Twisted services inside the agent (see :mod:`decnet.agent.decoys`).

    All services share one :class:`ConnectionBudget` (sockets: every listener
    and every connection) and one :class:`TurnBudget` (parsing time per
    reactor turn), so no decoy, or set of decoys, can starve the agent.
    """

    name = "builtin"
    log = Logger()

    def __init__(
        self,
        reactor,
        emit: Callable[[Event], None],
        state_dir: str | os.PathLike,
        *,
        clock=None,
        new_session_id: Callable[[], str] = random_session_id,
        host_key_loader=ssh.load_or_create_host_keys,
        connection_budget: ConnectionBudget | None = None,
        turn_budget: TurnBudget | None = None,
    ):
        self._reactor = reactor
        self.clock = clock or reactor
        self.connection_budget = connection_budget or ConnectionBudget(
            default_connection_budget(nofile_limit()), self.clock
        )
        self.turn_budget = turn_budget or TurnBudget(self.clock)
        self.emit = emit
        self.state_dir = Path(state_dir)
        self.new_session_id = new_session_id
        self.host_key_loader = host_key_loader
        self.services: dict[tuple[str, str], RunningService] = {}

    # -- IDeckyEngine --------------------------------------------------------

    async def apply(self, spec: DeploymentSpec) -> dict:
        desired = {s.key: s for s in spec.services()}
        actions = self._changes(desired)
        removed = {
            key: self.services[key].describe() for key, a in actions.items() if a == "removed"
        }
        await _gather([self._stop(key) for key in actions])
        to_start = [s for key, s in desired.items() if key not in self.services]
        for s in to_start:
            actions.setdefault(s.key, "started")
        await _gather([self._start(s) for s in to_start])
        results = {}
        for key in desired:
            results[key] = {
                "action": actions.get(key, "unchanged"),
                **self.services[key].describe(),
            }
        for key, last in removed.items():
            results[key] = {**last, "action": "removed", "state": "stopped", "address": None}
        return results

    def _changes(self, desired: dict[tuple[str, str], ServiceSpec]) -> dict[tuple[str, str], str]:
        """What happens to each running service that must stop: removed, restarted or retried."""
        actions: dict[tuple[str, str], str] = {}
        for key, running in self.services.items():
            want = desired.get(key)
            if want is None:
                actions[key] = "removed"
            elif want.digest != running.spec.digest:
                actions[key] = "restarted"
            elif running.state == FAILED:
                actions[key] = "retried"
        return actions

    def status(self) -> dict:
        out: dict[str, dict] = {}
        for (decky, name), running in sorted(self.services.items()):
            out.setdefault(decky, {})[name] = running.describe()
        return out

    async def stop(self) -> None:
        await _gather([self._stop(key) for key in list(self.services)])
        self.turn_budget.stop()
        self.connection_budget.report.stop()

    # -- one service -----------------------------------------------------------

    async def _start(self, spec: ServiceSpec) -> None:
        runtime = ServiceRuntime(
            spec,
            self.emit,
            self.clock,
            self.new_session_id,
            budget=self.connection_budget,
            turns=self.turn_budget,
        )
        running = RunningService(spec=spec, runtime=runtime)
        self.services[spec.key] = running
        try:
            factory = await self._factory_for(runtime)
            running.port = await self._endpoint(spec).listen(factory)
            self.connection_budget.add_listener()
            limit_socket_buffers(running.port)
        except CannotListenError as exc:
            running.state, running.reason = FAILED, describe_bind_error(spec, exc)
            self.log.warn(
                "Decoy {decky}/{service} failed: {reason}",
                decky=spec.decky,
                service=spec.name,
                reason=running.reason,
            )
            return
        except Exception:
            self.log.failure(
                "Decoy {decky}/{service} could not start", decky=spec.decky, service=spec.name
            )
            running.state = FAILED
            running.reason = "internal error starting the service (see the agent's log)"
            return
        running.state = LISTENING
        self.log.info(
            "Decoy {decky}/{service} ({type}) listening on {address}",
            decky=spec.decky,
            service=spec.name,
            type=spec.type,
            address=running.address(),
        )

    async def _stop(self, key: tuple[str, str]) -> None:
        running = self.services.pop(key, None)
        if running is None:
            return
        if running.port is not None:
            await defer.maybeDeferred(running.port.stopListening)
            self.connection_budget.remove_listener()
        running.runtime.drop_all()
        self.log.info("Decoy {decky}/{service} stopped", decky=key[0], service=key[1])

    def _endpoint(self, spec: ServiceSpec):
        if ipaddress.ip_address(spec.bind).version == 6:
            return TCP6ServerEndpoint(self._reactor, spec.port, interface=spec.bind)
        return TCP4ServerEndpoint(self._reactor, spec.port, interface=spec.bind)

    async def _factory_for(self, runtime: ServiceRuntime):
        kind = runtime.spec.type
        if kind == "ssh":
            key_dir = self.state_dir / config.AGENT_SSH_KEY_DIR / runtime.spec.decky
            host_keys = await run_in_pool(self._reactor, self.host_key_loader, key_dir)
            return ssh.make_factory(runtime, host_keys)
        if kind == "http":
            return http.make_factory(runtime, self._reactor)
        module = {
            "telnet": telnet,
            "ftp": ftp,
            "smtp": smtp,
            "redis": redis,
            "tcp-banner": banner,
        }[kind]
        return module.make_factory(runtime)


def limit_socket_buffers(port, size: int = DECOY_SOCKET_BUFFER) -> None:
    """Cap the kernel buffers of the connections ``port`` accepts (they inherit them).

    A decoy needs no throughput.  Without a cap, Linux grows each socket's
    receive buffer to megabytes: an attacker's connections would pin that much
    kernel memory each, and closing one would free it on the reactor thread.
    """
    sock = getattr(port, "socket", None)
    if sock is None:
        return
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, size)


async def _gather(coroutines) -> None:
    """Run coroutines concurrently; re-raise the first failure after all finished."""
    if not coroutines:
        return
    results = await defer.DeferredList(
        [defer.ensureDeferred(c) for c in coroutines], consumeErrors=True
    )
    for ok, value in results:
        if not ok:
            value.raiseException()


ENGINES = {"builtin": BuiltinEngine}
