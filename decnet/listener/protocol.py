"""The listener's per-connection protocol: plain RFC 5425 or ``decnet-syslog/1``.

Who sent the bytes is decided once, after the TLS handshake, from the peer
certificate (already checked by the handshake: our CA, role ``worker``, not
revoked).  The syslog HOSTNAME inside the messages is never consulted.  The
negotiated ALPN protocol picks the mode:

* none (a stock RFC 5425 sender such as rsyslog): every frame is one line,
  appended to the worker's ``syslog`` stream;
* ``decnet-syslog/1``: HELLO → RESUME(high-water mark) → DATA… / ACK…, see
  ``docs/Logging.md``;
* ``decnet-syslog/2``: the same, but HELLO carries the offset the worker had
  acknowledged; when that is above this listener's mark (the worker moved here
  from another listener) a new mirror segment starts there and RESUME names it.

Framing and protocol errors are expected refusals: logged as warnings with the
peer and the reason, then only *this* connection is closed; frames that were
complete before the error are kept.

Before its handshake a connection is unauthenticated: it counts against the
pre-TLS budget (:mod:`decnet.listener.admission`), checked by
:class:`PreTLSGate` before any TLS state exists, and it has
``handshake_timeout`` seconds for the whole handshake, after which it is
aborted at once.  ``--max-connections`` counts authenticated connections only.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Callable
from typing import Any, cast

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from zope.interface import implementer

from decnet import config
from decnet.listener import admission
from decnet.listener import workers as worker_state
from decnet.listener.admission import Admit, PreTLSBudget, RefusalLog, address_key
from decnet.listener.ingest import Ingest, StreamSink, TooManyStreams
from decnet.listener.publisherproc import BrokerMarks
from decnet.listener.workers import WorkerStates
from decnet.syslog import ackproto
from decnet.syslog.framing import FramingError, OctetCountingDecoder, encode_frame
from decnet.tls import Refusal, RefusalKind, days_left_of, handshake_of, peer_identity

# A refused or failed connection gets this long to close gracefully.
CLOSE_GRACE = 5.0
# What stands for an LF inside a plain-mode frame in the line-oriented mirror
# (rsyslog's own escape for control characters).
ESCAPED_LF = b"#012"

HANDSHAKING = "handshaking"
AWAITING_HELLO = "awaiting-hello"
RESUMING = "resuming"
STREAMING = "streaming"
PLAIN = "plain"
CLOSING = "closing"
STATES = (HANDSHAKING, AWAITING_HELLO, RESUMING, STREAMING, PLAIN, CLOSING)


class Refused(enum.Enum):
    """Why the listener closed a connection it did not want: a fixed set (metrics labels)."""

    PRE_TLS_LIMIT = "pre_tls_limit"  # --max-unauthenticated(-per-address), before TLS
    EVICTED = "evicted"  # an unauthenticated connection dropped for a newer one
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    TLS_UNTRUSTED = "tls_untrusted"  # another CA, expired, no client certificate, ...
    TLS_POLICY = "tls_policy"  # our CA, but no role, the wrong role, ...
    TLS_REVOKED = "tls_revoked"
    TLS_FAILED = "tls_failed"  # not TLS, an old version, garbage
    NOT_A_WORKER = "not_a_worker"
    CONNECTION_LIMIT = "connection_limit"  # --max-connections
    WORKER_CONNECTION_LIMIT = "worker_connection_limit"  # --max-connections-per-worker
    FRAMING = "framing"
    PROTOCOL = "protocol"
    IDLE = "idle"
    STREAM_LIMIT = "stream_limit"  # --max-streams-per-worker
    STREAM_UNAVAILABLE = "stream_unavailable"  # its files could not be opened or committed
    REVOKED = "revoked"  # cut when its certificate was revoked


_TLS_REFUSALS = {
    RefusalKind.UNTRUSTED: Refused.TLS_UNTRUSTED,
    RefusalKind.REVOKED: Refused.TLS_REVOKED,
}


@implementer(IHandshakeListener)
class SyslogServerProtocol(Protocol, TimeoutMixin):
    # The TLS transport (also a producer we pause for backpressure).
    transport: Any
    log = Logger()

    def callLater(self, delay: float, f: Callable[..., object], *args: object) -> IDelayedCall:
        """TimeoutMixin schedules on the global reactor unless told otherwise."""
        return self.factory.clock.callLater(delay, f, *args)

    @property
    def attached(self) -> StreamSink:
        """The stream's sink (there is one in every state that takes data)."""
        assert self.sink is not None, "data before the stream was attached"
        return self.sink

    def __init__(self, factory: ListenerFactory, addr):
        self.factory = factory
        self.addr = addr
        # TimeoutMixin schedules on the global reactor unless told otherwise.
        self.state = HANDSHAKING
        self.decoder = OctetCountingDecoder(factory.max_frame)
        self.worker: str | None = None
        self.fingerprint: str | None = None
        self.stream: str | None = None
        self.sink: StreamSink | None = None
        self.version = ackproto.VERSION
        # Version 2: the offset the worker had acknowledged (here or elsewhere) at HELLO.
        self.arrived_at: int | None = None
        self.frames = 0
        self.bytes = 0
        self.escaped_lfs = 0
        self._queued: list[bytes] = []
        self._inbox: list[bytes] = []
        self._drain_call = None
        self._paused = False
        self._close_call = None
        self._handshake_call = None
        self._counted = False  # counted as connected in the per-worker state
        self._status_warned = False
        self._resume_wait: defer.Deferred[int] | None = None
        self._acked = -1  # the last offset named in RESUME or ACK

    # -- identity --------------------------------------------------------

    @property
    def peer(self) -> str:
        where = f"{getattr(self.addr, 'host', '?')}:{getattr(self.addr, 'port', '?')}"
        return f"{self.worker}@{where}" if self.worker else where

    def connectionMade(self):
        # The whole handshake, not each byte of it: a trickle does not buy time.
        self._handshake_call = self.factory.clock.callLater(
            self.factory.handshake_timeout, self._handshake_expired
        )

    def _handshake_expired(self) -> None:
        self._handshake_call = None
        self.factory.drop_unauthenticated(
            self,
            "handshake timeout",
            f"no TLS handshake within {self.factory.handshake_timeout:g}s (--handshake-timeout)",
        )

    def abort_unauthenticated(self) -> None:
        """Drop this not yet authenticated connection now: nothing of it is worth a grace."""
        if self.state != HANDSHAKING:
            return
        self.state = CLOSING
        self._cancel_handshake_timer()
        # The refusal is already logged (or summed up): the TLS layer must not
        # log one more line for this connection.
        handshake = handshake_of(self.transport)
        if handshake is not None:
            handshake.refuse(Refusal(RefusalKind.DROPPED, "dropped before its handshake ended"))
        self.transport.abortConnection()

    def _cancel_handshake_timer(self) -> None:
        if self._handshake_call is not None:
            if self._handshake_call.active():
                self._handshake_call.cancel()
            self._handshake_call = None

    def handshakeCompleted(self):
        if self.state != HANDSHAKING:
            return
        self._cancel_handshake_timer()
        self.setTimeout(self.factory.idle_timeout)
        identity = peer_identity(self.transport)
        self.factory.handshake_done(self, identity)
        if identity is None or identity.role != config.ROLE_WORKER:
            # The handshake policy already guarantees this; never trust a gap.
            self._refuse("peer is not an authenticated worker", Refused.NOT_A_WORKER)
            return
        self.worker, self.fingerprint = identity.cn, identity.fingerprint
        refusal = self.factory.admit(self)
        if refusal is not None:
            self._refuse(*refusal)
            return
        self._note_connected()
        self._warn_if_expiring()
        alpn = getattr(self.transport, "negotiatedProtocol", None)
        if alpn == config.ACK_ALPN_MOVES:
            self.version = ackproto.VERSION_MOVES
        if alpn in (config.ACK_ALPN, config.ACK_ALPN_MOVES):
            # DATA payloads are whole lines: their final LF is data, not a stock sender's extra.
            self.decoder.strip_lf = False
            self.state = AWAITING_HELLO
            self.log.info(
                "Worker {worker} connected from {peer} (acknowledged mode)",
                worker=self.worker,
                peer=self.peer,
            )
        else:
            self.state = PLAIN
            self.stream = config.PLAIN_STREAM
            self.log.info(
                "Worker {worker} connected from {peer} (plain RFC 5425)",
                worker=self.worker,
                peer=self.peer,
            )
            self._pause()
            self._attach(self.factory.ingest.sink_for(self.worker, self.stream))

    def _warn_if_expiring(self) -> None:
        """Once per connection: this worker's certificate has under 30 days left."""
        left = days_left_of(self.transport, self.factory.clock.seconds())
        if left is not None and left < config.RENEW_BEFORE_DAYS:
            self.log.warn(
                "Worker {worker}'s certificate expires in {days} days; "
                "renew it with `decnet-admin renew {worker}`",
                worker=self.worker,
                days=max(0, int(left)),
            )

    # -- bytes in --------------------------------------------------------

    def dataReceived(self, data: bytes):
        # TLSMemoryBIOProtocol calls this once per TLS record, and a stock
        # sender such as rsyslog puts every message in its own record.  So
        # this only queues; everything that arrived in one reactor turn is
        # decoded and appended in one pass (``_drain``), with one timeout
        # update and one backpressure check.
        if self.state in (CLOSING, HANDSHAKING):
            return
        self._inbox.append(data)
        if self._drain_call is None:
            self._drain_call = self.factory.clock.callLater(0, self._drain)

    def _drain(self) -> None:
        """Process everything received since the last pass (also on close and refusal)."""
        if self._drain_call is not None:
            if self._drain_call.active():
                self._drain_call.cancel()
            self._drain_call = None
        inbox = self._inbox
        if not inbox or self.state == CLOSING:
            inbox.clear()
            return
        data = inbox[0] if len(inbox) == 1 else b"".join(inbox)
        inbox.clear()
        self.bytes += len(data)
        try:
            frames = self.decoder.feed(data)
        except FramingError as exc:
            self._handle_frames(exc.frames)
            self._refuse(f"framing error: {exc}", Refused.FRAMING, kept=len(exc.frames))
            return
        if frames:
            self._handle_frames(frames)
        if self.state in (PLAIN, STREAMING) and not self.decoder.buffered:
            # At a frame boundary an authenticated peer may stay idle (the
            # per-worker cap bounds how many); mid-frame it may not.
            self.setTimeout(None)
        elif self.state != CLOSING:
            self.setTimeout(self.factory.idle_timeout)

    def _handle_frames(self, frames: list[bytes]) -> None:
        if not frames or self.state == CLOSING:
            return
        self.frames += len(frames)
        if self.state == PLAIN:
            if self.sink is None:
                self._queued.extend(frames)
            else:
                self._append_plain(frames)
            return
        for frame in frames:
            if self.state == CLOSING:
                return
            try:
                self._ack_message(ackproto.decode(frame))
            except ackproto.ProtocolError as exc:
                self._refuse(f"protocol error: {exc}", Refused.PROTOCOL)
                return

    def _append_plain(self, frames: list[bytes]) -> None:
        frames = [*frames, b""]  # (never the caller's list: it may be counted afterwards)
        lines = b"\n".join(frames)
        if lines.count(b"\n") != len(frames) - 1:
            # Some frame holds an LF of its own (rare): escape it, per frame.
            for i, frame in enumerate(frames):
                if b"\n" in frame:
                    self.escaped_lfs += frame.count(b"\n")
                    frames[i] = frame.replace(b"\n", ESCAPED_LF)
            lines = b"\n".join(frames)
        self.attached.append_plain(lines)
        self._backpressure()

    def _ack_message(self, message) -> None:
        if self.state == STREAMING and isinstance(message, ackproto.Data):
            self.attached.accept(message.start, message.end, message.payload)
            self._backpressure()
        elif self.state == STREAMING and isinstance(message, ackproto.Gap):
            self.attached.accept_gap(message.start, message.end)
        elif self.state == STREAMING and isinstance(message, ackproto.Status):
            self._note_status(message.end)
        elif self.state == AWAITING_HELLO and isinstance(message, ackproto.Hello):
            if message.stream == config.PLAIN_STREAM:
                raise ackproto.ProtocolError(
                    f"stream name {message.stream!r} is reserved for plain RFC 5425"
                )
            if message.version != self.version:
                raise ackproto.ProtocolError(
                    f"HELLO version {message.version} on a version {self.version} connection"
                )
            self.stream = message.stream
            self.arrived_at = message.acked
            self.factory.claim_stream(self)
            self.state = RESUMING
            self._pause()
            self._attach(self.factory.ingest.sink_for(self.worker, self.stream))
        else:
            raise ackproto.ProtocolError(
                f"unexpected {type(message).__name__.upper()} in state {self.state}"
            )

    # -- the sink --------------------------------------------------------

    def _attach(self, opening: defer.Deferred) -> None:
        opening.addCallbacks(self._sink_ready, self._sink_failed)
        opening.addErrback(
            lambda failure: self.log.failure(
                "Attaching {peer} to its stream", failure, peer=self.peer
            )
        )

    def _sink_ready(self, sink: StreamSink) -> None:
        if self.state == CLOSING:
            return
        self.sink = sink
        sink.failure_listeners.append(self._sink_broke)
        if self.state == PLAIN:
            self._note_stream(worker_state.PLAIN, sink.committed_end)
            queued, self._queued = self._queued, []
            if queued:
                self._append_plain(queued)
            self._resume()
            return
        # Acknowledged mode: everything an earlier connection of this stream
        # handed over must be durable before we name the resume point.
        flushed = sink.when_flushed()
        flushed.addCallback(self._segment_start)
        if self.factory.broker is not None:
            flushed.addCallback(self._broker_resume_point)
        flushed.addCallbacks(self._send_resume, self._sink_failed)

    def _segment_start(self, offset: int) -> int | defer.Deferred:
        """A worker that had more acknowledged (by another listener) than this one has
        starts a new mirror segment there, made durable before the RESUME names it."""
        if self.state != RESUMING or self.arrived_at is None or self.arrived_at <= offset:
            return offset
        self.attached.start_segment(self.arrived_at)
        return self.attached.when_flushed()

    def _broker_resume_point(self, offset: int) -> defer.Deferred[int]:
        """Broker mode: RESUME names the broker's mark, once it holds all we hold.

        Until then the forwarder waits (it keeps its data); that wait is the
        broker's, not the peer's idleness, so the idle timeout is off.
        """
        assert self.factory.broker is not None and self.worker and self.stream
        self.setTimeout(None)
        self.factory.ingest.feed_kick(self.attached)
        waiting = self.factory.broker.when_reaches(self.worker, self.stream, offset)
        if not waiting.called:
            self.log.info(
                "Holding RESUME for {worker}/{stream} until JetStream confirms offset {offset}",
                worker=self.worker,
                stream=self.stream,
                offset=offset,
            )
        self._resume_wait = waiting
        return waiting

    def _send_resume(self, offset: int) -> None:
        self._resume_wait = None
        if self.state != RESUMING:
            return
        self.state = STREAMING
        if self.factory.broker is not None:
            assert self.worker and self.stream
            self.factory.broker.listen(self.worker, self.stream, self._on_commit)
        else:
            self.attached.commit_listeners.append(self._on_commit)
        self._acked = offset
        self._note_stream(worker_state.ACK, offset)
        self._write(ackproto.encode_resume(offset))
        self.log.info(
            "Resuming {worker}/{stream} at offset {offset} for {peer}",
            worker=self.worker,
            stream=self.stream,
            offset=offset,
            peer=self.peer,
        )
        self.setTimeout(None)
        self._resume()

    def _on_commit(self, offset: int) -> None:
        if self.state == STREAMING and offset > self._acked:
            self._acked = offset
            self._write(ackproto.encode_ack(offset))

    def _sink_failed(self, failure) -> None:
        if failure.check(TooManyStreams):
            self._refuse(failure.getErrorMessage(), Refused.STREAM_LIMIT)
            return
        self._refuse(
            f"stream unavailable: {failure.getErrorMessage()}",
            Refused.STREAM_UNAVAILABLE,
            warn=False,
        )

    def _sink_broke(self, reason: str) -> None:
        self._refuse(f"stream unavailable: {reason}", Refused.STREAM_UNAVAILABLE, warn=False)

    def _backpressure(self) -> None:
        if self.attached.over_limit and not self._paused:
            self._pause()
            self.attached.when_drained(self._resume)

    def _pause(self) -> None:
        if not self._paused:
            self._paused = True
            self.transport.pauseProducing()

    def _resume(self) -> None:
        if self._paused and self.state != CLOSING:
            self._paused = False
            self.transport.resumeProducing()

    # -- the per-worker state (decnet.listener.workers) -------------------

    def _note_connected(self) -> None:
        assert self.worker is not None
        self._counted = True
        self.factory.workers.connected(self.worker, self.factory.clock.seconds())

    def _note_disconnected(self) -> None:
        if self._counted and self.worker is not None:
            self._counted = False
            self.factory.workers.disconnected(self.worker, self.factory.clock.seconds())

    def _note_stream(self, mode: str, high_water: int) -> None:
        if self.worker is not None and self.stream is not None:
            self.factory.workers.stream(self.worker, self.stream, mode, high_water)

    def _note_error(self, reason: str) -> None:
        if self.worker is not None:
            self.factory.workers.error(self.worker, reason, self.factory.clock.seconds())

    def _note_status(self, end: int) -> None:
        """A STATUS: recorded for the log lag; an impossible one is ignored (logged once)."""
        assert self.worker is not None and self.stream is not None
        ignored = self.factory.workers.status(
            self.worker, self.stream, end, self.attached.accepted_end, self.factory.clock.seconds()
        )
        if ignored is not None and not self._status_warned:
            self._status_warned = True
            self.log.warn(
                "Ignoring STATUS from {peer}: {reason} (further ones on this connection "
                "are ignored silently)",
                peer=self.peer,
                reason=ignored,
                worker=self.worker,
            )

    # -- closing ---------------------------------------------------------

    def _write(self, body: bytes) -> None:
        self.transport.write(encode_frame(body))

    def _refuse(
        self, reason: str, why: Refused, *, kept: int | None = None, warn: bool = True
    ) -> None:
        """Close this connection (only this one) and say why, once."""
        if self.state == CLOSING:
            return
        self.factory.refused_by[why] += 1
        if self._inbox:
            # What arrived before the refusal is kept, as if processed at once.
            self._drain()
            if self.state == CLOSING:
                return
        if self.state in (AWAITING_HELLO, RESUMING, STREAMING):
            self._write(ackproto.encode_error(reason))
        self.state = CLOSING
        self._note_error(reason)
        emit = self.log.warn if warn else self.log.error
        emit(
            "Closing connection from {peer}: {reason}"
            + (" ({kept} frames before it were kept)" if kept is not None else ""),
            peer=self.peer,
            reason=reason,
            kept=kept,
            worker=self.worker,
        )
        self.setTimeout(None)
        if self._paused:
            # A paused transport never reads the peer's close: without this a
            # refused connection (a HELLO over --max-streams-per-worker, waiting
            # for its sink) would count against its worker's cap for CLOSE_GRACE.
            self._paused = False
            self.transport.resumeProducing()
        self.transport.loseConnection()
        self._close_call = self.factory.clock.callLater(CLOSE_GRACE, self._abort)

    def _abort(self) -> None:
        self._close_call = None
        self.transport.abortConnection()

    def timeoutConnection(self):
        if self._inbox:
            # Bytes arrived in this very turn: not idle (``_drain`` re-arms the timer).
            self._drain()
            return
        if self.decoder.buffered:
            what = f"an incomplete frame ({self.decoder.buffered} bytes buffered)"
        else:
            what = "no HELLO"
        self._refuse(f"idle for {self.factory.idle_timeout:g}s with {what}", Refused.IDLE)

    def cut(self, reason: str) -> None:
        """Drop this connection at once (revocation)."""
        self._drain()
        self.log.warn("Cutting connection from {peer}: {reason}", peer=self.peer, reason=reason)
        self.state = CLOSING
        self.transport.abortConnection()

    def connectionLost(self, reason):
        # Whatever was received before the connection went away is ingested.
        self._drain()
        self.setTimeout(None)
        self._cancel_handshake_timer()
        if self._close_call is not None and self._close_call.active():
            self._close_call.cancel()
        prev, self.state = self.state, CLOSING
        if prev == HANDSHAKING:
            self._count_handshake_failure()
        if self._resume_wait is not None:
            waiting, self._resume_wait = self._resume_wait, None
            waiting.cancel()
        if self.factory.broker is not None and self.worker and self.stream:
            self.factory.broker.unlisten(self.worker, self.stream, self._on_commit)
        if self.sink is not None:
            for lst, fn in (
                (self.sink.commit_listeners, self._on_commit),
                (self.sink.failure_listeners, self._sink_broke),
            ):
                if fn in lst:
                    lst.remove(fn)
        self.factory.forget(self)
        self._note_disconnected()
        if self.worker and prev != CLOSING:
            self.log.info(
                "Connection from {peer} closed ({frames} frames, {bytes} bytes)",
                peer=self.peer,
                frames=self.frames,
                bytes=self.bytes,
            )

    def _count_handshake_failure(self) -> None:
        """A handshake that failed here (not one we dropped: that is counted already)."""
        handshake = handshake_of(self.transport)
        if handshake is None or handshake.done:
            return
        refusal = handshake.refusal
        if refusal is not None and refusal.kind is not RefusalKind.DROPPED:
            self.factory.refused_by[_TLS_REFUSALS.get(refusal.kind, Refused.TLS_POLICY)] += 1
        elif refusal is None and handshake.error is not None:
            self.factory.refused_by[Refused.TLS_FAILED] += 1


def _peer_text(addr) -> str:
    return f"{getattr(addr, 'host', '?')}:{getattr(addr, 'port', '?')}"


@attrs.frozen
class ConnectionLimits:
    """The bounds on the listener's connections (each is a ``decnet-listener`` option)."""

    max_frame: int = config.DEFAULT_MAX_FRAME
    max_connections: int = config.DEFAULT_MAX_CONNECTIONS
    max_per_worker: int = config.DEFAULT_MAX_CONNECTIONS_PER_WORKER
    idle_timeout: float = config.DEFAULT_IDLE_TIMEOUT
    max_unauthenticated: int = admission.DEFAULT_MAX_UNAUTHENTICATED
    max_unauthenticated_per_address: int = admission.DEFAULT_MAX_UNAUTHENTICATED_PER_ADDRESS
    handshake_timeout: float = admission.DEFAULT_HANDSHAKE_TIMEOUT


DEFAULT_LIMITS = ConnectionLimits()


class ListenerFactory(Factory):
    """Builds :class:`SyslogServerProtocol` and enforces the connection caps.

    Unauthenticated connections count against :attr:`unauthenticated` (the
    pre-TLS budget, enforced by :class:`PreTLSGate` outside TLS);
    authenticated ones against ``max_connections`` and ``max_per_worker``.
    """

    log = Logger()
    noisy = False

    def __init__(
        self,
        ingest: Ingest,
        clock: IReactorTime,
        limits: ConnectionLimits = DEFAULT_LIMITS,
        workers: WorkerStates | None = None,
        broker: BrokerMarks | None = None,
    ):
        self.ingest = ingest
        # Broker mode (--ack-after broker): ACK and RESUME follow JetStream's marks.
        self.broker = broker
        self.clock = clock
        self.limits = limits
        self.max_frame = limits.max_frame
        self.max_connections = limits.max_connections
        self.max_per_worker = limits.max_per_worker
        self.idle_timeout = limits.idle_timeout
        self.handshake_timeout = limits.handshake_timeout
        self.unauthenticated = PreTLSBudget(
            limits.max_unauthenticated, limits.max_unauthenticated_per_address
        )
        self.refusals = RefusalLog(clock)
        self.connections: set[SyslogServerProtocol] = set()
        self.authenticated: set[SyslogServerProtocol] = set()
        self.by_worker: dict[str, set[SyslogServerProtocol]] = {}
        self.stream_owner: dict[tuple[str, str], SyslogServerProtocol] = {}
        self.refused = 0
        # Connections closed because we did not want them, by why (read by the metrics).
        self.refused_by: collections.Counter[Refused] = collections.Counter()
        # Per-worker state (last seen, lag, counters); the service shares it with the ingest.
        self.workers = workers if workers is not None else WorkerStates()

    def outside_tls(self, tls_factory) -> PreTLSGate:
        """The factory to listen with: ``tls_factory`` behind the pre-TLS budget."""
        return PreTLSGate(self, tls_factory)

    def stopFactory(self):
        self.refusals.flush()

    # -- before TLS ------------------------------------------------------

    def admit_unauthenticated(self, addr) -> bool:
        """May a new connection from ``addr`` start a handshake?  Logs a refusal; may evict."""
        address = address_key(getattr(addr, "host", None))
        decision = self.unauthenticated.decide(address)
        if not isinstance(decision, Admit):
            self.refused += 1
            self.refused_by[Refused.PRE_TLS_LIMIT] += 1
            self.refusals.refused("refused", address, _peer_text(addr), decision.reason)
            return False
        if decision.evict is not None:
            victim = cast(SyslogServerProtocol, decision.evict)
            self.drop_unauthenticated(
                victim,
                "evicted",
                f"the oldest of {len(self.unauthenticated)} unauthenticated connections, "
                f"dropped for a new one from {_peer_text(addr)} (--max-unauthenticated)",
            )
        return True

    def drop_unauthenticated(self, proto: SyslogServerProtocol, kind: str, reason: str) -> None:
        """Abort a connection that has not finished its handshake (evicted, timed out)."""
        self.refused_by[Refused.EVICTED if kind == "evicted" else Refused.HANDSHAKE_TIMEOUT] += 1
        address = address_key(getattr(proto.addr, "host", None))
        self.unauthenticated.remove(proto)
        self.refusals.refused(kind, address, proto.peer, reason)
        proto.abort_unauthenticated()

    def buildProtocol(self, addr):
        proto = SyslogServerProtocol(self, addr)
        self.connections.add(proto)
        self.unauthenticated.add(proto, address_key(getattr(addr, "host", None)))
        return proto

    def handshake_done(self, proto: SyslogServerProtocol, identity) -> None:
        """``proto`` is authenticated (or about to be refused): off the pre-TLS budget."""
        self.unauthenticated.remove(proto)
        if identity is not None and identity.role == config.ROLE_WORKER:
            self.unauthenticated.worker_seen(address_key(getattr(proto.addr, "host", None)))

    # -- after TLS -------------------------------------------------------

    def admit(self, proto: SyslogServerProtocol) -> tuple[str, Refused] | None:
        """Count ``proto`` against the caps of authenticated connections; the refusal if over."""
        if len(self.authenticated) >= self.max_connections:
            self.refused += 1
            return (
                f"{len(self.authenticated)} authenticated connections open (--max-connections)",
                Refused.CONNECTION_LIMIT,
            )
        assert proto.worker is not None  # (after the handshake)
        mine = self.by_worker.setdefault(proto.worker, set())
        if len(mine) >= self.max_per_worker:
            self.refused += 1
            return (
                f"worker {proto.worker!r} already has {len(mine)} connections "
                "(--max-connections-per-worker)",
                Refused.WORKER_CONNECTION_LIMIT,
            )
        mine.add(proto)
        self.authenticated.add(proto)
        return None

    def claim_stream(self, proto: SyslogServerProtocol) -> None:
        """Make ``proto`` the one connection of its (worker, stream); drop an older one.

        A forwarder that was killed leaves a half-open connection behind; the
        newest HELLO wins so its restart is never locked out.
        """
        assert proto.worker is not None and proto.stream is not None  # (after HELLO)
        key = (proto.worker, proto.stream)
        old = self.stream_owner.get(key)
        if old is not None and old is not proto:
            old.cut(f"replaced by a newer connection for stream {proto.stream!r}")
        self.stream_owner[key] = proto

    def forget(self, proto: SyslogServerProtocol) -> None:
        self.connections.discard(proto)
        self.authenticated.discard(proto)
        self.unauthenticated.remove(proto)
        if proto.worker is not None:
            mine = self.by_worker.get(proto.worker)
            if mine is not None:
                mine.discard(proto)
                if not mine:
                    del self.by_worker[proto.worker]
            if proto.stream is not None:
                key = (proto.worker, proto.stream)
                if self.stream_owner.get(key) is proto:
                    del self.stream_owner[key]

    def revoked(self, fingerprints: frozenset[str]) -> None:
        """Cut every live connection whose certificate was just revoked."""
        for proto in [p for p in self.connections if p.fingerprint in fingerprints]:
            self.refused_by[Refused.REVOKED] += 1
            proto.cut("its certificate was revoked")


class PreTLSGate(Factory):
    """The outermost factory of the listener's port: the pre-TLS budget, before any TLS state.

    A refused connection is never built: ``buildProtocol`` returns ``None``
    and the port closes the socket at once (no TLS object, no traceback, no
    grace period) and goes on accepting, so a flood cannot fill the accept
    queue in front of a worker.
    """

    noisy = False

    def __init__(self, listener: ListenerFactory, tls_factory):
        self.listener = listener
        self.tls_factory = tls_factory

    def startFactory(self):
        self.tls_factory.doStart()

    def stopFactory(self):
        self.tls_factory.doStop()

    def buildProtocol(self, addr):
        if not self.listener.admit_unauthenticated(addr):
            return None
        return self.tls_factory.buildProtocol(addr)
