"""``<ingest>/events.sqlite``: one row per feed entry, kept up to the feeds.  Blocking.

Each (worker, stream) has a position in the index: how many bytes of its
``.jsonl`` feed are indexed.  :meth:`EventIndex.index_feed` reads whole feed
lines from that position up to the feed's *durable* length (its ``.feed``
position file), inserts their rows and moves the position in one SQLite
transaction, opened with ``BEGIN IMMEDIATE`` so that the position is read
under the write lock.  Whatever is killed, and whoever else indexes the same
stream at the same time, every feed line becomes exactly one row (the key
``(worker, stream, mirror_offset)`` is UNIQUE: a second row would be refused,
not hidden).

The index is derived data: ``synchronous=NORMAL`` (WAL) may lose the last
transactions on a power cut, but never splits rows from their position, and
what was lost is indexed again from the feed.  A deleted index is rebuilt
from the feeds (:func:`durable_feeds` lists them).

Queries (:meth:`EventIndex.query`, :meth:`EventIndex.follow`) read only the
index, through a read-only connection when the caller is not the indexer.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from decnet.errors import EventIndexError
from decnet.events import query
from decnet.events.query import Filters
from decnet.listener import storage

INDEX_NAME = "events.sqlite"
SCHEMA_VERSION = 1
# Feed bytes one transaction indexes at most: bounded work between two commits,
# so a burst being indexed delays a new event (``--follow``) by a fraction of a
# second.  Each transaction writes every page it changed to the WAL, and the
# address index changes a page at a random place for each row: the larger the
# transaction, the fewer times a page is written (1 MiB wrote ~2.4 KiB per row,
# 4 MiB ~1 KiB; what the index writes competes with the feed for the disk).
STEP_BYTES = 4 * 1024 * 1024
# WAL pages before SQLite copies them into the database (and fsyncs it).  The
# default (1000 pages, 4 MiB) checkpointed after every transaction; 64 MiB
# writes a page changed by several transactions once, and fsyncs less often.
WAL_CHECKPOINT_PAGES = 16_000
# The indexer's page cache (KiB).
WRITER_CACHE_KIB = 64 * 1024
# How long a connection waits for another one's write lock (milliseconds).
BUSY_TIMEOUT_MS = 30_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS positions (
    worker TEXT NOT NULL, stream TEXT NOT NULL,
    feed_pos INTEGER NOT NULL, lines INTEGER NOT NULL,
    PRIMARY KEY (worker, stream));
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    worker TEXT NOT NULL, stream TEXT NOT NULL, mirror_offset INTEGER NOT NULL,
    time INTEGER NOT NULL, received INTEGER NOT NULL,
    decky TEXT, service TEXT, event TEXT, src BLOB, user TEXT,
    entry TEXT NOT NULL,
    UNIQUE (worker, stream, mirror_offset));
CREATE INDEX IF NOT EXISTS events_time ON events (time);
CREATE INDEX IF NOT EXISTS events_worker ON events (worker, time);
CREATE INDEX IF NOT EXISTS events_src ON events (src, time);
CREATE INDEX IF NOT EXISTS events_decky ON events (decky, time);
CREATE INDEX IF NOT EXISTS events_service ON events (service, time);
CREATE INDEX IF NOT EXISTS events_event ON events (event, time);
CREATE INDEX IF NOT EXISTS events_user ON events (user, time);
"""

_INSERT = (
    "INSERT INTO events (worker, stream, mirror_offset, time, received, decky, service, "
    "event, src, user, entry) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def index_path(ingest_dir: Path) -> Path:
    return Path(ingest_dir) / INDEX_NAME


def feed_length(files: storage.StreamFiles) -> int:
    """The durable length of a stream's feed (0 if it has no position yet)."""
    try:
        with open(files.feed_pos_path, "rb") as fh:
            raw = fh.read(128)
    except FileNotFoundError:
        return 0
    slots = [storage.unpack_feed_slot(raw[i : i + storage.FEED_SLOT.size]) for i in (0, 64)]
    valid = [s for s in slots if s is not None]
    return max(valid, key=lambda s: s.sequence).feed_len if valid else 0


def durable_feeds(ingest_dir: Path) -> Iterator[tuple[str, str, int]]:
    """``(worker, stream, durable feed length)`` of every feed under ``ingest_dir``."""
    try:
        workers = sorted(os.listdir(ingest_dir))
    except FileNotFoundError:
        return
    for worker in workers:
        directory = Path(ingest_dir) / worker
        if not directory.is_dir():
            continue
        for stream in sorted(storage.list_streams(directory)):
            yield worker, stream, feed_length(storage.StreamFiles(directory, stream))


def read_lines(path: Path, start: int, end: int, limit: int) -> bytes:
    """Whole lines of ``path`` in ``[start, min(end, start + limit))`` (a longer line whole).

    Nothing if the file is missing or shorter (a feed being rebuilt from its mirror).
    """
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        return b""
    with fh:
        fh.seek(start)
        while True:
            want = min(end - start, limit)
            chunk = fh.read(want)
            cut = chunk.rfind(b"\n") + 1
            if cut or want >= end - start:
                return chunk[:cut]
            fh.seek(start)
            limit *= 2


class EventIndex:
    """One connection to the index: the indexer's (read-write) or a reader's."""

    def __init__(self, path: Path, *, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        self.db = self._connect()
        self.inode = os.stat(self.path).st_ino

    def _connect(self) -> sqlite3.Connection:
        if self.readonly:
            if not self.path.exists():
                raise EventIndexError(
                    f"no event index at {self.path}: the listener's feed process builds it "
                    "(is the listener running, without --no-feed, on this --ingest directory?)"
                )
            uri = self.path.absolute().as_uri() + "?mode=ro"
            try:
                db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
                db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                db.execute("SELECT 1 FROM events LIMIT 1").fetchall()
            except sqlite3.Error as exc:
                raise EventIndexError(f"cannot read the event index {self.path}: {exc}") from None
            return db
        if not self.path.exists():
            self._create()
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        db.execute("PRAGMA synchronous = NORMAL")
        # Inserts touch eight B-trees at scattered places (addresses, users): keep
        # their inner pages in memory rather than re-reading them for every row.
        db.execute(f"PRAGMA cache_size = -{WRITER_CACHE_KIB}")
        db.execute(f"PRAGMA wal_autocheckpoint = {WAL_CHECKPOINT_PAGES}")
        return db

    def _create(self) -> None:
        """Make the empty index aside and link it in: a reader never sees it without tables.

        ``link`` does not replace: of two indexers creating it at once, one wins
        and the other opens the winner's.
        """
        fresh = self.path.with_name(f"{self.path.name}.new-{os.getpid()}")
        fresh.unlink(missing_ok=True)
        old_umask = os.umask(0o077)  # the index holds what attackers sent: 0600 like the feeds
        try:
            db = sqlite3.connect(fresh, isolation_level=None)
        finally:
            os.umask(old_umask)
        try:
            db.execute("PRAGMA journal_mode = WAL")
            db.executescript(_SCHEMA)
            db.execute("INSERT INTO meta (key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        finally:
            db.close()
        fd = os.open(fresh, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(fresh, self.path)
        except FileExistsError:
            pass
        finally:
            fresh.unlink()

    def replaced(self) -> bool:
        """Whether the index file was deleted or replaced since this connection opened it."""
        try:
            return os.stat(self.path).st_ino != self.inode
        except FileNotFoundError:
            return True

    def close(self) -> None:
        self.db.close()

    def position(self, worker: str, stream: str) -> int:
        row = self.db.execute(
            "SELECT feed_pos FROM positions WHERE worker = ? AND stream = ?", (worker, stream)
        ).fetchone()
        return 0 if row is None else int(row[0])

    def positions(self) -> dict[tuple[str, str], tuple[int, int]]:
        """``{(worker, stream): (feed bytes indexed, rows)}``."""
        rows = self.db.execute("SELECT worker, stream, feed_pos, lines FROM positions")
        return {(w, s): (int(p), int(n)) for w, s, p, n in rows}

    def index_feed(
        self, worker: str, stream: str, feed: Path, feed_end: int, limit: int = STEP_BYTES
    ) -> int:
        """Index the feed lines of ``worker/stream`` past its position, up to ``feed_end``.

        At most about ``limit`` bytes, in one transaction; returns the rows added.
        Raises :class:`EventIndexError` for a line that is not a feed entry or a
        row that is already there (the feed changed under the index).
        """
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            count = self._index_locked(worker, stream, feed, feed_end, limit)
        except BaseException:
            if db.in_transaction:  # (SQLITE_FULL has rolled it back already)
                db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return count

    def _index_locked(self, worker: str, stream: str, feed: Path, feed_end: int, limit: int) -> int:
        start = self.position(worker, stream)
        if start >= feed_end:
            return 0
        chunk = read_lines(feed, start, feed_end, limit)
        if not chunk:
            return 0
        rows = []
        offset = start
        for line in chunk.split(b"\n")[:-1]:
            try:
                text = line.decode("utf-8")
                row = query.index_row(query.parse_entry(text))
            except ValueError as exc:
                raise EventIndexError(
                    f"{feed} at byte {offset}: not a feed entry ({exc}); "
                    f"the feed changed under the index: delete {self.path} to rebuild it"
                ) from None
            rows.append((worker, stream, *row, text))
            offset += len(line) + 1
        try:
            self.db.executemany(_INSERT, rows)
        except sqlite3.IntegrityError:
            raise EventIndexError(
                f"{worker}/{stream}: rows between feed bytes {start} and {offset} are already "
                f"indexed; the feed was rebuilt differently: delete {self.path} to rebuild it"
            ) from None
        self.db.execute(
            "INSERT INTO positions (worker, stream, feed_pos, lines) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (worker, stream) DO UPDATE SET feed_pos = excluded.feed_pos, "
            "lines = lines + excluded.lines",
            (worker, stream, offset, len(rows)),
        )
        return len(rows)

    def query(self, filters: Filters, limit: int) -> list[tuple[int, str]]:
        """``(id, feed line)`` of the ``limit`` latest matches (0: all), oldest first."""
        return [row for batch in self.batches(filters, limit) for row in batch]

    def batches(
        self, filters: Filters, limit: int, size: int = 1000
    ) -> Iterator[list[tuple[int, str]]]:
        """:meth:`query` a batch at a time (a search for everything never sits in memory)."""
        sql, params = query.build_query(filters, limit=limit)
        cursor = self.db.execute(sql, params)
        while batch := cursor.fetchmany(size):
            yield batch

    def follow(self, filters: Filters, after_id: int, limit: int) -> list[tuple[int, str]]:
        """``(id, feed line)`` of matches indexed after row ``after_id``, in that order."""
        sql, params = query.build_query(filters, limit=limit, after_id=after_id)
        return self.db.execute(sql, params).fetchall()

    def snapshot(self, filters: Filters, limit: int) -> tuple[list[tuple[int, str]], int]:
        """:meth:`query` and the last row id, read at one instant (where ``--follow`` starts)."""
        self.db.execute("BEGIN")
        try:
            rows = self.query(filters, limit)
            return rows, self.last_id()
        finally:
            self.db.execute("COMMIT")

    def last_id(self) -> int:
        row = self.db.execute("SELECT max(id) FROM events").fetchone()
        return int(row[0] or 0)

    def count(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM events").fetchone()[0])
