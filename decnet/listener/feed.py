"""The JSON lines feed, derived from the durable mirror with its own durable position.

Ingest makes the mirror durable first (that is what the forwarder's
acknowledgement means); the feed builder then turns committed mirror lines
into JSON, off the ingest hot path.  Its position ``(mirror_pos, feed_len,
idx_pos)`` is written to two checksummed slots after the feed is fsynced; on
start-up the feed is cut back to the recorded length, so every mirror line
becomes exactly one feed line, in order, however often the listener dies.

``feed_record`` (pure) defines one feed line; ``FeedWriter`` (blocking) runs in
the thread pool.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

from decnet.errors import DecnetError
from decnet.fsutil import PRIVATE_FILE_MODE
from decnet.listener import storage
from decnet.syslog import rfc5424

# How much mirror one build step turns into JSON (bounded work per thread job).
FEED_STEP_BYTES = 1024 * 1024

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


class FeedCorrupt(DecnetError):
    pass


class FeedWriter:
    """Builds ``<stream>.jsonl`` from ``<stream>.log`` for one (worker, stream).  Blocking."""

    def __init__(self, files: storage.StreamFiles, worker: str):
        self.files = files
        self.worker = worker
        self.position = storage.FeedPosition()
        self._feed_fd: int | None = None
        self._pos_fd: int | None = None
        self.reset_reason: str | None = None

    def open(self) -> storage.FeedPosition:
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        self._pos_fd = os.open(self.files.feed_pos_path, flags, PRIVATE_FILE_MODE)
        self._feed_fd = os.open(self.files.feed_path, flags, PRIVATE_FILE_MODE)
        slots = [
            storage.unpack_feed_slot(os.pread(self._pos_fd, storage.FEED_SLOT.size, i * 64))
            for i in (0, 1)
        ]
        valid = [s for s in slots if s is not None]
        position = max(valid, key=lambda s: s.sequence) if valid else storage.FeedPosition()
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
        """Turn up to ``limit`` committed mirror bytes into feed lines; return lines written."""
        pos = self.position
        if pos.mirror_pos >= mirror_end:
            return 0
        want = min(mirror_end - pos.mirror_pos, limit)
        with open(self.files.mirror_path, "rb") as mirror:
            mirror.seek(pos.mirror_pos)
            chunk = mirror.read(want)
        cut = chunk.rfind(b"\n") + 1
        if cut == 0:
            if len(chunk) < mirror_end - pos.mirror_pos:
                # A line longer than one step: read it whole (lines are capped
                # by the frame size, so this stays bounded).
                return self.step(mirror_end, limit * 2)
            raise FeedCorrupt(f"{self.files.mirror_path} ends without LF at {mirror_end}")
        chunk = chunk[:cut]
        new_mirror_pos = pos.mirror_pos + cut
        records = storage.read_records(self.files.index_path, pos.idx_pos, new_mirror_pos)
        out = []
        offset = pos.mirror_pos
        r = 0
        when_cache: dict[int, str] = {}
        for line in chunk.split(b"\n")[:-1]:
            end = offset + len(line) + 1
            while r < len(records) - 1 and records[r].mirror_end < end:
                r += 1
            at = records[r].received_at_us if records else 0
            when = when_cache.get(at)
            if when is None:
                when = when_cache[at] = iso_utc(at)
            entry = feed_record(
                line,
                worker=self.worker,
                stream=self.files.stream,
                received_at=when,
                mirror_offset=offset,
            )
            out.append(_dumps(entry))
            offset = end
        idx_pos = pos.idx_pos
        for record in records:
            if record.mirror_end <= new_mirror_pos:
                idx_pos += 1
            else:
                break
        body = ("\n".join(out) + "\n").encode("utf-8") if out else b""
        storage._write_all(self._feed_fd, body)
        os.fsync(self._feed_fd)
        new = storage.FeedPosition(
            mirror_pos=new_mirror_pos,
            feed_len=pos.feed_len + len(body),
            idx_pos=idx_pos,
            sequence=pos.sequence + 1,
        )
        os.pwrite(self._pos_fd, storage.pack_feed_slot(new), (new.sequence % 2) * 64)
        os.fsync(self._pos_fd)
        self.position = new
        return len(out)

    def close(self) -> None:
        for fd in (self._feed_fd, self._pos_fd):
            if fd is not None:
                os.close(fd)
        self._feed_fd = self._pos_fd = None


def read_feed(path: Path) -> list[dict]:
    """Every entry of a feed file (for tests and tools)."""
    with open(path, "rb") as f:
        return [json.loads(line) for line in f if line.strip()]
