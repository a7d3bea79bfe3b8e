"""What every decoy service shares: counters, sessions, event emission, limits, pacing.

A running service has one :class:`ServiceRuntime` (its spec, live counters,
the event sink and the agent-wide budgets).  Each accepted connection gets a
:class:`Session` that stamps every event with the same ``session``/``src_ip``/
``src_port``/``dst_ip``/``dst_port`` parameters, so an analyst can follow one
attacker's connection from ``connect`` to ``disconnect``.

Input flows the same way for every decoy: :class:`DecoyMixin` appends what
the transport delivers to the connection's :class:`~decnet.agent.decoys.inbox.Inbox`
and then *pumps*: it asks the protocol for one item at a time
(:meth:`DecoyMixin.next_item`: a line, a packet, a command), within the
reactor turn's budget (:class:`~decnet.agent.decoys.budget.TurnBudget`).  When
the budget is spent the connection stops reading and resumes in a later turn,
so no amount of input on any number of connections holds the reactor, and the
agent's API, for long.

Limits that keep a hostile client from hurting the worker:

* the agent-wide socket budget (:class:`~decnet.agent.decoys.budget.ConnectionBudget`)
  and ``max_connections`` per service (further connections are closed at once
  and counted as ``refused``; refusals are logged once per burst);
* ``idle_timeout``: a connection that sends nothing for that long is closed
  (reason ``idle-timeout``); ``max_lifetime``: no connection lives longer
  (reason ``lifetime-limit``), however it trickles;
* at most :data:`MAX_INPUT` bytes and :data:`MAX_COMMANDS` items per connection
  (reasons ``input-limit`` / ``command-limit``); every item counts, empty and
  degenerate ones (a blank line, ``*0``, a telnet ``IAC NOP``, an SSH
  ``IGNORE`` packet) included;
* line protocols cap a line at :data:`MAX_LINE` bytes (reason ``line-too-long``);
* a client that does not read its replies stops being read (the transport's
  write buffer pauses the decoy), and a closing connection whose replies are
  not read within :data:`CLOSE_GRACE` seconds is aborted.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from typing import Any

from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from decnet.agent.decoys.budget import (
    ConnectionBudget,
    TurnBudget,
    default_connection_budget,
    nofile_limit,
)
from decnet.agent.decoys.inbox import TOO_LONG, Inbox
from decnet.agent.eventlog import SEVERITY_INFO, SEVERITY_NOTICE, Event
from decnet.agent.spec import ServiceSpec

MAX_INPUT = 4 * 1024 * 1024
MAX_COMMANDS = 1000
# Degenerate items walked in a Python loop within one pump step: at most this
# many, so one step stays well inside a turn's slice.
RUN_STEP = 128
MAX_LINE = 8192
CLOSE_GRACE = 10.0


def random_session_id() -> str:
    return secrets.token_hex(6)


class ServiceRuntime:
    """One running decoy service: its spec, counters, live connections, sink and budgets."""

    log = Logger()

    def __init__(
        self,
        spec: ServiceSpec,
        emit: Callable[[Event], None],
        clock,
        new_session_id: Callable[[], str] = random_session_id,
        *,
        budget: ConnectionBudget | None = None,
        turns: TurnBudget | None = None,
    ):
        self.spec = spec
        self._emit = emit
        self.clock = clock
        self.new_session_id = new_session_id
        self.budget = budget or ConnectionBudget(default_connection_budget(nofile_limit()), clock)
        self.turns = turns or TurnBudget(clock)
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
        """Take a connection slot (this service's and the agent-wide one), or refuse."""
        limit = self.spec.option("max_connections")
        if len(self.active) >= limit:
            self.refused += 1
            self.budget.report.refused(
                f"{self.spec.decky}/{self.spec.name} has its max_connections={limit} connections"
            )
            return False
        if not self.budget.acquire():
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
    """Connection bookkeeping, limits and paced parsing for any decoy; first in the bases.

    Subclasses implement :meth:`next_item` (parse and handle one item from
    ``self.inbox``), call :meth:`close` with a reason instead of
    ``loseConnection`` and :meth:`count_command` for every item they handle.
    """

    runtime: ServiceRuntime
    session: Session
    inbox: Inbox
    # The transport Twisted gives the protocol this mixes into; typed loosely
    # because each decoy's base (Protocol, HTTPChannel, SSHTransportBase)
    # declares its own.
    transport: Any
    close_reason: str | None = None
    _idle_call = None
    _lifetime_call = None
    _abort_call = None
    _paced = False  # waiting for a turn of the TurnBudget; not reading
    _blocked = False  # the transport's write buffer is full; not reading
    _pumping = False
    _counted = False  # holds one slot of the agent-wide budget

    def connectionMade(self):
        self._counted = True
        self.inbox = Inbox()
        self.runtime.connections += 1
        self.runtime.active.add(self)
        self.session = Session(self.runtime, self.transport)
        self.session.event("connect")
        self.reset_idle()
        self._lifetime_call = self.runtime.clock.callLater(
            self.runtime.spec.option("max_lifetime"), self.close, "lifetime-limit"
        )
        super().connectionMade()
        if getattr(self.transport, "producer", True) is None:
            # Backpressure: when the client does not read our replies the
            # transport pauses us (pauseProducing) and we stop reading it.
            self.transport.registerProducer(self, True)

    def dataReceived(self, data: bytes):
        if self.close_reason is not None:
            return
        self.session.bytes_in += len(data)
        if self.session.bytes_in > MAX_INPUT:
            self.close("input-limit")
            return
        self.reset_idle()
        self.inbox.extend(data)
        if self._paced or self._blocked:
            # Someone else resumed reading (twisted.web does); stay paused.
            self.transport.pauseProducing()
            return
        self.pump()

    def next_item(self) -> bool:
        """Parse and handle one item from ``self.inbox``; ``False`` when none is complete."""
        raise NotImplementedError

    def pump(self) -> None:
        """Handle buffered items while this reactor turn's budget lasts."""
        if self._pumping or self._paced or self._blocked:
            return
        turns = self.runtime.turns
        timer, transport, next_item = turns.timer, self.transport, self.next_item
        started = timer()
        deadline = started + turns.slice - turns.spent
        most = turns.items
        done = 0
        self._pumping = True
        try:
            while self.close_reason is None and not transport.disconnecting:
                if done >= most or timer() >= deadline:
                    if len(self.inbox):
                        self._paced = True
                        transport.pauseProducing()
                        turns.wait(self)
                    break
                if not next_item() or self._blocked:
                    break
                done += 1
        finally:
            self._pumping = False
            self.inbox.compact()
            turns.charge(timer() - started)

    def resume_turn(self) -> None:
        """Our turn came (see :class:`~decnet.agent.decoys.budget.TurnBudget`)."""
        self._paced = False
        if self.close_reason is not None or not self._transport_open():
            return
        if not self._blocked:
            self.transport.resumeProducing()
        self.pump()

    def _transport_open(self) -> bool:
        t = self.transport
        return t is not None and getattr(t, "connected", True) and not t.disconnecting

    # IPushProducer, registered with the transport (twisted.web's channel
    # registers itself; these hooks then chain to its own).
    def pauseProducing(self):
        self._blocked = True
        parent = getattr(super(), "pauseProducing", None)
        if parent is not None:
            parent()
        else:
            self.transport.pauseProducing()

    def resumeProducing(self):
        self._blocked = False
        parent = getattr(super(), "resumeProducing", None)
        if parent is not None:
            parent()
        elif not self._paced and self._transport_open():
            self.transport.resumeProducing()
        self.pump()

    def stopProducing(self):
        parent = getattr(super(), "stopProducing", None)
        if parent is not None:
            parent()

    def connectionLost(self, reason: Failure | None = connectionDone) -> None:
        for name in ("_idle_call", "_lifetime_call", "_abort_call"):
            call = getattr(self, name)
            if call is not None and call.active():
                call.cancel()
            setattr(self, name, None)
        self.inbox.clear()
        self.runtime.active.discard(self)
        if self._counted:
            self._counted = False
            self.runtime.budget.release()
        self.session.event(
            "disconnect",
            ("reason", self.close_reason or "closed"),
            ("duration", self.session.duration()),
            ("bytes_in", self.session.bytes_in),
        )
        super().connectionLost(reason)  # type: ignore[misc]  # the protocol this precedes

    def reset_idle(self) -> None:
        timeout = self.runtime.spec.option("idle_timeout")
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.reset(timeout)
        else:
            self._idle_call = self.runtime.clock.callLater(timeout, self.close, "idle-timeout")

    def count_command(self) -> bool:
        """Count one item; ``False`` (and the connection closes) past the limit."""
        self.session.commands += 1
        if self.session.commands > MAX_COMMANDS:
            self.close("command-limit")
            return False
        return True

    def count_commands(self, n: int) -> int:
        """Count a run of ``n`` degenerate items at once; how many were within the limit."""
        before = self.session.commands
        self.session.commands += n
        if self.session.commands > MAX_COMMANDS:
            self.close("command-limit")
            return max(0, MAX_COMMANDS - before)
        return n

    def close(self, reason: str, abort: bool = False) -> None:
        """Close with ``reason`` (kept for the ``disconnect`` event): flush, then hang up.

        A peer that does not read what is still buffered is aborted after
        :data:`CLOSE_GRACE` seconds, so a closing connection never holds its
        descriptor for long.
        """
        if self.close_reason is None:
            self.close_reason = reason
        self.inbox.clear()
        transport = self.transport
        if abort:
            transport.abortConnection()
            return
        if not self._transport_open():
            return
        if getattr(transport, "producer", None) is not None:
            transport.unregisterProducer()  # or loseConnection waits for it forever
        transport.loseConnection()
        if self._abort_call is None:
            self._abort_call = self.runtime.clock.callLater(CLOSE_GRACE, transport.abortConnection)


def run_of(item: bytes, most: int = MAX_COMMANDS + 1) -> re.Pattern:
    """A pattern for a run of degenerate items like ``item``, matched and counted in one go.

    A run stops at :data:`MAX_COMMANDS` + 1 items by default: the connection
    closes there anyway, and a longer match would only cost time.
    """
    return re.compile(b"(?:%s){1,%d}" % (item, most))


# Lines with nothing but white space.
_BLANK_LINES = run_of(rb"[ \t\r\x0b\x0c]{0,1024}\n")


class LineDecoy(DecoyMixin, Protocol):
    """A line protocol decoy (FTP, SMTP): LF-terminated lines, one trailing CR stripped."""

    max_line = MAX_LINE

    def next_item(self) -> bool:
        reply = self.blank_line_reply()
        if reply is not None and (end := self.inbox.match(_BLANK_LINES)):
            # Blank lines are commands too (they count), but carry nothing to
            # record: answer the whole run at once.
            n = self.count_commands(self.inbox.count(b"\n", end))
            self.inbox.skip(end)
            if n:
                self.transport.write((reply + b"\r\n") * n)
            return True
        line = self.inbox.next_line(b"\n", self.max_line)
        if line is None:
            return False
        if line is TOO_LONG:
            self.close("line-too-long")
            return True
        if self.count_command():
            self.handle_line(line[:-1] if line.endswith(b"\r") else line)
        return True

    def blank_line_reply(self) -> bytes | None:
        """What a blank line is answered with right now; ``None``: it means something."""
        return None

    def handle_line(self, line: bytes) -> None:
        raise NotImplementedError

    def send_line(self, text: str | bytes) -> None:
        data = text.encode("utf-8") if isinstance(text, str) else text
        self.transport.write(data + b"\r\n")


class DecoyFactory(Factory):
    """Builds ``protocol`` instances bound to ``runtime``; refuses past the budgets."""

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
