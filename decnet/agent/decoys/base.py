"""What every decoy service shares: counters, sessions, event emission, limits.

A running service has one :class:`ServiceRuntime` (its spec, live counters and
the event sink).  Each accepted connection gets a :class:`Session` that stamps
every event with the same ``session``/``src_ip``/``src_port``/``dst_ip``/
``dst_port`` parameters, so an analyst can follow one attacker's connection
from ``connect`` to ``disconnect``.

Limits that keep a hostile client from hurting the worker:

* ``max_connections`` per service (further connections are closed at once and
  counted as ``refused``);
* ``idle_timeout``: a connection that sends nothing for that long is closed
  (reason ``idle-timeout``);
* at most :data:`MAX_INPUT` bytes and :data:`MAX_COMMANDS` commands per
  connection (reasons ``input-limit`` / ``command-limit``);
* line protocols cap a line at :data:`MAX_LINE` bytes (reason ``line-too-long``).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver

from decnet.agent.eventlog import SEVERITY_INFO, SEVERITY_NOTICE, Event
from decnet.agent.spec import ServiceSpec

MAX_INPUT = 4 * 1024 * 1024
MAX_COMMANDS = 1000
MAX_LINE = 8192


def random_session_id() -> str:
    return secrets.token_hex(6)


class ServiceRuntime:
    """One running decoy service: its spec, counters, live connections and event sink."""

    log = Logger()

    def __init__(
        self,
        spec: ServiceSpec,
        emit: Callable[[Event], None],
        clock,
        new_session_id: Callable[[], str] = random_session_id,
    ):
        self.spec = spec
        self._emit = emit
        self.clock = clock
        self.new_session_id = new_session_id
        self.connections = 0
        self.refused = 0
        self.events = 0
        self.active: set = set()

    def event(self, kind: str, params, severity: int = SEVERITY_INFO) -> None:
        self.events += 1
        self._emit(
            Event(
                decky=self.spec.decky,
                service=self.spec.type,
                kind=kind,
                params=tuple(params),
                severity=severity,
            )
        )

    def admit(self) -> bool:
        if len(self.active) >= self.spec.option("max_connections"):
            self.refused += 1
            return False
        return True

    def drop_all(self) -> None:
        """Abort every live connection (the service is being stopped)."""
        for proto in list(self.active):
            proto.close("service-stopped", abort=True)


class Session:
    """The per-connection identity stamped on every event of that connection."""

    def __init__(self, runtime: ServiceRuntime, transport):
        self.runtime = runtime
        self.id = runtime.new_session_id()
        peer, host = transport.getPeer(), transport.getHost()
        self.base = (
            ("session", self.id),
            ("src_ip", getattr(peer, "host", "?")),
            ("src_port", getattr(peer, "port", 0)),
            ("dst_ip", getattr(host, "host", "?")),
            ("dst_port", getattr(host, "port", 0)),
        )
        self.started = runtime.clock.seconds()
        self.bytes_in = 0
        self.commands = 0

    def event(self, kind: str, *params, severity: int = SEVERITY_INFO) -> None:
        self.runtime.event(kind, self.base + params, severity)

    def login(self, *params) -> None:
        """A credential attempt (always refused): severity notice."""
        self.event("login", *params, ("result", "refused"), severity=SEVERITY_NOTICE)

    def duration(self) -> str:
        return f"{max(0.0, self.runtime.clock.seconds() - self.started):.3f}"


class DecoyMixin:
    """Connection bookkeeping for any decoy protocol; put it first in the bases.

    Subclasses call :meth:`close` with a reason instead of ``loseConnection``
    and :meth:`count_command` for every command they handle.
    """

    runtime: ServiceRuntime
    session: Session
    close_reason: str | None = None
    _idle_call = None

    def connectionMade(self):
        self.runtime.connections += 1
        self.runtime.active.add(self)
        self.session = Session(self.runtime, self.transport)
        self.session.event("connect")
        self.reset_idle()
        super().connectionMade()

    def dataReceived(self, data: bytes):
        if self.close_reason is not None:
            return
        self.session.bytes_in += len(data)
        if self.session.bytes_in > MAX_INPUT:
            self.close("input-limit")
            return
        self.reset_idle()
        super().dataReceived(data)

    def connectionLost(self, reason):
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None
        self.runtime.active.discard(self)
        self.session.event(
            "disconnect",
            ("reason", self.close_reason or "closed"),
            ("duration", self.session.duration()),
            ("bytes_in", self.session.bytes_in),
        )
        super().connectionLost(reason)

    def reset_idle(self) -> None:
        timeout = self.runtime.spec.option("idle_timeout")
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.reset(timeout)
        else:
            self._idle_call = self.runtime.clock.callLater(timeout, self.close, "idle-timeout")

    def count_command(self) -> bool:
        """Count one command; ``False`` (and the connection closes) past the limit."""
        self.session.commands += 1
        if self.session.commands > MAX_COMMANDS:
            self.close("command-limit")
            return False
        return True

    def close(self, reason: str, abort: bool = False) -> None:
        if self.close_reason is None:
            self.close_reason = reason
        if isinstance(self, LineReceiver):
            self.clearLineBuffer()
        if abort:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()


class LineDecoy(DecoyMixin, LineReceiver):
    """A CRLF line protocol decoy (FTP, SMTP)."""

    # Split on LF and strip one trailing CR: clients that send bare LF work too.
    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE

    def lineLengthExceeded(self, line):
        self.close("line-too-long")

    def lineReceived(self, line: bytes):
        if self.close_reason is not None:
            return
        if not self.count_command():
            return
        self.handle_line(line[:-1] if line.endswith(b"\r") else line)

    def handle_line(self, line: bytes) -> None:
        raise NotImplementedError

    def send_line(self, text: str | bytes) -> None:
        data = text.encode("utf-8") if isinstance(text, str) else text
        self.transport.write(data + b"\r\n")


class DecoyFactory(Factory):
    """Builds ``protocol`` instances bound to ``runtime``; refuses past max_connections."""

    noisy = False

    def __init__(self, runtime: ServiceRuntime, protocol):
        self.runtime = runtime
        self.protocol = protocol

    def buildProtocol(self, addr):
        if not self.runtime.admit():
            return None
        proto = self.protocol()
        proto.factory = self
        proto.runtime = self.runtime
        return proto


def split_command(line: bytes) -> tuple[str, bytes]:
    """``(VERB upper-cased, rest)`` of a command line; the verb is capped at 16 bytes."""
    verb, _, rest = line.strip().partition(b" ")
    return verb[:16].decode("ascii", "replace").upper(), rest
