"""Forwarder offsets in SQLite: per stream, the file identity and position shipped so far.

In acknowledged mode the row records the last position the listener confirmed
durable (the listener's high-water mark stays authoritative: on reconnect the
forwarder resumes where the listener says).  In plain mode it records the
position handed to the TLS transport.  A row is only ever applied to the file
whose identity (device, inode, fingerprint of the first bytes) it names.

Blocking: the service calls :class:`OffsetStore` through :class:`OffsetWriter`,
which runs it in a thread and coalesces writes (the newest position wins).
"""

from __future__ import annotations

import datetime
import os
import sqlite3
import threading
from pathlib import Path

from twisted.internet import defer
from twisted.logger import Logger

from decnet.forwarder.tail import FileIdentity, TailPosition

SCHEMA = """
CREATE TABLE IF NOT EXISTS offsets (
    stream     TEXT PRIMARY KEY,
    dev        INTEGER NOT NULL,
    ino        INTEGER NOT NULL,
    fp_len     INTEGER NOT NULL,
    fp_hash    TEXT NOT NULL,
    base       INTEGER NOT NULL,
    pos        INTEGER NOT NULL,
    updated_at TEXT NOT NULL
)
"""


class OffsetStore:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(SCHEMA)

    def load(self, stream: str) -> TailPosition | None:
        with self._lock:
            row = self._db.execute(
                "SELECT dev, ino, fp_len, fp_hash, base, pos FROM offsets WHERE stream = ?",
                (stream,),
            ).fetchone()
        if row is None:
            return None
        dev, ino, fp_len, fp_hash, base, pos = row
        return TailPosition(FileIdentity(dev, ino, fp_len, fp_hash), base, pos)

    def save(self, stream: str, position: TailPosition) -> None:
        ident = position.identity
        now = datetime.datetime.now(datetime.UTC).isoformat()
        with self._lock:
            self._db.execute(
                "INSERT INTO offsets (stream, dev, ino, fp_len, fp_hash, base, pos, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(stream) DO UPDATE SET "
                "dev=excluded.dev, ino=excluded.ino, fp_len=excluded.fp_len, "
                "fp_hash=excluded.fp_hash, base=excluded.base, pos=excluded.pos, "
                "updated_at=excluded.updated_at",
                (
                    stream,
                    ident.dev,
                    ident.ino,
                    ident.fp_len,
                    ident.fp_hash,
                    position.base,
                    position.pos,
                    now,
                ),
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()


class OffsetWriter:
    """Writes positions off the reactor, one at a time, newest wins."""

    log = Logger()

    def __init__(self, store: OffsetStore, stream: str, run):
        self.store = store
        self.stream = stream
        self.run = run
        self._latest: TailPosition | None = None
        self._writing: defer.Deferred | None = None
        self.saved: TailPosition | None = None

    def save(self, position: TailPosition) -> None:
        self._latest = position
        if self._writing is None:
            self._next()

    def _next(self) -> None:
        position, self._latest = self._latest, None
        if position is None:
            self._writing = None
            return
        d = self.run(self.store.save, self.stream, position)
        self._writing = d

        def done(_):
            self.saved = position
            self._next()

        def failed(failure):
            self.log.failure("Could not record the forwarder offset", failure)
            self._next()

        d.addCallbacks(done, failed)

    def flush(self) -> defer.Deferred:
        """Fires when every position given so far is written."""
        if self._writing is None:
            return defer.succeed(None)
        waiter: defer.Deferred = defer.Deferred()
        previous = self._writing

        def check(result):
            self.flush().chainDeferred(waiter)
            return result

        previous.addBoth(check)
        return waiter
