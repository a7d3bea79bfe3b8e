"""The forwarder's shipping loop and its connection protocol.

:class:`Shipper` outlives connections: it owns the :class:`Tailer` (every call
to it runs in a thread, one at a time), reads large chunks of whole lines,
frames them and writes them to whatever connection is current, as a
streaming producer of that connection (it stops reading while the TLS
transport is full).  :class:`ForwarderProtocol` is one connection: it picks
the mode from ALPN and relays RESUME / ACK to the shipper.

Acknowledged mode: after RESUME(h) the shipper rewinds the tailer to logical
offset ``h`` (back into an older generation if needed), sends DATA frames of
whole lines, keeps at most ``window`` unacknowledged bytes in flight and
persists a position only when an ACK says it is durable on the master.

Plain mode: frames are single lines (RFC 5425) and the position is persisted
once written to the transport; what that can lose is in docs/Logging.md.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.interfaces import IHandshakeListener, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from decnet import config
from decnet.forwarder.offsets import OffsetWriter
from decnet.forwarder.tail import Piece, Tailer
from decnet.syslog import ackproto
from decnet.syslog.framing import FramingError, OctetCountingDecoder, encode_frame, encode_lines

DEFAULT_WINDOW = 16 * 1024 * 1024
# The listener only sends small control frames.
CONTROL_MAX_FRAME = 4096

MODES = ("auto", "ack", "plain")


def serial_runner(reactor):
    """Run blocking calls in the reactor's thread pool, one at a time, in order."""
    lock = defer.DeferredLock()

    def run(f, *args):
        return lock.run(deferToThreadPool, reactor, reactor.getThreadPool(), f, *args)

    return run


def ack_frames(pieces: list[Piece], max_payload: int) -> list[bytes]:
    """``DATA`` frames (already octet-counted) for ``pieces``; each ≤ ``max_payload`` of lines."""
    out: list[bytes] = []
    for piece in pieces:
        data = piece.data
        if piece.rewritten or len(data) <= max_payload:
            header = ackproto.data_header(piece.start, piece.end)
            out += [b"%d " % (len(header) + len(data)), header, data]
            continue
        pos, n = 0, len(data)
        while pos < n:
            cut = n if n - pos <= max_payload else data.rfind(b"\n", pos, pos + max_payload) + 1
            if cut <= pos:
                raise ValueError("a line longer than the frame reached ack_frames")
            header = ackproto.data_header(piece.start + pos, piece.start + cut)
            out += [b"%d " % (len(header) + cut - pos), header, data[pos:cut]]
            pos = cut
    return out


def plain_frames(pieces: list[Piece]) -> tuple[bytes, int, int]:
    """One buffer of RFC 5425 frames (one line each, LF removed); (bytes, lines, empty lines)."""
    lines: list[bytes] = []
    for piece in pieces:
        lines += piece.data[:-1].split(b"\n")
    empty = lines.count(b"")
    if empty:
        # MSG-LEN is at least 1: an empty line cannot be framed.
        lines = [line for line in lines if line]
    return encode_lines(lines), len(lines), empty


@implementer(IPushProducer)
class Shipper:
    """Reads the tailer and ships to the current connection; see the module docstring."""

    log = Logger()

    def __init__(
        self,
        tailer: Tailer,
        offsets: OffsetWriter,
        clock,
        run,
        *,
        max_frame: int = config.DEFAULT_MAX_FRAME,
        window: int = DEFAULT_WINDOW,
    ):
        self.tailer = tailer
        self.offsets = offsets
        self.clock = clock
        self.run = run
        self.max_payload = max_frame - config.ACK_HEADER_ROOM
        self.window = window
        self._ready = False
        self._ready_waiters: list[defer.Deferred] = []
        self.proto: ForwarderProtocol | None = None
        self.mode: str | None = None
        self.sent_end = 0
        self.acked = 0
        self.skip_until = 0
        self._reading = False
        self._paused = False
        self._wakeup = False
        self._generation = 0  # bumps on every attach/detach; stale reads are dropped
        self.bytes_sent = 0
        self.frames_sent = 0
        self.empty_lines_skipped = 0

    # -- start-up --------------------------------------------------------

    def set_ready(self) -> None:
        """The tailer is located; connections may start shipping."""
        self._ready = True
        waiters, self._ready_waiters = self._ready_waiters, []
        for d in waiters:
            d.callback(None)

    def when_ready(self) -> defer.Deferred:
        if self._ready:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._ready_waiters.append(d)
        return d

    # -- connections -----------------------------------------------------

    def attach_plain(self, proto: ForwarderProtocol) -> defer.Deferred:
        def go(_):
            if proto.lost:
                return None
            # Whatever was read but never written is read again.
            return self.run(self.tailer.rewind, self.sent_end).addCallback(started)

        def started(restart):
            if proto.lost:
                return
            self._begin(proto, "plain", restart)

        return self.when_ready().addCallback(go)

    def attach_ack(self, proto: ForwarderProtocol, hwm: int) -> defer.Deferred:
        def go(_):
            if proto.lost:
                return None
            return self.run(self.tailer.rewind, hwm).addCallback(started)

        def started(restart):
            if proto.lost:
                return
            if restart > hwm:
                self.log.warn(
                    "The master has this stream up to offset {hwm}, but the worker only has "
                    "data from {offset} on; bytes {hwm}-{offset} are gone (a gap is recorded)",
                    hwm=hwm,
                    offset=restart,
                )
            self.skip_until = hwm if restart < hwm else 0
            self.acked = hwm
            self._begin(proto, "ack", restart)
            self._persist(hwm)

        return self.when_ready().addCallback(go)

    def _begin(self, proto, mode: str, restart: int) -> None:
        self._generation += 1
        self.proto, self.mode = proto, mode
        self.sent_end = restart
        self._paused = False
        proto.transport.registerProducer(self, True)
        self._pump()

    def detach(self, proto: ForwarderProtocol) -> None:
        if self.proto is proto:
            self._generation += 1
            self.proto = None
            self.mode = None
            if not proto.lost:
                proto.transport.unregisterProducer()

    def acked_to(self, offset: int) -> None:
        if offset <= self.acked:
            return
        if offset > self.sent_end:
            self.log.warn(
                "Master acknowledged offset {offset} beyond what we sent ({sent}); ignoring",
                offset=offset,
                sent=self.sent_end,
            )
            return
        self.acked = offset
        self._persist(offset)
        self._pump()

    def _persist(self, offset: int) -> None:
        def locate():
            self.tailer.release(offset)
            return self.tailer.position_at(offset)

        d = self.run(locate)
        d.addCallback(lambda pos: pos is not None and self.offsets.save(pos))
        d.addErrback(self.log.failure, "Recording offset {offset}", offset=offset)

    # -- IPushProducer (the TLS transport's flow control) ----------------

    def pauseProducing(self):
        self._paused = True

    def resumeProducing(self):
        if self._paused:
            self._paused = False
            self._pump()

    def stopProducing(self):
        self._paused = True

    # -- the loop --------------------------------------------------------

    def notify(self) -> None:
        """The file may have changed (inotify or the poll timer)."""
        if self._reading:
            self._wakeup = True
        else:
            self._pump()

    def _pump(self) -> None:
        if self.proto is None or self._reading or self._paused:
            return
        if self.mode == "ack" and self.sent_end - self.acked >= self.window:
            return
        self._reading = True
        self._wakeup = False
        generation = self._generation
        d = self.run(self.tailer.read, self.clock.seconds())
        d.addCallbacks(self._got, self._read_failed, (generation,))
        d.addErrback(self.log.failure, "Shipping loop failed")

    def _got(self, pieces: list[Piece], generation: int) -> None:
        self._reading = False
        if generation != self._generation or self.proto is None:
            return  # the connection changed meanwhile; the next attach rewinds
        if self.skip_until:
            pieces = self._skip(pieces)
        if pieces:
            self._send(pieces)
            self._pump()
        elif self._wakeup:
            self._pump()

    def _skip(self, pieces: list[Piece]) -> list[Piece]:
        kept = []
        for piece in pieces:
            if piece.end <= self.skip_until:
                continue
            if piece.start < self.skip_until:
                cut = self.skip_until - piece.start
                piece = Piece(self.skip_until, piece.end, piece.data[cut:])
            kept.append(piece)
        if kept or (pieces and pieces[-1].end >= self.skip_until):
            self.skip_until = 0
        if not kept and pieces:
            self.sent_end = pieces[-1].end
        return kept

    def _send(self, pieces: list[Piece]) -> None:
        transport = self.proto.transport
        if self.mode == "ack":
            frames = ack_frames(pieces, self.max_payload)
            self.frames_sent += len(frames) // 3
            transport.writeSequence(frames)
        else:
            buf, count, empty = plain_frames(pieces)
            self.empty_lines_skipped += empty
            self.frames_sent += count
            if buf:
                transport.write(buf)
        self.bytes_sent += sum(len(p.data) for p in pieces)
        self.sent_end = pieces[-1].end
        if self.mode == "plain":
            self._persist(self.sent_end)

    def _read_failed(self, failure, generation: int) -> None:
        self._reading = False
        self.log.failure(
            "Reading {path} failed; retrying on the next poll", failure, path=str(self.tailer.path)
        )


@implementer(IHandshakeListener)
class ForwarderProtocol(Protocol):
    """One connection to the master (or a stock RFC 5425 receiver)."""

    log = Logger()

    def __init__(self, factory: ForwarderFactory):
        self.factory = factory
        self.shipper = factory.shipper
        self.mode: str | None = None
        self.lost = False
        self.decoder = OctetCountingDecoder(CONTROL_MAX_FRAME)

    def connectionMade(self):
        tcp = getattr(self.transport, "transport", None)
        if tcp is not None and hasattr(tcp, "setTcpKeepAlive"):
            tcp.setTcpKeepAlive(True)

    def handshakeCompleted(self):
        alpn = getattr(self.transport, "negotiatedProtocol", None)
        wanted = self.factory.mode
        if alpn == config.ACK_ALPN:
            self.mode = "ack"
            self.factory.connected(self, "acknowledged")
            self.transport.write(encode_frame(ackproto.encode_hello(self.factory.stream)))
        elif wanted == "ack":
            self.factory.failed_attempt(
                "the receiver does not speak decnet-syslog/1 and --mode is ack"
            )
            self.close()
        else:
            self.mode = "plain"
            self.factory.connected(self, "plain RFC 5425")
            d = self.shipper.attach_plain(self)
            d.addErrback(self.log.failure, "Starting plain shipping")

    def dataReceived(self, data):
        if self.mode != "ack":
            return  # RFC 5425 receivers send nothing; ignore whatever a stock peer says
        try:
            frames = self.decoder.feed(data)
        except FramingError as exc:
            self._abandon(f"bad framing from the master: {exc}")
            return
        for frame in frames:
            try:
                message = ackproto.decode(frame)
            except ackproto.ProtocolError as exc:
                self._abandon(f"bad message from the master: {exc}")
                return
            if isinstance(message, ackproto.Ack):
                self.shipper.acked_to(message.offset)
            elif isinstance(message, ackproto.Resume):
                self.log.info(
                    "Master resumes stream {stream} at offset {offset}",
                    stream=self.factory.stream,
                    offset=message.offset,
                )
                d = self.shipper.attach_ack(self, message.offset)
                d.addErrback(self.log.failure, "Starting acknowledged shipping")
            elif isinstance(message, ackproto.Error):
                self._abandon(f"master refused: {message.reason}")
                return
            else:
                self._abandon(f"unexpected {type(message).__name__} from the master")
                return

    def _abandon(self, reason: str) -> None:
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

    def __init__(self, shipper: Shipper, *, stream: str, mode: str, target: str, policy=None):
        self.shipper = shipper
        self.policy = policy
        self.stream = stream
        self.mode = mode
        self.target = target
        self.state = "connecting"
        # Told (state, detail) on every change: systemd's STATUS line, for one.
        self.state_listeners: list = []
        self._last_failure: str | None = None
        self._failures = 0
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
        self.log.info(
            "Connected to {target} ({mode}){after}",
            target=self.target,
            mode=mode,
            after=f" after {self._failures} failed attempts" if self._failures else "",
        )
        self._last_failure, self._failures = None, 0
        self._set_state("connected", f"shipping to {self.target} ({mode})")

    def disconnected(self, proto: ForwarderProtocol, reason) -> None:
        if proto.mode is None:
            why = getattr(proto.transport, "decnet_refusal", None) or self.refusal()
            self.failed_attempt(why or f"TLS handshake failed: {reason.getErrorMessage()}")
            return
        if self.current is proto:
            self.current = None
        self.log.warn(
            "Disconnected from {target}: {reason}; reconnecting",
            target=self.target,
            reason=reason.getErrorMessage(),
        )
        self._set_state("disconnected", f"reconnecting to {self.target}")

    def refusal(self) -> str | None:
        """Why our TLS policy refused the receiver, if it did (then forget it)."""
        if self.policy is None or self.policy.last_refusal is None:
            return None
        reason, self.policy.last_refusal = self.policy.last_refusal, None
        return f"refused the receiver's certificate: {reason}"

    def failed_attempt(self, reason: str) -> None:
        self._failures += 1
        if reason != self._last_failure:
            self.log.warn(
                "Cannot connect to {target}: {reason} (retrying with backoff)",
                target=self.target,
                reason=reason,
            )
            self._last_failure = reason
        self._set_state("failing", f"cannot connect to {self.target}: {reason}")
