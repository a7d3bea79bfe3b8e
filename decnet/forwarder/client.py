"""The forwarder's connection protocol and the shell that runs its delivery core.

:class:`Shipper` outlives connections: it feeds events to the sans-IO
:class:`~decnet.forwarder.core.DeliveryCore` and carries out the commands it
returns.  Tailer and journal calls block, so they run in one thread lane, one
at a time and in order (:func:`decnet.threads.serial_runner`); frames go to whatever
connection is current, and the shipper is that connection's streaming
producer (the core stops reading while the TLS transport is full).
:class:`ForwarderProtocol` is one connection: it picks the mode from ALPN and
turns the listener's RESUME / ACK / ERROR frames into core events.
"""

from __future__ import annotations

from typing import Any

import attrs
from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from decnet import config
from decnet.forwarder import core
from decnet.forwarder.offsets import JournalStore
from decnet.forwarder.rendezvous import Listener, ListenerChoice
from decnet.forwarder.tail import Tailer
from decnet.pki import format_listener
from decnet.syslog import ackproto
from decnet.syslog.framing import FramingError, OctetCountingDecoder
from decnet.tls import PeerCertificateRefused, tls_error_text

# The listener only sends small control frames.
CONTROL_MAX_FRAME = 4096
# After a failed journal commit (disk full?), try again this much later.
PERSIST_RETRY = 1.0

MODES = ("auto", "ack", "plain")
# How long a connection being handed back may wait for the ACK of what it sent.
DRAIN_GRACE = 30.0


@implementer(IPushProducer)
class Shipper:
    """Carries out the delivery core's commands; see the module docstring."""

    log = Logger()

    def __init__(
        self, delivery: core.DeliveryCore, tailer: Tailer, store: JournalStore, clock, run
    ):
        self.core = delivery
        self.tailer = tailer
        self.store = store
        self.clock = clock
        self.run = run
        self.proto: ForwarderProtocol | None = None
        self._persist_busy: defer.Deferred | None = None
        self._retry = None

    # -- events in -------------------------------------------------------

    def attach(self, proto: ForwarderProtocol, mode: str, moves: bool = False) -> None:
        self.proto = proto
        proto.transport.registerProducer(self, True)
        self.execute(self.core.connected(mode, moves))

    def drain(self) -> None:
        """Close the connection once everything sent is acknowledged (see ``core.drain``)."""
        self.execute(self.core.drain())

    def detach(self, proto: ForwarderProtocol) -> None:
        if self.proto is not proto:
            return
        self.proto = None
        if not proto.lost:
            proto.transport.unregisterProducer()
        self.execute(self.core.disconnected())

    def resume(self, offset: int) -> None:
        self.execute(self.core.resume(offset))

    def acked_to(self, offset: int) -> None:
        self.execute(self.core.ack(offset))

    def notify(self) -> None:
        """The file may have changed (inotify or the poll timer)."""
        self.execute(self.core.notify())

    # IPushProducer: the TLS transport's flow control.
    def pauseProducing(self):
        self.execute(self.core.paused_producing())

    def resumeProducing(self):
        proto = self.proto
        if proto is not None and proto.master_closed_tls():
            # Twisted's TCP transport finishes a close only once its producer
            # is gone, and TLS does not tell us the master closed: we learn it
            # here, when the drained transport wakes us.  Let go, or the
            # connection hangs for ever with nobody reading it.
            proto.close()
            return
        self.execute(self.core.resumed_producing())

    def stopProducing(self):
        self.execute(self.core.paused_producing())

    # -- commands out ----------------------------------------------------

    def execute(self, commands: list[core.Command]) -> None:
        for command in commands:
            getattr(self, "_do_" + type(command).__name__)(command)

    def _do_Send(self, command: core.Send) -> None:
        if self.proto is not None and not self.proto.lost:
            self.proto.transport.writeSequence(command.frames)

    def _do_Close(self, command: core.Close) -> None:
        if self.proto is not None:
            self.proto.abandon(command.reason)

    def _do_DeclareGap(self, command: core.DeclareGap) -> None:
        self.log.warn(
            "Bytes {start}-{end} of stream {stream} are gone on this worker (a rotated file "
            "was deleted or compressed before it was shipped); the master records the gap",
            start=command.start,
            end=command.end,
            stream=self.core.stream,
        )

    def _tailer_job(self, job, done, *args) -> None:
        d = self.run(job, *args)
        d.addCallback(lambda result: self.execute(done(*result)))
        d.addErrback(self.log.failure, "Forwarder step {job} failed", job=job.__name__)

    def _do_Read(self, command: core.Read) -> None:
        def read(now):
            return self.tailer.read(now), self.tailer.take_records(), self.tailer.file_end

        def failed(failure):
            self.execute(self.core.read_failed())
            self.log.failure(
                "Reading {path} failed; retrying on the next poll",
                failure,
                path=str(self.tailer.path),
            )

        d = self.run(read, self.clock.seconds())
        d.addCallbacks(lambda r: self._read_done(r, command.epoch), failed)
        d.addErrback(self.log.failure, "Shipping loop failed")

    def _read_done(self, result: tuple, epoch: int) -> None:
        pieces, records, end = result
        self.execute(self.core.read_done(pieces, records, epoch))
        self._report_end(end)

    def _report_end(self, end: int) -> None:
        """The tailer saw the files reach ``end``: the core may send a STATUS."""
        self.execute(self.core.file_end(end, self.clock.seconds()))

    def _do_Observe(self, command: core.Observe) -> None:
        def observe(now):
            self.tailer.observe(now)
            return self.tailer.take_records(), self.tailer.file_end

        def observed(result: tuple) -> None:
            records, end = result
            self.execute(self.core.observed(records))
            self._report_end(end)

        d = self.run(observe, self.clock.seconds())
        d.addCallback(observed)
        d.addErrback(self.log.failure, "Forwarder step {job} failed", job="observe")

    def _do_Rewind(self, command: core.Rewind) -> None:
        def rewind(offset):
            return self.tailer.rewind(offset), self.tailer.take_records(), command.epoch

        self._tailer_job(rewind, self.core.rewound, command.offset)

    def _do_Release(self, command: core.Release) -> None:
        def release(offset):
            self.tailer.release(offset)
            return (self.tailer.take_records(),)

        self._tailer_job(release, self.core.released, command.offset)

    def _do_Persist(self, command: core.Persist) -> None:
        def commit():
            self.store.commit(self.core.stream, acked=command.acked, records=command.records)

        def failed(failure):
            self.log.failure(
                "Cannot record the forwarder's position in {state}; retrying",
                failure,
                state=str(self.store.path),
            )
            self.execute(self.core.persist_failed(command.acked, command.records))
            self._retry = self.clock.callLater(PERSIST_RETRY, self._retry_persist)

        d = self.run(commit)
        self._persist_busy = d
        d.addCallbacks(
            lambda _: self.execute(self.core.persisted(command.acked, command.token)), failed
        )
        d.addErrback(self.log.failure, "Recording the forwarder position failed")

    def _retry_persist(self) -> None:
        self._retry = None
        self.execute(self.core.retry_persist())

    def flush(self) -> defer.Deferred:
        """Fires once every journal write asked for so far is done (or failed)."""
        busy = self._persist_busy
        if busy is None or busy.called:
            return defer.succeed(None)
        waiter: defer.Deferred = defer.Deferred()

        def check(result):
            self.flush().chainDeferred(waiter)
            return result

        busy.addBoth(check)
        return waiter

    def stop(self) -> None:
        if self._retry is not None and self._retry.active():
            self._retry.cancel()


@implementer(IHandshakeListener)
class ForwarderProtocol(Protocol):
    """One connection to the master (or a stock RFC 5425 receiver)."""

    log = Logger()
    # A TLS transport: also the consumer the shipper produces into.
    transport: Any

    def __init__(self, factory: ForwarderFactory):
        self.factory = factory
        assert factory.shipper is not None, "connections start once the journal is read"
        self.shipper: Shipper = factory.shipper
        self.mode: str | None = None
        self.refusal: str | None = None  # why we closed it before it carried anything
        self.lost = False
        self.decoder = OctetCountingDecoder(CONTROL_MAX_FRAME)

    def connectionMade(self):
        tcp = getattr(self.transport, "transport", None)
        if tcp is not None and hasattr(tcp, "setTcpKeepAlive"):
            tcp.setTcpKeepAlive(True)

    def handshakeCompleted(self):
        alpn = getattr(self.transport, "negotiatedProtocol", None)
        wanted = self.factory.mode
        if alpn in (config.ACK_ALPN, config.ACK_ALPN_MOVES):
            self.mode = core.ACK
            self.factory.connected(self, "acknowledged")
            self.shipper.attach(self, core.ACK, moves=alpn == config.ACK_ALPN_MOVES)
        elif wanted == "ack":
            # Counted once, as the attempt's failure, when the connection is gone.
            self.refusal = "the receiver does not speak decnet-syslog/1 and --mode is ack"
            self.close()
        else:
            self.mode = core.PLAIN
            self.factory.connected(self, "plain RFC 5425")
            self.shipper.attach(self, core.PLAIN)

    def dataReceived(self, data):
        if self.mode != "ack":
            return  # RFC 5425 receivers send nothing; ignore whatever a stock peer says
        try:
            frames = self.decoder.feed(data)
        except FramingError as exc:
            self.abandon(f"bad framing from the master: {exc}")
            return
        for frame in frames:
            try:
                message = ackproto.decode(frame)
            except ackproto.ProtocolError as exc:
                self.abandon(f"bad message from the master: {exc}")
                return
            if isinstance(message, ackproto.Ack):
                self.shipper.acked_to(message.offset)
            elif isinstance(message, ackproto.Resume):
                self.factory.admitted()
                self.log.info(
                    "Master resumes stream {stream} at offset {offset}",
                    stream=self.factory.stream,
                    offset=message.offset,
                )
                self.shipper.resume(message.offset)
            elif isinstance(message, ackproto.Error):
                self._refused_status(message.reason)
                self.abandon(f"master refused: {message.reason}")
                return
            else:
                self.abandon(f"unexpected {type(message).__name__} from the master")
                return

    def master_closed_tls(self) -> bool:
        """Whether the master has sent its TLS close_notify."""
        handle = self.transport.getHandle() if self.transport is not None else None
        return handle is not None and bool(handle.get_shutdown() & SSL.RECEIVED_SHUTDOWN)

    def _refused_status(self, reason: str) -> None:
        """A listener older than STATUS refuses ``S``: the next connections go without it."""
        if ackproto.UNKNOWN_STATUS in reason and self.shipper.core.status_supported:
            self.log.warn(
                "The master's listener predates STATUS messages; not sending them (log lag "
                "stays unknown there until the listener is upgraded, see docs/Logging.md)"
            )
            self.shipper.execute(self.shipper.core.status_refused())

    def abandon(self, reason: str) -> None:
        if reason == core.DRAINED:
            self.log.info(
                "Closing the connection to {target}: {reason}",
                target=self.factory.target,
                reason=reason,
            )
        else:
            self.log.warn("Closing the connection to the master: {reason}", reason=reason)
        self.close()

    def close(self) -> None:
        """Close gracefully.  A TLS transport with a registered producer never
        sends its close_notify, so the shipper lets go of it first."""
        self.shipper.detach(self)
        self.transport.loseConnection()

    def connectionLost(self, reason):
        self.lost = True
        self.shipper.detach(self)
        self.factory.disconnected(self, reason)


class ForwarderFactory(Factory):
    """Builds :class:`ForwarderProtocol`; logs each connection state change once."""

    log = Logger()
    noisy = False

    def __init__(
        self,
        shipper: Shipper | None,
        *,
        stream: str,
        mode: str,
        target: str,
        choice: ListenerChoice | None = None,
        clock: IReactorTime | None = None,
    ):
        self.shipper = shipper
        self.stream = stream
        self.mode = mode
        self.target = target
        # Several listeners: where the next attempt goes, and the timer that hands a
        # connection to a non-preferred listener back (``clock`` is then required).
        self.choice = choice
        self.clock = clock
        self._return_call: IDelayedCall | None = None
        self._drain_call: IDelayedCall | None = None
        self._returning = False
        self.moves = 0
        self.state = "connecting"
        # Told (state, detail) on every change: systemd's STATUS line, for one.
        self.state_listeners: list = []
        self._last_failure: str | None = None
        self._failures = 0
        self._refusals = RefusalStreak()
        self.current: ForwarderProtocol | None = None

    def _set_state(self, state: str, detail: str) -> None:
        self.state = state
        for listener in self.state_listeners:
            listener(state, detail)

    def buildProtocol(self, addr):
        proto = ForwarderProtocol(self)
        proto.factory = self
        return proto

    def connected(self, proto: ForwarderProtocol, mode: str) -> None:
        self.current = proto
        if self._refusals.reported:
            # TLS 1.3: the client's handshake ends before the master has judged our
            # certificate; a worker known to be refused is not "connected" yet.
            return
        self.log.info(
            "Connected to {target} ({mode}){after}",
            target=self.target,
            mode=mode,
            after=f" after {self._failures} failed attempts" if self._failures else "",
        )
        self._last_failure, self._failures = None, 0
        self._set_state("connected", f"shipping to {self.target} ({mode})")
        if self.choice is not None and self.choice.connected() and self.clock is not None:
            self._return_call = self.clock.callLater(
                self.choice.return_after, self._return_to_preferred
            )

    def _return_to_preferred(self) -> None:
        """Time to go back to the preferred listener: hand this connection back."""
        self._return_call = None
        if self.current is None or self.shipper is None or self.choice is None:
            return
        self._returning = True
        if self.clock is not None:
            self._drain_call = self.clock.callLater(DRAIN_GRACE, self._drain_expired)
        self.log.info(
            "Returning to the preferred listener {preferred}: closing {target} once "
            "everything sent to it is acknowledged",
            preferred=_spelled(self.choice.preferred),
            target=self.target,
        )
        self.shipper.drain()

    def _drain_expired(self) -> None:
        """The listener did not acknowledge what was sent within the grace: close anyway
        (it may then hold bytes the next listener receives again; nothing is lost)."""
        self._drain_call = None
        if self.current is not None:
            self.current.abandon(
                f"no acknowledgement within {DRAIN_GRACE:g}s of handing the connection back"
            )

    def _cancel_return(self) -> None:
        for call in (self._return_call, self._drain_call):
            if call is not None and call.active():
                call.cancel()
        self._return_call = self._drain_call = None

    def _move(self, before: Listener, after: Listener, reason: str) -> None:
        self.target = _spelled(after)
        if before == after:
            return
        self.moves += 1
        self.log.warn(
            "Moving from {source} to {destination}: {reason}",
            source=_spelled(before),
            destination=self.target,
            reason=reason,
        )

    def admitted(self) -> None:
        """The master accepted this worker (it answered our HELLO): refusals are over."""
        self._refusals = RefusalStreak()

    def disconnected(self, proto: ForwarderProtocol, reason) -> None:
        if proto.mode is None:
            self.failed_attempt(proto.refusal or _handshake_failure(reason))
            return
        if self.current is proto:
            self.current = None
        self._cancel_return()
        alert = refusal_alert(reason)
        if alert is not None and self._refused(f"TLS handshake failed: {alert}"):
            return
        self.log.warn(
            "Disconnected from {target}: {reason}; reconnecting",
            target=self.target,
            reason=reason.getErrorMessage(),
        )
        if self.choice is not None:
            was = self.choice.disconnected()
            why = "returning to the preferred listener" if self._returning else "disconnected"
            self._returning = False
            if was is not None:
                self._move(was, self.choice.target, why)
        self._set_state("disconnected", f"reconnecting to {self.target}")

    def _refused(self, reason: str) -> bool:
        """Count a refusal by the master; ``True`` once it has been reported (log nothing more)."""
        if not self._refusals.add(reason):
            return False
        if not self._refusals.reported:
            self._refusals.reported = True
            self.log.error(
                "Cannot connect to {target}: refused by the master: this worker's certificate "
                "is revoked or unknown ({reason}, {count} times in a row); enroll this worker "
                "again under a new name (docs/SWARM-Mode.md)",
                target=self.target,
                reason=reason,
                count=self._refusals.count,
            )
        self._set_state(
            "failing",
            f"cannot connect to {self.target}: refused by the master: this worker's certificate "
            "is revoked or unknown",
        )
        return True

    def failed_attempt(self, reason: str) -> None:
        self._failures += 1
        if reason.startswith("TLS handshake failed: ") and self._refused(reason):
            return
        if reason != self._last_failure:
            self.log.warn(
                "Cannot connect to {target}: {reason} (retrying with backoff)",
                target=self.target,
                reason=reason,
            )
            self._last_failure = reason
        self._set_state("failing", f"cannot connect to {self.target}: {reason}")
        if self.choice is not None:
            self._move(*self.choice.failed(), reason)

    def replace_listeners(self, choice: ListenerChoice) -> None:
        """The bundle's listener list changed: follow ``choice`` from now on.

        A connection to the new preferred listener is kept; any other is handed
        back (closed once everything sent is acknowledged), so the next attempt
        goes to the new preferred one.
        """
        old, self.choice = self.choice, choice
        connected = old.connected_to if old is not None else None
        choice.moved = old is not None and (old.moved or set(old.order) != set(choice.order))
        self.log.info(
            "Listener list changed: now {listeners} (preferred {preferred})",
            listeners=", ".join(_spelled(x) for x in choice.order),
            preferred=_spelled(choice.preferred),
        )
        if connected is None:
            self.target = _spelled(choice.target)
            return
        choice.connected_to = connected
        if connected == choice.preferred:
            return
        self._cancel_return()
        if connected in choice.order:
            choice.index = choice.order.index(connected)
        self._return_to_preferred()

    def stop(self) -> None:
        """The service stops: no more returns."""
        self._cancel_return()


def _spelled(listener: Listener) -> str:
    return format_listener(*listener)


#: The TLS alerts a DECNET listener answers a client certificate it refuses with
#: (OpenSSL's words; which one depends on the TLS version and the refusal).
REFUSAL_ALERTS = (
    "alert internal error",
    "alert bad certificate",
    "alert certificate revoked",
    "alert certificate unknown",
    "alert unknown ca",
    "alert access denied",
)
#: Identical refusals in a row after which the forwarder says what they mean.
REFUSED_AFTER = 3


def refusal_alert(reason: Failure) -> str | None:
    """OpenSSL's text when ``reason`` is the peer refusing our certificate, else ``None``."""
    if not reason.check(SSL.Error) or reason.check(PeerCertificateRefused):
        return None
    text = tls_error_text(reason.value)
    return text if any(alert in text for alert in REFUSAL_ALERTS) else None


@attrs.define
class RefusalStreak:
    """Identical certificate refusals by the master in a row, and whether they were reported."""

    reason: str | None = None
    count: int = 0
    reported: bool = False

    def add(self, reason: str) -> bool:
        """Count ``reason``; ``True`` when it is a refusal seen :data:`REFUSED_AFTER` times."""
        if not any(alert in reason for alert in REFUSAL_ALERTS):
            return False
        if reason != self.reason:
            self.reason, self.count, self.reported = reason, 0, False
        self.count += 1
        return self.count >= REFUSED_AFTER


def _handshake_failure(reason: Failure) -> str:
    """Why a connection ended before its handshake: our refusal of the receiver, or TLS's."""
    if reason.check(PeerCertificateRefused):
        return f"refused the receiver's certificate: {reason.value.refusal}"
    return f"TLS handshake failed: {reason.getErrorMessage()}"
