"""What the JetStream publisher sends, decided without I/O.

The publisher process (:mod:`decnet.listener.publisher`) reads the durable
mirror of every (worker, stream) and publishes it; everything it decides is
here, pure and tested byte by byte:

* subjects: ``decnet.raw.<worker>.<stream>`` and ``decnet.events.<worker>.<stream>``
  with :func:`encode_token`, a reversible, subject-safe spelling of a name;
* :func:`plan_raw`: index records and mirror bytes → messages of at most
  ``max_payload`` bytes, gaps as empty messages, each with its logical
  ``[start, end)`` and whether ``end`` is a commit's end (``exact``: only those
  are ever acknowledged to a forwarder, see :class:`RawPiece`);
* :func:`plan_events`: feed lines → events keyed by their lines' logical
  offsets (the same whichever listener received them);
* :func:`locate`: where to go on after the broker's last ``Decnet-End``;
* :class:`SubjectSequence`: the compare-and-set bookkeeping
  (``Nats-Expected-Last-Subject-Sequence``);
* :func:`raw_headers`, :func:`event_headers`: every header;
* :func:`stream_config` and :func:`config_differences`: the stream we create,
  and how an existing one differs from it (reported, never changed).

Splitting a commit: a message ends at an LF when one fits, so a piece is whole
lines.  Its logical end inside a commit ``(ms, ss) → (me, se)`` is
``ss + (mirror bytes of that commit before the cut)``; :func:`locate` inverts
exactly that, so a publisher that resumes after such a piece continues at the
very next mirror byte.  (Logical and mirror lengths of a commit differ only
when the forwarder shipped a line truncated; then the logical length is the
larger, so every such end stays below ``se``.)
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence

import attrs

from decnet.errors import DecnetError
from decnet.listener.storage import IndexRecord

RAW_PREFIX = "decnet.raw"
EVENTS_PREFIX = "decnet.events"
SUBJECTS = "decnet.>"
DEFAULT_STREAM = "DECNET"
DEFAULT_MAX_MSG = 1024 * 1024
# Room kept in every message for its headers (the largest are well under 512 bytes).
HEADER_ROOM = 1024
# JetStream deduplicates by Nats-Msg-Id within this window (seconds).  It covers
# a publisher's retry after a lost PubAck; the resume point covers restarts.
DUPLICATE_WINDOW = 600.0

H_WORKER = "Decnet-Worker"
H_STREAM = "Decnet-Stream"
H_START = "Decnet-Start"
H_END = "Decnet-End"
H_GAP = "Decnet-Gap"
H_OFFSET = "Decnet-Offset"
H_MSG_ID = "Nats-Msg-Id"
H_EXPECTED_SEQ = "Nats-Expected-Last-Subject-Sequence"

# JetStream's error codes for a failed Nats-Expected-Last-Subject-Sequence: with the
# sequence it has, and without (a clustered stream with another check on the subject
# still in flight).
ERR_WRONG_LAST_SEQUENCE = 10071
ERR_WRONG_LAST_SEQUENCE_CONSTANT = 10164
FENCED_CODES = (ERR_WRONG_LAST_SEQUENCE, ERR_WRONG_LAST_SEQUENCE_CONSTANT)

_KEEP = re.compile(r"[a-z0-9-]")
_TOKEN = re.compile(r"(?:[a-z0-9-]|_[0-9a-f]{2})+")
STREAM_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


class PublishError(DecnetError):
    """Something the publisher cannot go on from by retrying (named in the message)."""


class StreamMismatch(PublishError):
    """The JetStream stream exists with another configuration than ours."""


class BrokerAhead(PublishError):
    """The broker's last ``Decnet-End`` of a stream is beyond this listener's mirror."""


# -- names ---------------------------------------------------------------------


def encode_token(name: str) -> str:
    """``name`` as one subject token: ``a-z 0-9 -`` kept, every other byte ``_xx`` (hex).

    Reversible (:func:`decode_token`) and subject-safe: no ``.``, ``*``, ``>``,
    whitespace or control character can come out.
    """
    if not name:
        raise ValueError("an empty name has no subject token")
    out = []
    for byte in name.encode("utf-8"):
        char = chr(byte)
        out.append(char if byte < 0x80 and _KEEP.fullmatch(char) else f"_{byte:02x}")
    return "".join(out)


def decode_token(token: str) -> str:
    """The name :func:`encode_token` spelled as ``token``; ``ValueError`` if it is not one."""
    if not _TOKEN.fullmatch(token):
        raise ValueError(f"not an encoded subject token: {token!r}")
    raw = bytearray()
    i = 0
    while i < len(token):
        if token[i] == "_":
            raw.append(int(token[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.append(ord(token[i]))
            i += 1
    name = raw.decode("utf-8")
    if encode_token(name) != token:
        raise ValueError(f"not the canonical spelling of {name!r}: {token!r}")
    return name


def raw_subject(worker: str, stream: str) -> str:
    return f"{RAW_PREFIX}.{encode_token(worker)}.{encode_token(stream)}"


def events_subject(worker: str, stream: str) -> str:
    return f"{EVENTS_PREFIX}.{encode_token(worker)}.{encode_token(stream)}"


def parse_subject(subject: str) -> tuple[str, str, str]:
    """``(kind, worker, stream)`` of one of our subjects (kind ``raw`` or ``events``)."""
    parts = subject.split(".")
    if len(parts) != 4 or parts[0] != "decnet" or parts[1] not in ("raw", "events"):
        raise ValueError(f"not a DECNET subject: {subject!r}")
    return parts[1], decode_token(parts[2]), decode_token(parts[3])


def raw_msg_id(worker: str, stream: str, end: int) -> str:
    return f"raw/{worker}/{stream}/{end}"


def event_msg_id(worker: str, stream: str, offset: int) -> str:
    return f"ev/{worker}/{stream}/{offset}"


# -- raw messages ----------------------------------------------------------------


@attrs.frozen
class Cursor:
    """Where a stream's publishing stands: the next index record, mirror and logical offsets.

    ``record`` is the index of the first record not wholly published (a
    record may be published in pieces: then ``mirror``/``offset`` are inside it).
    """

    record: int = 0
    mirror: int = 0
    offset: int = 0


@attrs.frozen
class RawPiece:
    """One raw message: logical ``[start, end)``, mirror ``[mirror_start, mirror_end)``.

    ``exact`` is true when ``end`` is a commit's end (a line end the forwarder
    named); only those are acknowledged.  ``after`` is the cursor once it is
    published.
    """

    start: int
    end: int
    mirror_start: int
    mirror_end: int
    gap: bool
    exact: bool
    after: Cursor

    @property
    def size(self) -> int:
        return self.mirror_end - self.mirror_start


def _cut(data: memoryview | bytes, at: int, most: int) -> int:
    """Where a piece starting at ``at`` ends: after the last LF within ``most`` bytes."""
    if len(data) - at <= most:
        return len(data)
    window = bytes(data[at : at + most])
    lf = window.rfind(b"\n")
    return at + (lf + 1 if lf >= 0 else most)


def plan_raw(
    cursor: Cursor, records: Sequence[IndexRecord], data: bytes, max_payload: int
) -> list[RawPiece]:
    """The raw messages for ``records`` (from ``cursor.record`` on), in order.

    ``data`` is the mirror from ``cursor.mirror`` to the last record's
    ``mirror_end``.  Consecutive commits share a message while it stays within
    ``max_payload``; a larger commit is split at line ends; a record that
    moves only the logical offset is a gap (an empty message).
    """
    if max_payload < 1:
        raise ValueError("max_payload must be positive")
    pieces: list[RawPiece] = []
    open_piece: RawPiece | None = None
    mirror, offset = cursor.mirror, cursor.offset
    for i, record in enumerate(records):
        number = cursor.record + i
        if record.stream_end <= offset and record.mirror_end <= mirror:
            continue  # (wholly published already, or an empty record)
        if record.mirror_end < mirror or record.stream_end < offset:
            raise PublishError(
                f"index record {number} goes backwards ({record.mirror_end}, "
                f"{record.stream_end}) from ({mirror}, {offset})"
            )
        after = Cursor(number + 1, record.mirror_end, record.stream_end)
        if record.moved:
            break  # (the bytes below its end are another listener's: see waiting_for_move)
        if record.mirror_end == mirror:
            if open_piece is not None:
                pieces.append(open_piece)
                open_piece = None
            pieces.append(RawPiece(offset, record.stream_end, mirror, mirror, True, True, after))
            offset = record.stream_end
            continue
        size = record.mirror_end - mirror
        if open_piece is not None and open_piece.size + size <= max_payload:
            open_piece = attrs.evolve(
                open_piece, end=record.stream_end, mirror_end=record.mirror_end, after=after
            )
        else:
            if open_piece is not None:
                pieces.append(open_piece)
            split = _split_record(number, mirror, offset, record, data, cursor.mirror, max_payload)
            pieces.extend(split[:-1])
            open_piece = split[-1]
        mirror, offset = record.mirror_end, record.stream_end
    if open_piece is not None:
        pieces.append(open_piece)
    return pieces


def _split_record(
    number: int,
    mirror: int,
    offset: int,
    record: IndexRecord,
    data: bytes,
    base: int,
    max_payload: int,
) -> list[RawPiece]:
    """One commit's bytes ``[mirror, record.mirror_end)`` as pieces of at most ``max_payload``."""
    view = memoryview(data)[mirror - base : record.mirror_end - base]
    if len(view) != record.mirror_end - mirror:
        raise PublishError(f"the mirror ends before index record {number} ({record.mirror_end})")
    pieces = []
    at = 0
    while at < len(view):
        stop = _cut(view, at, max_payload)
        if stop == len(view):
            end, exact = record.stream_end, True
            after = Cursor(number + 1, record.mirror_end, record.stream_end)
        else:
            end, exact = offset + stop, False
            if end >= record.stream_end:
                raise PublishError(
                    f"index record {number} has more mirror bytes than logical ones; "
                    f"it cannot be split below --nats-max-msg ({max_payload} bytes)"
                )
            after = Cursor(number, mirror + stop, end)
        start = offset + at
        pieces.append(RawPiece(start, end, mirror + at, mirror + stop, False, exact, after))
        at = stop
    return pieces


def locate(end: int, record_at: Callable[[int], IndexRecord], count: int) -> Cursor:
    """The cursor just after logical offset ``end`` (a published piece's ``Decnet-End``).

    ``record_at(i)`` reads index record ``i`` of ``count``; records are sorted
    by ``stream_end``, so this is a binary search (a few reads of a large
    index).  Raises :class:`BrokerAhead` when ``end`` is past the last record.
    """
    if end <= 0:
        return Cursor()
    lo, hi = 0, count
    while lo < hi:
        mid = (lo + hi) // 2
        if record_at(mid).stream_end < end:
            lo = mid + 1
        else:
            hi = mid
    if lo == count:
        last = record_at(count - 1).stream_end if count else 0
        raise BrokerAhead(f"the broker has offset {end}, this listener's mirror ends at {last}")
    record = record_at(lo)
    # Past an exact end, the next record's gap (if any) is still to come.
    if record.stream_end == end:
        return Cursor(lo + 1, record.mirror_end, end)
    previous = record_at(lo - 1) if lo else IndexRecord(0, 0, 0)
    if record.moved:
        return Cursor(lo, record.mirror_end, end)  # (inside a move: waiting_for_move)
    if previous.mirror_end == record.mirror_end:
        raise PublishError(f"offset {end} falls inside the gap of index record {lo}")
    return Cursor(lo, previous.mirror_end + (end - previous.stream_end), end)


def waiting_for_move(cursor: Cursor, records: Sequence[IndexRecord]) -> int | None:
    """The offset the broker must reach before this mirror goes on, if it waits for one.

    ``records`` start at ``cursor.record``.  A "moved" record (the worker
    arrived from another listener, :mod:`decnet.listener.storage`) is not a
    gap: the bytes below its end are that listener's to publish.  So
    :func:`plan_raw` stops there and the publisher reads the broker again
    until its last ``Decnet-End`` reaches the record's end, where
    :func:`locate` puts the cursor past it.  Gaps before it are passed over: raw
    publishes them first, but they have no event (:func:`plan_events`).
    """
    for record in records:
        if record.stream_end <= cursor.offset and record.mirror_end <= cursor.mirror:
            continue
        if record.moved:
            return record.stream_end
        if record.mirror_end > cursor.mirror:
            return None
    return None


def raw_headers(worker: str, stream: str, piece: RawPiece, expected: int) -> dict[str, str]:
    """Every header of one raw message (``expected``: the subject's last sequence, 0 if none)."""
    headers = {
        H_WORKER: worker,
        H_STREAM: stream,
        H_START: str(piece.start),
        H_END: str(piece.end),
        H_MSG_ID: raw_msg_id(worker, stream, piece.end),
        H_EXPECTED_SEQ: str(expected),
    }
    if piece.gap:
        headers[H_GAP] = "true"
    return headers


def header_end(headers: dict[str, str] | None) -> int:
    """The ``Decnet-End`` of a message we published (0 when there is none)."""
    value = (headers or {}).get(H_END)
    # (ASCII digits only, and no more than an offset has: ``int`` refuses "²" and 5,000
    # digits with a ValueError, which would end the stream's job instead of a retry.)
    if value is None or not value.isascii() or not value.isdigit() or len(value) > 20:
        raise PublishError(f"the last message carries no valid {H_END} header: {value!r}")
    return int(value)


# -- events ------------------------------------------------------------------


@attrs.frozen
class EventItem:
    """One event: a feed ``line`` whose mirror line is logical ``[start, end)``.

    ``after`` is the cursor once it is published (as for raw pieces).
    """

    start: int
    end: int
    line: bytes
    after: Cursor


def feed_line_span(line: bytes) -> tuple[int, int]:
    """``(mirror_offset, length)`` of one feed line (the JSON the feed builder wrote)."""
    try:
        entry = json.loads(line)
        offset, length = entry["mirror_offset"], entry["length"]
    except (ValueError, KeyError, TypeError) as exc:
        raise PublishError(f"a feed line has no mirror_offset and length: {exc}") from None
    for name, value in (("mirror_offset", offset), ("length", length)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise PublishError(f"a feed line has an invalid {name}: {value!r}")
    return offset, length


def plan_events(
    cursor: Cursor,
    records: Sequence[IndexRecord],
    lines: Sequence[tuple[int, int, bytes]],
    limit: int,
) -> list[EventItem]:
    """The next ``limit`` events at most, keyed by their *logical* offsets.

    ``records`` start at ``cursor.record``; ``lines`` are the feed's lines from
    the one at ``cursor.mirror`` on, as ``(mirror_offset, length, line)``.  A
    line's logical start is its commit's logical start plus the mirror bytes
    before it in the commit (the convention of :func:`plan_raw` and
    :func:`locate`), and the commit's last line ends at the commit's logical
    end; so the key of a line is the same whichever listener received it, and
    a publisher resuming after the broker's last ``Decnet-End`` finds it with
    :func:`locate`.  A gap has no line (it is in the raw subject); a "moved"
    record stops the plan (:func:`waiting_for_move`).  Stops early where the
    feed has no line yet.
    """
    items: list[EventItem] = []
    mirror, offset = cursor.mirror, cursor.offset
    at = 0
    for i, record in enumerate(records):
        number = cursor.record + i
        if record.stream_end <= offset and record.mirror_end <= mirror:
            continue
        if record.mirror_end < mirror or record.stream_end < offset:
            raise PublishError(
                f"index record {number} goes backwards ({record.mirror_end}, "
                f"{record.stream_end}) from ({mirror}, {offset})"
            )
        if record.moved:
            break
        if record.mirror_end == mirror:
            offset = record.stream_end  # (a gap)
            continue
        while mirror < record.mirror_end:
            if len(items) >= limit or at >= len(lines):
                return items
            line_mirror, length, line = lines[at]
            if line_mirror != mirror:
                raise PublishError(
                    f"the feed's next line is at mirror offset {line_mirror}, "
                    f"the mirror's at {mirror}"
                )
            line_end = mirror + length + 1
            if line_end > record.mirror_end:
                raise PublishError(
                    f"the feed line at mirror offset {mirror} crosses the end of index "
                    f"record {number} ({record.mirror_end})"
                )
            if line_end == record.mirror_end:
                end, after = record.stream_end, Cursor(number + 1, line_end, record.stream_end)
            else:
                end = offset + length + 1
                after = Cursor(number, line_end, end)
            items.append(EventItem(offset, end, line, after))
            mirror, offset = line_end, end
            at += 1
    return items


def event_headers(
    worker: str, stream: str, item: EventItem, expected: int | None = None
) -> dict[str, str]:
    """Every header of one event; ``expected``: the subject's last sequence, if named.

    Events go out in windows (:func:`settle_window`): the first event of a
    window names the subject's last sequence, so a publisher whose view is
    stale is refused there; the others carry their ``Nats-Msg-Id`` alone
    (a clustered stream refuses a second compare-and-set on a subject while
    the first is in flight), which JetStream deduplicates.
    """
    headers = {
        H_WORKER: worker,
        H_STREAM: stream,
        H_OFFSET: str(item.start),
        H_END: str(item.end),
        H_MSG_ID: event_msg_id(worker, stream, item.start),
    }
    if expected is not None:
        headers[H_EXPECTED_SEQ] = str(expected)
    return headers


@attrs.frozen
class Failure:
    """A message of a window that JetStream did not store: broker ``down`` or a refusal."""

    down: bool
    text: str


# One message's outcome: its stream sequence, None when fenced out, or a Failure.
Outcome = int | None | Failure


@attrs.frozen
class Settled:
    """What a window of in-flight events came to (:func:`settle_window`).

    ``done``: how many leading messages are stored (the position goes on after
    them); ``repair``: the messages before the last stored one that are not
    (a hole, to publish again at once); ``fenced``: another publisher took the
    stream over; ``failure``: the first failure after the last stored message.
    """

    done: int
    repair: tuple[int, ...]
    fenced: bool
    failure: Failure | None


def settle_window(outcomes: Sequence[Outcome]) -> Settled:
    """Settle a window of events published back to back on one connection.

    JetStream stores one connection's messages in order, so normally the
    stored ones are a prefix.  A stream leader that changes while they are
    in flight can lose message ``i`` and store ``i + 1``: that hole is
    listed in ``repair`` (republished at once with its ``Nats-Msg-Id``,
    well inside the duplicate window, so a message whose PubAck alone was
    lost is not stored twice), and the position goes on after the last
    stored message.
    """
    stored = [i for i, outcome in enumerate(outcomes) if isinstance(outcome, int)]
    last = stored[-1] if stored else -1
    repair = tuple(i for i in range(last) if not isinstance(outcomes[i], int))
    tail = outcomes[last + 1 :]
    failure = next((o for o in tail if isinstance(o, Failure)), None)
    return Settled(last + 1, repair, None in tail, failure)


def split_lines(chunk: bytes) -> tuple[list[bytes], int]:
    """The complete lines of ``chunk`` (without LF) and how many bytes they used."""
    used = chunk.rfind(b"\n") + 1
    if not used:
        return [], 0
    return chunk[: used - 1].split(b"\n"), used


# -- compare-and-set -------------------------------------------------------------


@attrs.define
class SubjectSequence:
    """The stream sequence of a subject's last message, as this publisher knows it.

    Every publish names it in ``Nats-Expected-Last-Subject-Sequence``; JetStream
    refuses the message if someone else published on the subject since.  A
    refusal means this publisher's view is stale: :meth:`fenced` forgets it,
    and the publisher reads the subject's last message again before it goes on.
    """

    last: int | None = None
    fences: int = 0

    @property
    def known(self) -> bool:
        return self.last is not None

    def expected(self) -> int:
        if self.last is None:
            raise PublishError("the subject's last sequence was never read")
        return self.last

    def learned(self, seq: int) -> None:
        """The subject's last message has ``seq`` (0: it has none)."""
        self.last = seq

    def published(self, seq: int) -> None:
        if self.last is not None and seq <= self.last:
            raise PublishError(f"JetStream acknowledged sequence {seq} after {self.last}")
        self.last = seq

    def fenced(self) -> None:
        self.fences += 1
        self.last = None


# -- the stream ------------------------------------------------------------------


def stream_config(name: str, replicas: int, max_msg: int) -> dict:
    """The JetStream stream we create when it is absent (JetStream API field names)."""
    return {
        "name": name,
        "subjects": [SUBJECTS],
        "storage": "file",
        "num_replicas": replicas,
        "retention": "limits",
        "discard": "old",
        "duplicate_window": int(DUPLICATE_WINDOW * 1_000_000_000),
        "max_msg_size": max_msg,
    }


# What must match in an existing stream for us to publish into it.
_COMPARED = ("subjects", "storage", "num_replicas", "retention", "duplicate_window")


def config_differences(existing: dict, wanted: dict) -> list[str]:
    """How ``existing`` (the server's stream config) differs from ``wanted``; ``[]`` if it fits.

    A ``max_msg_size`` smaller than ours also counts (our messages would be refused).
    """
    out = []
    for key in _COMPARED:
        have, want = existing.get(key), wanted.get(key)
        if key == "subjects":
            have, want = sorted(have or []), sorted(want or [])
        if have != want:
            out.append(f"{key} is {json.dumps(have)}, not {json.dumps(want)}")
    limit = existing.get("max_msg_size")
    if isinstance(limit, int) and 0 < limit < wanted["max_msg_size"]:
        out.append(f"max_msg_size is {limit}, below --nats-max-msg {wanted['max_msg_size']}")
    return out


_CREDS_JWT = re.compile(
    r"-{3,}BEGIN NATS USER JWT-{3,}\s*\n\s*([A-Za-z0-9_=-]+\.[A-Za-z0-9_=-]+\.[A-Za-z0-9_=-]+)\s*\n"
)
_CREDS_SEED = re.compile(r"-{3,}BEGIN USER NKEY SEED-{3,}\s*\n\s*(SU[A-Z2-7]{56})\s*\n")


def creds_problem(text: str) -> str | None:
    """Why ``text`` is not a NATS user credentials file (``None`` if it looks like one).

    A ``.creds`` file holds a user JWT and the user's NKey seed, each between
    ``BEGIN``/``END`` lines (as ``nsc`` writes it).  The answer never quotes
    the file: it holds a secret.
    """
    if not _CREDS_JWT.search(text):
        return "no BEGIN NATS USER JWT block with a JWT in it"
    if not _CREDS_SEED.search(text):
        return "no BEGIN USER NKEY SEED block with a user seed (SU...) in it"
    return None


def payload_limit(max_msg: int, server_max_payload: int) -> int:
    """The largest raw payload: ``max_msg`` less header room; refused if the server allows less."""
    if max_msg > server_max_payload:
        raise PublishError(
            f"--nats-max-msg {max_msg} is larger than the broker's max_payload "
            f"{server_max_payload}: lower --nats-max-msg or raise max_payload on the server"
        )
    return max_msg - HEADER_ROOM
