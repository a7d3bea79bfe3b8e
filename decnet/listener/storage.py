"""The on-disk ingest of one (worker, stream): mirror, commit index, recovery.

Blocking file I/O only; the reactor side (:mod:`decnet.listener.ingest`) runs
every method here in the thread pool.  Layout under ``<ingest-dir>/<worker>/``
(documented in ``docs/Logging.md``)::

    <stream>.log    the byte-exact mirror: the worker's lines, in order
    <stream>.idx    the commit index: one 32-byte record per durable commit
    <stream>.jsonl  the JSON lines feed (written by the feed builder)
    <stream>.feed   the feed builder's durable position (two checksummed slots)

A commit appends the batch to the mirror, fsyncs it, then appends one index
record ``(mirror_end, stream_end, received_at)`` and fsyncs the index.  Only
then is the batch acknowledged.  On open, a torn index record is dropped and
any mirror bytes past the last record (written, never acknowledged) are cut,
so the mirror and the high-water mark always agree: that is what makes a
``kill -9`` at any instant safe.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from pathlib import Path

import attrs

from decnet.errors import DecnetError
from decnet.fsutil import PRIVATE_FILE_MODE, ensure_private_dir, fsync_dir

# Index record: magic, crc32 of the three numbers, mirror_end, stream_end,
# received_at (microseconds since the epoch).  Little-endian.
INDEX_RECORD = struct.Struct("<4sIQQQ")
INDEX_MAGIC = b"DXI1"
# A "moved" record: the worker arrived from another listener, and this mirror's next
# segment starts at ``stream_end`` (the bytes before it are on that listener: not a gap).
MOVED_MAGIC = b"DXM1"
_NUMBERS = struct.Struct("<QQQ")

# Feed position slot: magic, crc32, sequence, mirror_pos, feed_len, idx_pos.
FEED_SLOT = struct.Struct("<4sIQQQQ")
FEED_MAGIC = b"DXF1"
_FEED_NUMBERS = struct.Struct("<QQQQ")


class IngestCorrupt(DecnetError):
    """The files of a stream contradict each other (not something a crash can cause)."""


@attrs.frozen
class IndexRecord:
    mirror_end: int
    stream_end: int
    received_at_us: int
    moved: bool = False  # a segment start after a move (MOVED_MAGIC), not a commit or gap


def pack_record(record: IndexRecord) -> bytes:
    numbers = _NUMBERS.pack(record.mirror_end, record.stream_end, record.received_at_us)
    magic = MOVED_MAGIC if record.moved else INDEX_MAGIC
    return INDEX_RECORD.pack(magic, zlib.crc32(numbers), *_NUMBERS.unpack(numbers))


def unpack_record(raw: bytes) -> IndexRecord | None:
    """The record, or ``None`` when it is torn or not a record at all."""
    if len(raw) != INDEX_RECORD.size:
        return None
    magic, crc, mirror_end, stream_end, at = INDEX_RECORD.unpack(raw)
    if magic not in (INDEX_MAGIC, MOVED_MAGIC):
        return None
    if zlib.crc32(_NUMBERS.pack(mirror_end, stream_end, at)) != crc:
        return None
    return IndexRecord(mirror_end, stream_end, at, magic == MOVED_MAGIC)


@attrs.frozen
class FeedPosition:
    mirror_pos: int = 0
    feed_len: int = 0
    idx_pos: int = 0  # index of the first commit record not yet fully used
    sequence: int = 0


def pack_feed_slot(pos: FeedPosition) -> bytes:
    numbers = _FEED_NUMBERS.pack(pos.sequence, pos.mirror_pos, pos.feed_len, pos.idx_pos)
    return FEED_SLOT.pack(FEED_MAGIC, zlib.crc32(numbers), *_FEED_NUMBERS.unpack(numbers))


def unpack_feed_slot(raw: bytes) -> FeedPosition | None:
    if len(raw) != FEED_SLOT.size:
        return None
    magic, crc, seq, mirror_pos, feed_len, idx_pos = FEED_SLOT.unpack(raw)
    if (
        magic != FEED_MAGIC
        or zlib.crc32(_FEED_NUMBERS.pack(seq, mirror_pos, feed_len, idx_pos)) != crc
    ):
        return None
    return FeedPosition(mirror_pos, feed_len, idx_pos, seq)


def best_feed_position(slots: list[bytes]) -> FeedPosition:
    """The newest valid of a position file's two slots (the start when neither is valid)."""
    valid = [s for s in map(unpack_feed_slot, slots) if s is not None]
    return max(valid, key=lambda s: s.sequence) if valid else FeedPosition()


def _open(path: Path, flags: int) -> int:
    return os.open(path, flags | os.O_CLOEXEC, PRIVATE_FILE_MODE)


@attrs.define
class Recovered:
    """What opening a stream found: its durable ends and what was cut."""

    mirror_end: int
    stream_end: int
    records: int
    cut_mirror_bytes: int = 0
    cut_index_bytes: int = 0


def list_streams(directory: Path) -> set[str]:
    """The streams that have files in a worker's ``directory`` (none if it is absent).  Blocking."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return set()
    return {name[: -len(".idx")] for name in names if name.endswith(".idx")}


class StreamFiles:
    """The mirror and index of one (worker, stream), opened for appending.

    After :meth:`open` (which recovers), :meth:`close` may be called at any
    time to give the descriptors back: the next :meth:`commit` reopens the
    files, after checking that they are still the very files it wrote
    (same inode, same size).  Calls are serialised by a lock, so a close and
    a commit queued in the thread pool at the same time are both safe.
    """

    def __init__(self, directory: Path, stream: str):
        self.directory = directory
        self.stream = stream
        self.mirror_path = directory / f"{stream}.log"
        self.index_path = directory / f"{stream}.idx"
        self.feed_path = directory / f"{stream}.jsonl"
        self.feed_pos_path = directory / f"{stream}.feed"
        self._mirror_fd: int | None = None
        self._index_fd: int | None = None
        self._lock = threading.Lock()
        # (inode, size) of the mirror and of the index as this object left them.
        self._expected: tuple[tuple[int, int], tuple[int, int]] | None = None
        self.reopens = 0

    @property
    def is_open(self) -> bool:
        return self._mirror_fd is not None

    def open(self) -> Recovered:
        """Create or recover the stream; returns the durable state.  Blocking."""
        with self._lock:
            return self._open()

    def _open(self) -> Recovered:
        created = not self.directory.exists()
        ensure_private_dir(self.directory)
        if created:
            fsync_dir(self.directory.parent)
        index_fd = _open(self.index_path, os.O_RDWR | os.O_CREAT)
        mirror_fd = _open(self.mirror_path, os.O_RDWR | os.O_CREAT)
        try:
            state = self._recover(index_fd, mirror_fd)
        except BaseException:
            os.close(index_fd)
            os.close(mirror_fd)
            raise
        os.lseek(index_fd, 0, os.SEEK_END)
        os.lseek(mirror_fd, 0, os.SEEK_END)
        self._index_fd, self._mirror_fd = index_fd, mirror_fd
        self._expected = (_identity(mirror_fd), _identity(index_fd))
        if created:
            fsync_dir(self.directory)
        return state

    def _reopen(self) -> None:
        if self._expected is None:
            raise IngestCorrupt(f"{self.mirror_path} was never opened")
        mirror_fd = _open(self.mirror_path, os.O_RDWR)
        try:
            index_fd = _open(self.index_path, os.O_RDWR)
        except BaseException:
            os.close(mirror_fd)
            raise
        found = (_identity(mirror_fd), _identity(index_fd))
        if found != self._expected:
            os.close(mirror_fd)
            os.close(index_fd)
            (m_ino, m_size), (i_ino, i_size) = self._expected
            raise IngestCorrupt(
                f"{self.mirror_path} or its index changed while the listener had them closed "
                f"(expected inodes {m_ino}/{i_ino} of {m_size}/{i_size} bytes, found "
                f"{found[0][0]}/{found[1][0]} of {found[0][1]}/{found[1][1]}); refusing to "
                "append (move the stream's files away to start it afresh)"
            )
        os.lseek(index_fd, 0, os.SEEK_END)
        os.lseek(mirror_fd, 0, os.SEEK_END)
        self._index_fd, self._mirror_fd = index_fd, mirror_fd
        self.reopens += 1

    def _recover(self, index_fd: int, mirror_fd: int) -> Recovered:
        size = os.fstat(index_fd).st_size
        count, last = last_record(index_fd)
        usable = count * INDEX_RECORD.size
        cut_index = size - usable
        if cut_index:
            os.ftruncate(index_fd, usable)
            os.fsync(index_fd)
        mirror_end = last.mirror_end if last else 0
        stream_end = last.stream_end if last else 0
        mirror_size = os.fstat(mirror_fd).st_size
        if mirror_size < mirror_end:
            raise IngestCorrupt(
                f"{self.mirror_path} holds {mirror_size} bytes but its index says "
                f"{mirror_end} were committed; refusing to guess (restore it from backup "
                "or move the stream's files away)"
            )
        cut_mirror = mirror_size - mirror_end
        if cut_mirror:
            os.ftruncate(mirror_fd, mirror_end)
            os.fsync(mirror_fd)
        return Recovered(
            mirror_end=mirror_end,
            stream_end=stream_end,
            records=usable // INDEX_RECORD.size,
            cut_mirror_bytes=cut_mirror,
            cut_index_bytes=cut_index,
        )

    def commit(self, data: bytes, records: list[IndexRecord]) -> None:
        """Append ``data`` to the mirror and ``records`` to the index, durably.  Blocking.

        The mirror is made durable before the index record that covers it, so
        an index record never points past what the mirror holds.  Reopens the
        files first if they were closed.
        """
        with self._lock:
            if self._mirror_fd is None or self._index_fd is None:
                self._reopen()
            mirror_fd, index_fd = self._mirror_fd, self._index_fd
            assert mirror_fd is not None and index_fd is not None  # (just reopened)
            if data:
                _write_all(mirror_fd, data)
                os.fsync(mirror_fd)
            _write_all(index_fd, b"".join(pack_record(r) for r in records))
            os.fsync(index_fd)
            self._expected = (_identity(mirror_fd), _identity(index_fd))

    def close(self) -> None:
        """Give the descriptors back (the next commit reopens them).  Blocking."""
        with self._lock:
            for fd in (self._mirror_fd, self._index_fd):
                if fd is not None:
                    os.close(fd)
            self._mirror_fd = self._index_fd = None


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_ino, st.st_size


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _record_at(fd: int, number: int) -> IndexRecord | None:
    size = INDEX_RECORD.size
    return unpack_record(os.pread(fd, size, number * size))


def last_record(index_fd: int) -> tuple[int, IndexRecord | None]:
    """The number of records up to the last valid one, and that record: records torn at
    the end (a commit cut by a crash, or being written) are not counted.  Blocking."""
    count = os.fstat(index_fd).st_size // INDEX_RECORD.size
    while count:
        last = _record_at(index_fd, count - 1)
        if last is not None:
            return count, last
        count -= 1
    return 0, None


class IndexFile:
    """Random access to a stream's commit index, for a binary search
    (:func:`decnet.listener.publishing.locate`): a few reads of one record each,
    never the whole file (a long-lived stream's index holds millions of records).
    Records torn at the end (a commit being written) are not counted; one torn in
    the middle raises :class:`IngestCorrupt` when read.  A missing file is empty.
    Blocking."""

    def __init__(self, path: Path):
        self.path = path
        self.reads = 0
        try:
            self._fd: int | None = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._fd = None
            self.count = 0
            return
        try:
            self.count, _ = last_record(self._fd)
        except BaseException:
            self.close()
            raise

    def _read(self, number: int) -> IndexRecord | None:
        assert self._fd is not None
        self.reads += 1
        return _record_at(self._fd, number)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, number: int) -> IndexRecord:
        if not 0 <= number < self.count:
            raise IndexError(number)
        record = self._read(number)
        if record is None:
            raise IngestCorrupt(f"index record {number} of {self.path} is not a valid record")
        return record

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> IndexFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_records(path: Path, first: int = 0, until_mirror: int | None = None) -> list[IndexRecord]:
    """Index records from number ``first`` on, up to the first whose ``mirror_end`` reaches
    ``until_mirror`` (all when ``None``); stops at a torn record.  Blocking."""
    out: list[IndexRecord] = []
    size = INDEX_RECORD.size
    with open(path, "rb") as f:
        f.seek(first * size)
        while True:
            block = f.read(size * 256)
            for i in range(0, len(block) - size + 1, size):
                record = unpack_record(block[i : i + size])
                if record is None:
                    return out
                out.append(record)
                if until_mirror is not None and record.mirror_end >= until_mirror:
                    return out
            if len(block) < size * 256:
                return out
