"""Decoys in memory: the real engine and services on a memory reactor, one turn at a time.

Connections are ``StringTransport`` pairs: what the client sends is fed to the
decoy's protocol, what the decoy writes is read back from the transport, and a
hang-up is delivered as the connection's loss.  Time is the reactor's clock,
advanced by the test; nothing waits on a real socket or on the wall clock.
"""

from __future__ import annotations

import itertools

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.python.failure import Failure

from decnet.agent.decoys import banner, ftp, http, redis, smtp, ssh, telnet
from decnet.agent.decoys.base import ServiceRuntime
from decnet.agent.decoys.budget import ConnectionBudget, TurnBudget
from decnet.agent.engine import BuiltinEngine
from decnet.agent.eventlog import SEVERITY_INFO, SEVERITY_NOTICE, Event, format_event
from decnet.agent.spec import parse_spec
from tests.support import counter_ids

# The moment every in-memory event happens at (2026-01-02T03:04:05.25Z).
NOW = 1767323045.25
CLIENT = "203.0.113.7"


class TurnClock(Clock):
    """A Clock whose ``advance`` runs what is due, not what that schedules for "now".

    That is one reactor iteration: calls made with ``callLater(0)`` during it
    run in the next one (Twisted's ``runUntilCurrent`` works the same way).
    """

    def advance(self, amount):
        self.rightNow += amount
        self._sortCalls()
        for call in [c for c in self.calls if c.getTime() <= self.seconds()]:
            if call in self.calls:
                self.calls.remove(call)
                call.called = 1
                call.func(*call.args, **call.kw)


class _InlinePool:
    """A thread pool that runs the work at once, on the caller's thread."""

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
        try:
            result = f(*args, **kwargs)
        except Exception:
            on_result(False, Failure())
        else:
            on_result(True, result)


class TurnReactor(MemoryReactor, TurnClock):
    """A memory reactor (listens are recorded, nothing binds) on a :class:`TurnClock`."""

    def __init__(self, now: float = NOW):
        MemoryReactor.__init__(self)
        TurnClock.__init__(self)
        self.rightNow = now
        self._pool = _InlinePool()

    def getThreadPool(self):
        return self._pool

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


class Connected:
    """One client connection to a decoy factory, over a ``StringTransport``."""

    def __init__(self, factory, clock, turns, *, client_port=40000, server_port=2222):
        self.clock = clock
        self.turns = turns
        self.client_port, self.server_port = client_port, server_port
        self.sent = 0
        self.lost = False
        peer = IPv4Address("TCP", CLIENT, client_port)
        self.proto = factory.buildProtocol(peer)
        self.transport = StringTransport(
            hostAddress=IPv4Address("TCP", "192.0.2.1", server_port), peerAddress=peer
        )
        if self.proto is None:  # refused: the port closes it at once
            self.lost = True
            return
        self.proto.makeConnection(self.transport)

    @property
    def refused(self) -> bool:
        return self.proto is None

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting or self.transport.disconnected

    def received(self) -> bytes:
        return self.transport.value()

    def settle(self) -> None:
        """Run reactor turns until this connection reads again (or closed)."""
        while self.transport.producerState == "paused" and self.turns.waiting:
            self.clock.advance(0)

    def feed(self, data: bytes, chunk: int | None = None) -> None:
        """Deliver ``data`` like a TCP transport: never while reading is paused."""
        self.sent += len(data)
        chunk = chunk or max(1, len(data))
        for i in range(0, len(data), chunk):
            self.settle()
            if self.closed:
                return
            self.proto.dataReceived(data[i : i + chunk])
        self.settle()

    def lose(self) -> None:
        """The connection is gone (the client hung up, or the decoy's close went through)."""
        if not self.lost:
            self.lost = True
            self.proto.connectionLost(Failure(ConnectionDone()))

    def hang_up_if_closed(self) -> None:
        """What TCP does after the decoy closed: the connection is lost."""
        if self.closed:
            self.lose()


class Conn(Connected):
    """One decoy connection over a StringTransport, its service and budgets on a Clock."""

    def __init__(self, kind, host_keys=None, *, turns=None, clock=None, budget=None, **options):
        clock = clock or TurnClock()
        self.events = []
        service = {"type": kind, "bind": "127.0.0.1", "port": 0 if kind != "tcp-banner" else 9}
        spec = parse_spec({"deckies": [{"name": "d1", "services": [service | options]}]})
        # A timer that never advances: only the per-turn item quota paces, so
        # the counts below do not depend on the machine's speed.
        turns = turns or TurnBudget(clock, timer=lambda: 0.0)
        self.budget = budget or ConnectionBudget(10_000, clock)
        self.runtime = ServiceRuntime(
            spec.services()[0],
            self.events.append,
            clock,
            budget=self.budget,
            turns=turns,
        )
        if kind == "ssh":
            factory = ssh.make_factory(self.runtime, host_keys)
        elif kind == "http":
            factory = http.make_factory(self.runtime, clock)
        else:
            module = {"telnet": telnet, "ftp": ftp, "smtp": smtp, "redis": redis}
            factory = module.get(kind, banner).make_factory(self.runtime)
        super().__init__(factory, clock, turns)

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]

    def reason(self) -> str:
        self.lose()
        last = self.events[-1]
        assert last.kind == "disconnect"
        return dict(last.params)["reason"]

    @property
    def commands(self) -> int:
        return self.proto.session.commands


class MemoryDecoys:
    """The real :class:`BuiltinEngine` on a :class:`TurnReactor`; its events kept in a list."""

    def __init__(self, state_dir, **engine_kw):
        self.reactor = TurnReactor()
        self.events: list[Event] = []
        # Paced by the per-turn item quota only, never by how fast this machine parses.
        engine_kw.setdefault("turn_budget", TurnBudget(self.reactor, timer=lambda: 0.0))
        self.engine = BuiltinEngine(
            self.reactor,
            self.events.append,
            state_dir,
            new_session_id=counter_ids(),
            **engine_kw,
        )
        self._client_ports = itertools.count(40001)

    def deploy(self, *services, decky: str = "web-01") -> dict:
        spec = parse_spec({"deckies": [{"name": decky, "services": list(services)}]})
        d = defer.ensureDeferred(self.engine.apply(spec))
        outcome: list = []
        d.addBoth(outcome.append)
        self.reactor.advance(0)
        (result,) = outcome  # nothing in apply() waits on I/O here
        if isinstance(result, Failure):
            result.raiseException()
        return result

    def factory(self, name: str, decky: str = "web-01"):
        port = self.engine.services[(decky, name)].port.getHost().port
        return next(f for p, f, _, _ in reversed(self.reactor.tcpServers) if p == port), port

    def connect(self, name: str, decky: str = "web-01") -> Connected:
        factory, port = self.factory(name, decky)
        return Connected(
            factory,
            self.reactor,
            self.engine.turn_budget,
            client_port=next(self._client_ports),
            server_port=port,
        )

    def runtime(self, name: str, decky: str = "web-01") -> ServiceRuntime:
        return self.engine.services[(decky, name)].runtime

    def lines(self) -> list[bytes]:
        return [format_event(e, self.reactor.seconds()) for e in self.events]

    def expect(self, service, kind, session, conn: Connected, *params, sev=None) -> bytes:
        """The event line ``conn``'s session should have produced."""
        base = (
            ("session", session),
            ("src_ip", CLIENT),
            ("src_port", conn.client_port),
            ("dst_ip", "192.0.2.1"),
            ("dst_port", conn.server_port),
        )
        if kind == "login":
            params = (*params, ("result", "refused"))
            sev = SEVERITY_NOTICE
        event = Event("web-01", service, kind, base + params, sev or SEVERITY_INFO)
        return format_event(event, self.reactor.seconds())

    def stop(self) -> None:
        d = defer.ensureDeferred(self.engine.stop())
        self.reactor.advance(0)
        assert d.called
