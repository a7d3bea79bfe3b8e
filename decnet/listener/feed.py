"""The JSON lines feed, derived from the durable mirror with its own durable position.

Ingest makes the mirror durable first (that is what the forwarder's
acknowledgement means); the feed builder then turns committed mirror lines
into JSON, off the ingest hot path.  Its position ``(mirror_pos, feed_len,
idx_pos)`` is written to two checksummed slots after the feed is fsynced; on
start-up the feed is cut back to the recorded length, so every mirror line
becomes exactly one feed line, in order, however often the listener dies.

``feed_record`` (pure) defines one feed line and ``FeedEncoder`` (pure) produces
exactly the same lines much faster; ``FeedWriter`` (blocking) builds one
stream's feed and ``FeedBuilder`` (blocking) schedules many; they run in the
feed process (:mod:`decnet.listener.feedworker`), never in the listener's.
"""

from __future__ import annotations

import collections
import datetime
import fcntl
import json
import os
import re
import time
from concurrent.futures import BrokenExecutor
from pathlib import Path

from decnet.errors import DecnetError
from decnet.fsutil import PRIVATE_FILE_MODE
from decnet.listener import storage
from decnet.syslog import rfc5424

# How much mirror one build step turns into JSON (bounded work per thread job).
FEED_STEP_BYTES = 4 * 1024 * 1024

FEED_FORMAT = "decnet-feed/1"


def iso_utc(micros: int) -> str:
    """``received_at`` text: RFC 3339 UTC with microseconds."""
    moment = datetime.datetime.fromtimestamp(micros / 1_000_000, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def feed_record(
    line: bytes, *, worker: str, stream: str, received_at: str, mirror_offset: int
) -> dict:
    """One feed entry for one mirror line (without its LF).

    ``source_worker`` is the certificate CN of the sender; ``hostname`` is only
    what the message claims.  A line that is not RFC 5424 keeps its text in
    ``raw`` and says why in ``parse_error``.
    """
    record: dict = {
        "source_worker": worker,
        "stream": stream,
        "received_at": received_at,
        "mirror_offset": mirror_offset,
        "length": len(line),
    }
    try:
        msg = rfc5424.parse(line)
    except rfc5424.ParseError as exc:
        record["parsed"] = False
        record["parse_error"] = str(exc)
        record["raw"] = line.decode("utf-8", "replace")
        return record
    record["parsed"] = True
    record["pri"] = msg.pri
    record["facility"] = msg.facility
    record["severity"] = msg.severity
    record["version"] = msg.version
    record["timestamp"] = msg.timestamp
    record["hostname"] = msg.hostname
    record["app_name"] = msg.app_name
    record["procid"] = msg.procid
    record["msgid"] = msg.msgid
    record["structured_data"] = [
        {"id": e.id, "params": [list(p) for p in e.params]} for e in msg.structured_data
    ]
    record["msg"] = None if msg.msg is None else msg.msg.decode("utf-8", "replace")
    return record


_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
# The C string encoder behind ``_dumps`` (quotes included).
_quote = json.encoder.encode_basestring

# The fast path: one regex over a whole chunk (decoded as Latin-1, so one
# character is one byte and offsets stay byte offsets) matches the common,
# well-formed line whose header and STRUCTURED-DATA need no JSON escaping.
# Everything else takes ``feed_record``; both give the same bytes (a property
# test generates hostile lines to prove it).  It is built from the parser's own
# definitions (``rfc5424``: the TIMESTAMP pattern, the field limits) narrowed to
# what needs no escaping: the classes are the RFC 5424 ones minus '"' and '\'
# (and '[' ']' in SD-NAMEs); PRI is checked here exactly as ``rfc5424.parse``
# checks it.
_H = r"[!#-\[\]-~]"
_SD_NAME = rf"[!#-<>-Z^-~]{{1,{rfc5424.MAX_SD_NAME}}}"
_SD_VALUE = r"[ !#-\[\]-~]*"
# Possessive quantifiers: nothing here needs backtracking, and sre is faster without it
# (three-digit PRIs, the common ones, are tried first for the same reason).
_FAST_LINE = re.compile(
    r"^<(1[0-8][0-9]|19[01]|[1-9][0-9]?|0)>([1-9][0-9]{0,2}) "
    rf"(-|{rfc5424.TIMESTAMP_PATTERN}) ({_H}{{1,{rfc5424.MAX_HOSTNAME}}}+) "
    rf"({_H}{{1,{rfc5424.MAX_APP_NAME}}}+) ({_H}{{1,{rfc5424.MAX_PROCID}}}+) "
    rf"({_H}{{1,{rfc5424.MAX_MSGID}}}+) "
    rf'(-|(?>\[{_SD_NAME}+(?> {_SD_NAME}+="{_SD_VALUE}+")*+\])++)(?: (.*+))?$',
    re.MULTILINE | re.ASCII,
)
_LATIN1_BOM = rfc5424.BOM.decode("latin-1")
_FAST_HEADER = '"timestamp":"%s","hostname":"%s","app_name":"%s","procid":"%s","msgid":"%s"'
# A line whose header has a NILVALUE field: '"-"' → 'null' in the header part
# ('"' never occurs inside a field, so '"-"' can only be a whole one).
_FAST_TAIL_NIL = '%s%d,"length":%d,"parsed":true,%s,"version":%s,%s,"structured_data":%s,"msg":%s}'
# '"pri":…,"facility":…,"severity":…' for every PRI text the fast regex accepts.
_PRI_JSON = {
    str(pri): f'"pri":{pri},"facility":{pri >> 3},"severity":{pri & 7}' for pri in range(192)
}
# Distinct STRUCTURED-DATA shapes (ids and names, values left out) kept as templates.
_SD_TEMPLATES_MAX = 4096


class FeedEncoder:
    """Turns mirror lines into feed lines for one (worker, stream).  Pure.

    ``encode`` gives exactly ``_dumps(feed_record(line, ...))`` for every line,
    only faster: a compiled regex over the whole chunk takes the common lines,
    ``feed_record`` (the definition) the rest.
    """

    def __init__(self, worker: str, stream: str):
        self.worker = worker
        self.stream = stream
        self._head = (
            '{"source_worker":' + _quote(worker) + ',"stream":' + _quote(stream) + ',"received_at":'
        )
        self._sd_templates: dict[str, list[str] | None] = {}
        self.fast_lines = 0
        self.slow_lines = 0

    def encode(self, chunk: bytes, offset: int, received_at: str, out: list[str]) -> int:
        """Append one feed line (``str``, no LF) per line of ``chunk`` to ``out``.

        ``chunk`` is whole mirror lines, each ending in LF, starting at mirror
        offset ``offset``; every line gets ``received_at``.  Returns the count.
        """
        text = chunk.decode("latin-1")
        prefix = self._head + '"' + received_at + '","mirror_offset":'
        append = out.append
        before, slow_before = len(out), self.slow_lines
        sd_json = self._sd_json
        pri_json = _PRI_JSON
        quote = _quote
        pos = 0
        for m in _FAST_LINE.finditer(text):
            start, end = m.span()
            if start != pos:
                self._slow(text, pos, start, offset, received_at, out)
            groups = m.groups()
            pri, version, ts, host, app, procid, msgid, sd, msg = groups
            pos = end + 1
            if sd == "-":
                sd = "[]"
            else:
                sd = sd_json(sd)
                if sd is None:
                    self._slow(text, start, pos, offset, received_at, out)
                    continue
            if msg is None:
                msg = "null"
            else:
                if msg[:1] == "\xef" and msg.startswith(_LATIN1_BOM):
                    msg = msg[3:]
                if not msg.isascii():
                    msg = msg.encode("latin-1").decode("utf-8", "replace")
                msg = quote(msg)
            if "-" in groups[2:7]:
                # Some header field is NILVALUE: null instead of a string.
                header = (_FAST_HEADER % groups[2:7]).replace('"-"', "null")
                append(
                    _FAST_TAIL_NIL
                    % (prefix, offset + start, end - start, pri_json[pri], version, header, sd, msg)
                )
            else:
                # (An f-string: no format parsing per line, unlike %.)
                append(
                    f'{prefix}{offset + start},"length":{end - start},"parsed":true,'
                    f'{pri_json[pri]},"version":{version},"timestamp":"{ts}",'
                    f'"hostname":"{host}","app_name":"{app}","procid":"{procid}",'
                    f'"msgid":"{msgid}","structured_data":{sd},"msg":{msg}}}'
                )
        if pos < len(text):
            self._slow(text, pos, len(text), offset, received_at, out)
        count = len(out) - before
        self.fast_lines += count - (self.slow_lines - slow_before)
        return count

    def _slow(self, text: str, pos: int, stop: int, offset: int, received_at: str, out) -> None:
        """Lines ``text[pos:stop]`` (each ending in LF) through ``feed_record``."""
        for line in text[pos : stop - 1].split("\n"):
            raw = line.encode("latin-1")
            out.append(
                _dumps(
                    feed_record(
                        raw,
                        worker=self.worker,
                        stream=self.stream,
                        received_at=received_at,
                        mirror_offset=offset + pos,
                    )
                )
            )
            pos += len(raw) + 1
            self.slow_lines += 1

    def _sd_json(self, sd: str) -> str | None:
        # Values hold no '"' (the regex saw to it), so splitting at the quotes
        # alternates the shape's fixed text (even) and the values (odd); the
        # JSON is the same alternation with the fixed text rendered once.
        parts = sd.split('"')
        outside = parts[0::2]
        shape = "\0".join(outside)
        rendered = self._sd_templates.get(shape)
        if rendered is None:
            if shape in self._sd_templates:
                return None
            rendered = self._sd_template(outside)
            if len(self._sd_templates) >= _SD_TEMPLATES_MAX:
                self._sd_templates.clear()
            self._sd_templates[shape] = rendered
            if rendered is None:
                return None
        parts[0::2] = rendered
        return "".join(parts)

    @staticmethod
    def _sd_template(outside: list[str]) -> list[str] | None:
        """The JSON of one STRUCTURED-DATA shape, cut where the values go."""
        skeleton = '"\0"'.join(outside).encode("latin-1")
        try:
            elements, end = rfc5424.parse_structured_data(skeleton)
        except rfc5424.ParseError:
            return None
        if end != len(skeleton):
            return None
        rendered = _dumps([{"id": e.id, "params": [list(p) for p in e.params]} for e in elements])
        pieces = rendered.split("\\u0000")
        return pieces if len(pieces) == len(outside) else None


# A step is cut into pieces of about this size (at line ends) for the encoder pool.
PIECE_BYTES = 256 * 1024


def _pieces(chunk: bytes, base: int, records) -> list[tuple[int, int, str]]:
    """``(start, stop, received_at)`` spans of ``chunk`` (mirror offset ``base``).

    A line carries the receive time of the first commit whose end covers the
    line's end (commits end on line boundaries; the last record covers the
    rest; no record at all only happens to a hand-edited stream).
    """
    spans: list[tuple[int, int, str]] = []
    done, cut = 0, len(chunk)
    for i, record in enumerate(records):
        if i == len(records) - 1:
            stop = cut
        else:
            stop = chunk.rfind(b"\n", done, record.mirror_end - base) + 1
        if stop > done:
            spans.append((done, stop, iso_utc(record.received_at_us)))
            done = stop
    if done < cut:
        spans.append((done, cut, iso_utc(0)))
    pieces = []
    for start, stop, when in spans:
        while stop - start > PIECE_BYTES:
            mid = chunk.rfind(b"\n", start, start + PIECE_BYTES) + 1
            if mid <= start:
                break
            pieces.append((start, mid, when))
            start = mid
        pieces.append((start, stop, when))
    return pieces


_encoders: dict[tuple[str, str], FeedEncoder] = {}


def encode_piece(
    worker: str, stream: str, piece: bytes, offset: int, received_at: str
) -> tuple[bytes, int]:
    """Feed lines of ``piece`` as UTF-8 with LFs, and their count (for a process pool)."""
    encoder = _encoders.get((worker, stream))
    if encoder is None:
        encoder = _encoders[(worker, stream)] = FeedEncoder(worker, stream)
    out: list[str] = []
    count = encoder.encode(piece, offset, received_at, out)
    out.append("")
    return "\n".join(out).encode("utf-8"), count


class FeedCorrupt(DecnetError):
    pass


class FeedBusy(DecnetError):
    """Another process still builds this feed (a listener that was just killed)."""


class _Batch:
    """One step's mirror span and its feed lines, per piece: encoded, being encoded
    (pool futures), or to be encoded when asked (``encode``)."""

    def __init__(self, start: int, end: int, idx_pos: int, *, futures=(), encode=None):
        self.start, self.end, self.idx_pos = start, end, idx_pos
        self._futures = futures
        self._encode = encode

    def bodies(self):
        """``(feed bytes, line count)`` of each piece, in order."""
        if self._encode is not None:
            return self._encode()
        return (f.result() for f in self._futures)


class FeedWriter:
    """Builds ``<stream>.jsonl`` from ``<stream>.log`` for one (worker, stream).  Blocking.

    ``open`` takes an exclusive lock on the position file: a feed builder left
    behind by a killed listener finishes its step before a new one may write.
    """

    def __init__(self, files: storage.StreamFiles, worker: str, pool=None):
        self.files = files
        self.worker = worker
        self.encoder = FeedEncoder(worker, files.stream)
        # An executor (a process pool) to encode the pieces of a step in parallel.
        self.pool = pool
        self._next: _Batch | None = None
        self.position = storage.FeedPosition()
        self._feed_fd: int | None = None
        self._pos_fd: int | None = None
        self.reset_reason: str | None = None

    def open(self) -> storage.FeedPosition:
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        pos_fd = os.open(self.files.feed_pos_path, flags, PRIVATE_FILE_MODE)
        try:
            fcntl.flock(pos_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(pos_fd)
            raise FeedBusy(f"{self.files.feed_pos_path} is locked by another builder") from None
        self._pos_fd = pos_fd
        self._feed_fd = os.open(self.files.feed_path, flags, PRIVATE_FILE_MODE)
        position = storage.best_feed_position(
            [os.pread(self._pos_fd, storage.FEED_SLOT.size, i * 64) for i in (0, 1)]
        )
        feed_size = os.fstat(self._feed_fd).st_size
        mirror_size = os.stat(self.files.mirror_path).st_size
        if feed_size < position.feed_len or mirror_size < position.mirror_pos:
            # The feed (or mirror) was removed or cut by hand: rebuild from the start.
            self.reset_reason = (
                f"feed holds {feed_size} bytes, position says {position.feed_len}; "
                f"mirror holds {mirror_size}, position says {position.mirror_pos}"
            )
            position = storage.FeedPosition(sequence=position.sequence)
        if feed_size > position.feed_len:
            os.ftruncate(self._feed_fd, position.feed_len)
            os.fsync(self._feed_fd)
        os.lseek(self._feed_fd, 0, os.SEEK_END)
        self.position = position
        return position

    def step(self, mirror_end: int, limit: int = FEED_STEP_BYTES) -> int:
        """Turn up to ``limit`` committed mirror bytes into feed lines; return lines written.

        One write and one fsync of the feed, then one of the position, per
        step.  With a pool, the next step's lines are being encoded while this
        one is written (only encoded: nothing reaches the feed out of order).
        """
        pos = self.position
        if pos.mirror_pos >= mirror_end:
            return 0
        feed_fd, pos_fd = self._fds()
        batch, self._next = self._next, None
        if batch is None or batch.start != pos.mirror_pos:
            batch = self._prepare(pos.mirror_pos, pos.idx_pos, mirror_end, limit)
        if self.pool is not None and batch.end < mirror_end:
            self._next = self._prepare(batch.end, batch.idx_pos, mirror_end, limit)
        # Piece by piece (a small working set); bytes written past the recorded
        # length by a step that dies half-way are cut off by the next ``open``.
        written = count = 0
        try:
            for body, lines in batch.bodies():
                storage._write_all(feed_fd, body)
                written += len(body)
                count += lines
            os.fsync(feed_fd)
        except BaseException:
            # Leave the feed as its position describes it (never a half step).
            os.ftruncate(feed_fd, pos.feed_len)
            os.lseek(feed_fd, pos.feed_len, os.SEEK_SET)
            raise
        new = storage.FeedPosition(
            mirror_pos=batch.end,
            feed_len=pos.feed_len + written,
            idx_pos=batch.idx_pos,
            sequence=pos.sequence + 1,
        )
        os.pwrite(pos_fd, storage.pack_feed_slot(new), (new.sequence % 2) * 64)
        os.fsync(pos_fd)
        self.position = new
        return count

    def _fds(self) -> tuple[int, int]:
        """The feed's and the position's descriptors (``open`` first)."""
        if self._feed_fd is None or self._pos_fd is None:
            raise FeedCorrupt(f"{self.files.feed_path} is not open")
        return self._feed_fd, self._pos_fd

    def _read_lines(self, start: int, mirror_end: int, limit: int) -> bytes:
        """The whole lines of the mirror in ``[start, start + limit)`` (at least one)."""
        while True:
            want = min(mirror_end - start, limit)
            with open(self.files.mirror_path, "rb") as mirror:
                mirror.seek(start)
                chunk = mirror.read(want)
            cut = chunk.rfind(b"\n") + 1
            if cut:
                return chunk if cut == len(chunk) else chunk[:cut]
            if len(chunk) < mirror_end - start:
                # A line longer than one step: read it whole (lines are capped
                # by the frame size, so this stays bounded).
                limit *= 2
                continue
            raise FeedCorrupt(f"{self.files.mirror_path} ends without LF at {mirror_end}")

    def _prepare(self, start: int, idx_pos: int, mirror_end: int, limit: int) -> _Batch:
        """Read the whole lines of ``[start, start + limit)`` and start encoding them."""
        chunk = self._read_lines(start, mirror_end, limit)
        cut = len(chunk)
        end = start + cut
        records = storage.read_records(self.files.index_path, idx_pos, end)
        next_idx = idx_pos
        for record in records:
            if record.mirror_end > end:
                break
            next_idx += 1
        pieces = _pieces(chunk, start, records)
        if self.pool is None or len(pieces) < 2:

            def encode():
                for a, b, when in pieces:
                    out: list[str] = []
                    self.encoder.encode(chunk if b - a == cut else chunk[a:b], start + a, when, out)
                    out.append("")
                    yield "\n".join(out).encode("utf-8"), len(out) - 1

            return _Batch(start, end, next_idx, encode=encode)
        futures = [
            self.pool.submit(encode_piece, self.worker, self.files.stream, chunk[a:b], start + a, w)
            for a, b, w in pieces
        ]
        return _Batch(start, end, next_idx, futures=futures)

    def close(self) -> None:
        for fd in (self._feed_fd, self._pos_fd):
            if fd is not None:
                os.close(fd)  # also releases the lock
        self._feed_fd = self._pos_fd = None


def read_feed(path: Path) -> list[dict]:
    """Every entry of a feed file (for tests and tools)."""
    with open(path, "rb") as f:
        return [json.loads(line) for line in f if line.strip()]


# A stream whose feed is still locked by a builder a killed listener left
# behind is tried again after this long (that builder exits after one step).
BUSY_RETRY = 0.25
# Feeds whose files (the feed and its position, 2 descriptors) stay open at once.
DEFAULT_MAX_OPEN_FEEDS = 512


class FeedBuilder:
    """Keeps the feeds of many streams up to their committed mirror ends.  Blocking.

    ``target`` says how far a stream's mirror is durable; ``step`` does one
    bounded build step for one stream that is behind (round robin, so a large
    backlog never starves another worker's feed).  What happens is told to
    ``report`` as small dicts: ``{"worker", "stream", "pos", "lines"}`` after
    each durable step, ``"warn"`` when a feed is rebuilt from the start,
    ``"error"`` when a stream's feed stops (until the next start).

    At most ``max_open`` writers keep their files open: opening one more
    closes the least recently used, which is opened again (from its durable
    position, as after a restart) the next time its stream is behind.
    """

    def __init__(
        self,
        directory: Path,
        report,
        *,
        clock=None,
        step_bytes: int = FEED_STEP_BYTES,
        pool=None,
        max_open: int = DEFAULT_MAX_OPEN_FEEDS,
    ):
        self.directory = Path(directory)
        self.pool = pool
        self.report = report
        self.clock = clock or time.monotonic
        self.step_bytes = step_bytes
        self.max_open = max_open
        self.closed_idle = 0
        self._targets: dict[tuple[str, str], int] = {}
        # Open writers, least recently used first.
        self._writers: collections.OrderedDict[tuple[str, str], FeedWriter] = (
            collections.OrderedDict()
        )
        self._retry_at: dict[tuple[str, str], float] = {}
        # Where the feeds of closed writers stand (so an idle stream is not opened again).
        self._done: dict[tuple[str, str], int] = {}
        self._stopped: set[tuple[str, str]] = set()
        self._turn = 0

    def target(self, worker: str, stream: str, mirror_end: int) -> None:
        key = (worker, stream)
        if mirror_end > self._targets.get(key, -1):
            self._targets[key] = mirror_end

    def _behind(self, now: float) -> list[tuple[str, str]]:
        out = []
        for key, end in self._targets.items():
            if key in self._stopped or self._retry_at.get(key, 0.0) > now:
                continue
            writer = self._writers.get(key)
            # (An empty mirror needs no feed file yet: idle streams cost nothing.)
            done = writer.position.mirror_pos if writer is not None else self._done.get(key, 0)
            if done < end:
                out.append(key)
        return out

    def has_work(self) -> bool:
        return bool(self._behind(self.clock()))

    def retry_delay(self) -> float | None:
        """Seconds until a locked stream should be tried again; ``None`` if none waits."""
        waiting = [at for key, at in self._retry_at.items() if key not in self._stopped]
        return max(0.0, min(waiting) - self.clock()) if waiting else None

    def step(self) -> bool:
        """One build step for one stream that is behind; ``False`` if none is."""
        behind = self._behind(self.clock())
        if not behind:
            return False
        self._turn = (self._turn + 1) % len(behind)
        key = behind[self._turn]
        worker, stream = key
        try:
            writer = self._writers.get(key)
            if writer is None:
                writer = self._open(key)
                if writer is None:
                    return True
            else:
                self._writers.move_to_end(key)
            lines = writer.step(self._targets[key], self.step_bytes)
        except BrokenExecutor:
            raise  # the encoder pool is gone: not this stream's fault
        except Exception as exc:
            self._stopped.add(key)
            self._close(key)
            self.report({"worker": worker, "stream": stream, "error": f"{exc!r}"})
            return True
        self.report(
            {"worker": worker, "stream": stream, "pos": writer.position.mirror_pos, "lines": lines}
        )
        return True

    def _open(self, key: tuple[str, str]) -> FeedWriter | None:
        worker, stream = key
        if "/" in worker or worker in ("", ".", ".."):
            raise FeedCorrupt(f"invalid worker name {worker!r}")
        while len(self._writers) >= self.max_open:
            self.closed_idle += 1
            self._close(next(iter(self._writers)))
        writer = FeedWriter(storage.StreamFiles(self.directory / worker, stream), worker, self.pool)
        try:
            writer.open()
        except FeedBusy:
            self._retry_at[key] = self.clock() + BUSY_RETRY
            return None
        self._retry_at.pop(key, None)
        self._writers[key] = writer
        if writer.reset_reason:
            self.report({"worker": worker, "stream": stream, "warn": writer.reset_reason})
        return writer

    def _close(self, key: tuple[str, str]) -> None:
        writer = self._writers.pop(key, None)
        if writer is not None:
            self._done[key] = writer.position.mirror_pos
            writer.close()

    def feed_length(self, worker: str, stream: str) -> int | None:
        """The durable feed length of an open stream (``None`` if it is not open)."""
        writer = self._writers.get((worker, stream))
        return None if writer is None else writer.position.feed_len

    def open_feeds(self) -> int:
        """How many feeds have their files open."""
        return len(self._writers)

    def close(self) -> None:
        for key in list(self._writers):
            self._close(key)
