"""The forwarder's delivery core: a sans-IO state machine.

It decides *what* to do; :mod:`decnet.forwarder.client` does it.  Every method
takes one event and returns the commands it causes, in order:

=================  ==========================================================
event              meaning
=================  ==========================================================
``connected``      a connection finished its handshake (acknowledged or plain)
``resume``         the listener named its durable mark (RESUME)
``ack``            the listener made everything below an offset durable (ACK)
``rewound``        the tailer is positioned for a RESUME (or a plain start)
``read_done``      the tailer read lines (possibly none)
``observed``       the tailer looked for rotations without reading
``released``       the tailer closed generations below the durable mark
``persisted``      a journal commit is durable
``notify``         the file may have changed (inotify, the poll timer)
``paused`` ...     the transport's flow control
``disconnected``   the connection is gone
``file_end``       the tailer saw the files reach a logical offset (STATUS)
``status_refused`` the listener is older than STATUS and refused it
=================  ==========================================================

=================  ==========================================================
command            what the shell does
=================  ==========================================================
:class:`Send`      write octet-counted frames to the connection
:class:`Read`      ``tailer.read``, then ``read_done``
:class:`Observe`   ``tailer.observe``, then ``observed``
:class:`Rewind`    ``tailer.rewind``, then ``rewound``
:class:`Persist`   one journal transaction, then ``persisted``
:class:`Release`   ``tailer.release``, then ``released``
:class:`DeclareGap` tell the operator that bytes are gone for good
:class:`Close`     close the connection, saying why
=================  ==========================================================

The rules that make delivery exactly-once live here:

* the acknowledged offset is persisted only after an ACK (or a RESUME) says
  it is durable on the master, never on sending;
* a generation record is durable before any byte read after it is sent;
* generations are released only below the *durable* acknowledged offset;
* after RESUME(h) reading restarts at ``h``: what the master has is skipped,
  what it lacks and we still have is sent again, and where bytes are gone a
  gap is declared.

Plain RFC 5425 has no acknowledgement: the position written to the
transport is persisted instead (what that can lose is in docs/Logging.md).
"""

from __future__ import annotations

import attrs
from twisted.logger import Logger

from decnet.forwarder.frames import ack_frames, plain_frames
from decnet.forwarder.journal import GenerationRecord
from decnet.forwarder.tail import Piece
from decnet.groupcommit import GroupCommit
from decnet.syslog import ackproto
from decnet.syslog.framing import encode_frame

DEFAULT_WINDOW = 16 * 1024 * 1024
# At most one STATUS per this many seconds per connection (the listener's lag is that fresh).
STATUS_INTERVAL = 1.0

ACK = "ack"
PLAIN = "plain"

# Connection phases.
IDLE = "idle"  # no connection
HELLO = "hello"  # HELLO sent, waiting for RESUME
REWINDING = "rewinding"  # the tailer is being positioned
STREAMING = "streaming"

# Why a connection handed back with ``drain`` is closed.
DRAINED = "everything sent is acknowledged; returning to the preferred listener"


@attrs.frozen
class Send:
    frames: tuple[bytes, ...]


@attrs.frozen
class Read:
    epoch: int


@attrs.frozen
class Observe:
    pass


@attrs.frozen
class Rewind:
    offset: int
    epoch: int


@attrs.frozen
class Persist:
    acked: int | None
    records: tuple[GenerationRecord, ...]
    token: int  # handed back by ``persisted``


# One item of the journal's group commit: a new acknowledged offset, new records.
JournalWork = tuple[int | None, tuple[GenerationRecord, ...]]


def _merged(items: tuple[JournalWork, ...]) -> tuple[int | None, tuple[GenerationRecord, ...]]:
    """One transaction for ``items``: the newest offset, the newest record of each generation."""
    acked: int | None = None
    records: dict[int, GenerationRecord] = {}
    for item_acked, item_records in items:
        if item_acked is not None:
            acked = item_acked
        for rec in item_records:
            records[rec.seq] = rec
    return acked, tuple(records.values())


@attrs.frozen
class Release:
    offset: int


@attrs.frozen
class DeclareGap:
    start: int
    end: int


@attrs.frozen
class Close:
    reason: str


Command = Send | Read | Observe | Rewind | Persist | Release | DeclareGap | Close


class DeliveryCore:
    """One stream's delivery state; see the module docstring."""

    log = Logger()

    def __init__(self, stream: str, *, acked: int, max_payload: int, window: int = DEFAULT_WINDOW):
        self.stream = stream
        self.max_payload = max_payload
        self.window = window
        self.mode: str | None = None
        self.phase = IDLE
        self.epoch = 0
        self.resume_at = 0
        self.sent_end = acked  # end of what this connection has sent
        self.acked = acked  # the master's durable mark, as last told
        self.durable_acked = acked  # ... and as persisted in our journal
        self.skip_until = 0
        self.paused = False
        self.draining = False  # handing the connection back (``drain``)
        self.reading = False
        self.observing = False
        self._wakeup = False
        self._held: list[Piece] = []
        # The journal's group commit: one transaction in flight, the rest merged.
        self._journal: GroupCommit[JournalWork, None] = GroupCommit()
        self._gate = 0  # the ticket of the newest records that must be durable before a send
        self.bytes_sent = 0
        self.lines_sent = 0
        self.frames_sent = 0
        self.empty_lines_skipped = 0
        self.gaps_declared = 0
        # STATUS (``S <end>``): what was last reported on this connection, and when next.
        self.status_supported = True
        self.reported_end: int | None = None
        self.status_due: float | None = None

    # -- connection ------------------------------------------------------

    def connected(self, mode: str, moves: bool = False) -> list[Command]:
        """A connection is up; ``moves``: it speaks ``decnet-syslog/2``, whose HELLO tells
        the listener what is acknowledged already (on whichever listener)."""
        self.epoch += 1
        self.mode, self.paused, self._held, self.skip_until = mode, False, [], 0
        self.reported_end = self.status_due = None
        self.draining = False
        if mode == ACK:
            self.phase = HELLO
            hello = ackproto.encode_hello(self.stream, self.acked if moves else None)
            return [Send((encode_frame(hello),))]
        # Plain: whatever was read but never written is read again.
        self.phase = REWINDING
        return [Rewind(self.sent_end, self.epoch)]

    def disconnected(self) -> list[Command]:
        self.epoch += 1
        self.mode, self.phase, self._held = None, IDLE, []
        self.draining = False
        return []

    def drain(self) -> list[Command]:
        """Hand the connection back: send nothing more, and close it once everything sent
        is acknowledged (so the next listener starts where this one stopped)."""
        if self.mode != ACK or self.phase != STREAMING:
            return [Close(DRAINED)] if self.mode is not None else []
        self.draining = True
        return self._drained()

    def _drained(self) -> list[Command]:
        if self.draining and self.acked >= self.sent_end and not self.reading:
            self.draining = False
            return [Close(DRAINED)]
        return []

    def resume(self, offset: int) -> list[Command]:
        if self.phase != HELLO:
            return [Close(f"unexpected RESUME in state {self.phase}")]
        self.phase = REWINDING
        self.resume_at = offset
        return [Rewind(offset, self.epoch)]

    def rewound(self, restart: int, records: list[GenerationRecord], epoch: int) -> list[Command]:
        out = self._queue(records=records)
        if epoch != self.epoch or self.phase != REWINDING:
            return out + self._next_persist()
        self.phase = STREAMING
        self.sent_end = restart
        if self.mode == ACK:
            mark = self.resume_at
            if restart > mark:
                # What the master lacks is older than anything we still have.
                out += self._gap(mark, restart)
            self.skip_until = mark if restart < mark else 0
            self.acked = mark
            # The master's mark is durable there: our journal may say so too.
            out += self._queue(acked=mark)
        return out + self._next_persist() + self._pump()

    def ack(self, offset: int) -> list[Command]:
        if self.mode != ACK or self.phase != STREAMING:
            return [Close(f"unexpected ACK in state {self.phase}")]
        if offset <= self.acked:
            return []
        if offset > self.sent_end and offset > self.skip_until:
            return [Close(f"ACK {offset} is beyond what was sent ({self.sent_end})")]
        self.acked = offset
        return self._queue(acked=offset) + self._next_persist() + self._pump() + self._drained()

    # -- STATUS ----------------------------------------------------------

    def file_end(self, end: int, now: float) -> list[Command]:
        """The worker's files reach logical offset ``end`` (seconds ``now``): maybe a STATUS.

        Acknowledged mode only, once streaming; sent when the end changed since
        the last report on this connection, at most once per
        :data:`STATUS_INTERVAL` (the first one an interval after the first
        call): a later call (the poll timer's) reports what was held back.
        Never below what was sent, so an honest STATUS is never below the
        listener's high-water mark.
        """
        if self.mode != ACK or self.phase != STREAMING or not self.status_supported:
            return []
        if self.status_due is None:
            self.status_due = now + STATUS_INTERVAL
        end = max(end, self.sent_end)
        if end == self.reported_end or now < self.status_due:
            return []
        self.reported_end, self.status_due = end, now + STATUS_INTERVAL
        return [Send((encode_frame(ackproto.encode_status(end)),))]

    def status_refused(self) -> list[Command]:
        """The listener predates STATUS (it refused ``S``): stop sending it for good."""
        self.status_supported = False
        return []

    # -- flow control ----------------------------------------------------

    def paused_producing(self) -> list[Command]:
        self.paused = True
        return []

    def resumed_producing(self) -> list[Command]:
        if not self.paused:
            return []
        self.paused = False
        return self._pump()

    # -- the tailer ------------------------------------------------------

    def notify(self) -> list[Command]:
        """The file may have changed: read if we may ship, else look for rotations."""
        if self.reading:
            self._wakeup = True
            return []
        if self._can_read():
            return self._pump()
        if self.observing:
            return []
        self.observing = True
        return [Observe()]

    def observed(self, records: list[GenerationRecord]) -> list[Command]:
        self.observing = False
        return self._queue(records=records) + self._next_persist()

    def read_failed(self) -> list[Command]:
        self.reading = False
        return self._drained()

    def read_done(
        self, pieces: list[Piece], records: list[GenerationRecord], epoch: int
    ) -> list[Command]:
        return self._read_done(pieces, records, epoch) + self._drained()

    def _read_done(
        self, pieces: list[Piece], records: list[GenerationRecord], epoch: int
    ) -> list[Command]:
        self.reading = False
        out = self._queue(records=records)
        if epoch != self.epoch or self.phase != STREAMING:
            # The connection changed meanwhile; the next one rewinds.  The
            # records still describe files the tailer now has open.
            return out + self._next_persist()
        if self.skip_until:
            pieces = self._skip(pieces)
        wakeup, self._wakeup = self._wakeup, False
        if not pieces:
            return out + self._next_persist() + (self._pump() if wakeup else [])
        if not self._records_durable():
            self._held = pieces  # sent once the records describing them are durable
            return out + self._next_persist()
        return out + self._next_persist() + self._send(pieces) + self._pump()

    def released(self, records: list[GenerationRecord]) -> list[Command]:
        # Marking shipped generations done gates nothing: no need to wait for it.
        return self._queue(records=records, bump=False) + self._next_persist()

    # -- the journal -----------------------------------------------------

    def persisted(self, acked: int | None, token: int) -> list[Command]:
        """The :class:`Persist` whose ``token`` is ``token`` is durable."""
        self._journal.done()
        out: list[Command] = []
        if acked is not None and acked > self.durable_acked:
            self.durable_acked = acked
            out.append(Release(acked))
        elif acked is not None and acked < self.durable_acked:
            # The master knows less than we had recorded (its data was lost or
            # restored): rewinding below our mark is recorded as well.
            self.durable_acked = acked
        if self._held and self._records_durable() and self.phase == STREAMING:
            held, self._held = self._held, []
            out += self._send(held)
        return out + self._next_persist() + self._pump()

    def persist_failed(self, acked: int | None, records: tuple) -> list[Command]:
        """The commit failed (disk full?): keep everything queued and try again later.

        Its work goes back ahead of what was queued meanwhile, so a newer
        offset or a newer record of the same generation still wins.
        """
        self._journal.failed(retry=True)
        return []

    def _queue(
        self, *, acked: int | None = None, records: list | tuple = (), bump: bool = True
    ) -> list[Command]:
        """Queue journal work; ``bump``: sending waits until these records are durable."""
        if acked is None and not records:
            return []
        ticket = self._journal.add((acked, tuple(records)))
        if records and bump:
            self._gate = ticket
        return []

    def _records_durable(self) -> bool:
        return self._journal.finished >= self._gate

    def _next_persist(self) -> list[Command]:
        batch = self._journal.take()
        if batch is None:
            return []
        acked, records = _merged(batch.items)
        return [Persist(acked, records, batch.last)]

    def retry_persist(self) -> list[Command]:
        """Called on a timer after a failed commit."""
        return self._next_persist()

    # -- shipping --------------------------------------------------------

    def _can_read(self) -> bool:
        if self.phase != STREAMING or self.paused or self.reading or self._held or self.draining:
            return False
        if not self._records_durable():
            return False
        return self.mode != ACK or self.sent_end - self.acked < self.window

    def _pump(self) -> list[Command]:
        if not self._can_read():
            return []
        self.reading = True
        self._wakeup = False
        return [Read(self.epoch)]

    def _skip(self, pieces: list[Piece]) -> list[Piece]:
        """Drop what the master already has (below ``skip_until``)."""
        kept = []
        for piece in pieces:
            if piece.end <= self.skip_until:
                continue
            if piece.start < self.skip_until:
                cut = self.skip_until - piece.start
                data = b"" if piece.gone else piece.data[cut:]
                piece = Piece(self.skip_until, piece.end, data, gone=piece.gone)
            kept.append(piece)
        if kept or (pieces and pieces[-1].end >= self.skip_until):
            self.skip_until = 0
        if not kept and pieces:
            self.sent_end = pieces[-1].end
        return kept

    def _send(self, pieces: list[Piece]) -> list[Command]:
        out: list[Command] = []
        batch: list[Piece] = []
        for piece in pieces:
            if piece.start > self.sent_end:
                # Never silent: a jump in offsets is a gap, even one no piece names.
                out += self._flush(batch) + self._gap(self.sent_end, piece.start)
            if piece.gone:
                out += self._flush(batch) + self._gap(piece.start, piece.end)
            else:
                batch.append(piece)
            self.sent_end = piece.end
        out += self._flush(batch)
        if self.mode == PLAIN:
            # Plain RFC 5425 has no ACK: the position written is all we can record.
            self.acked = self.sent_end
            out += self._queue(acked=self.sent_end) + self._next_persist()
        return out

    def _gap(self, start: int, end: int) -> list[Command]:
        self.gaps_declared += 1
        out: list[Command] = [DeclareGap(start, end)]
        if self.mode == ACK:
            out.append(Send((encode_frame(ackproto.encode_gap(start, end)),)))
        return out

    def _flush(self, batch: list[Piece]) -> list[Command]:
        """Frames for the data pieces gathered so far (and empties ``batch``)."""
        if not batch:
            return []
        pieces, batch[:] = list(batch), []
        self.bytes_sent += sum(len(p.data) for p in pieces)
        self.lines_sent += sum(p.data.count(b"\n") for p in pieces)
        if self.mode == ACK:
            frames = ack_frames(pieces, self.max_payload)
            self.frames_sent += len(frames) // 3
            return [Send(tuple(frames))]
        buf, count, empty = plain_frames(pieces)
        self.empty_lines_skipped += empty
        self.frames_sent += count
        return [Send((buf,))] if buf else []
