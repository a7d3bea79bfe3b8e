"""The forwarder's journal in SQLite: per stream, the acknowledged offset and every
generation it has opened (:mod:`decnet.forwarder.journal` says what they mean).

One :meth:`JournalStore.commit` is one transaction (WAL, ``synchronous=FULL``):
the acknowledged offset and the generation records it carries become durable
together or not at all, so a ``kill -9`` or a power cut at any instant leaves
a journal that a restart can follow.

A state file written by an older forwarder (one row per stream in
``offsets``: the file identity and position last acknowledged) is migrated on
open into a journal with one generation.

Blocking: every method runs in the forwarder's thread lane, never on the
reactor.  ``updated_at`` is read from the clock the store is given (the
reactor's, in the daemon), never from the system clock directly.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from decnet.clock import utc_iso
from decnet.forwarder.journal import FileIdentity, GenerationRecord, Journal

SCHEMA_VERSION = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS streams (
    stream     TEXT PRIMARY KEY,
    acked      INTEGER NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS generations (
    stream  TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    dev     INTEGER NOT NULL,
    ino     INTEGER NOT NULL,
    fp_len  INTEGER NOT NULL,
    fp_hash TEXT NOT NULL,
    version INTEGER NOT NULL DEFAULT 0,
    mtime_ns INTEGER NOT NULL DEFAULT 0,
    base    INTEGER,
    end_    INTEGER,
    state   TEXT NOT NULL CHECK (state IN ('active', 'done', 'gone')),
    PRIMARY KEY (stream, seq)
);
"""


class JournalStore:
    """The journals of every stream of one forwarder state file."""

    def __init__(self, path: str | os.PathLike, now: Callable[[], float]):
        self.path = Path(path)
        self._now = now
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        with self._transaction():
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            if self._db.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
                self._migrate_v1()
                self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _migrate_v1(self) -> None:
        """Rows of the old ``offsets`` table become one-generation journals."""
        exists = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'offsets'"
        ).fetchone()
        if not exists:
            return
        now = self._timestamp()
        for stream, dev, ino, fp_len, fp_hash, base, pos in self._db.execute(
            "SELECT stream, dev, ino, fp_len, fp_hash, base, pos FROM offsets"
        ).fetchall():
            self._db.execute(
                "INSERT OR IGNORE INTO streams (stream, acked, updated_at) VALUES (?, ?, ?)",
                (stream, base + pos, now),
            )
            self._db.execute(
                "INSERT OR IGNORE INTO generations "
                "(stream, seq, dev, ino, fp_len, fp_hash, base, end_, state) "
                "VALUES (?, 1, ?, ?, ?, ?, ?, NULL, 'active')",
                (stream, dev, ino, fp_len, fp_hash, base),
            )
        self._db.execute("DROP TABLE offsets")

    def load(self, stream: str) -> Journal:
        with self._lock:
            row = self._db.execute(
                "SELECT acked FROM streams WHERE stream = ?", (stream,)
            ).fetchone()
            rows = self._db.execute(
                "SELECT seq, dev, ino, fp_len, fp_hash, version, mtime_ns, base, end_, state "
                "FROM generations "
                "WHERE stream = ? ORDER BY seq",
                (stream,),
            ).fetchall()
        records = tuple(
            GenerationRecord(
                seq, FileIdentity(dev, ino, fp_len, fp_hash, version, mtime), base, end, state
            )
            for seq, dev, ino, fp_len, fp_hash, version, mtime, base, end, state in rows
        )
        return Journal(row[0] if row else 0, records)

    def commit(
        self,
        stream: str,
        *,
        acked: int | None = None,
        records: list[GenerationRecord] | tuple = (),
        forget: list[int] | tuple = (),
    ) -> None:
        """Make ``acked`` and ``records`` durable together; drop the ``forget`` rows."""
        with self._lock, self._transaction():
            if acked is not None:
                self._db.execute(
                    "INSERT INTO streams (stream, acked, updated_at) VALUES (?, ?, ?) "
                    "ON CONFLICT(stream) DO UPDATE SET acked = excluded.acked, "
                    "updated_at = excluded.updated_at",
                    (stream, acked, self._timestamp()),
                )
            for rec in records:
                ident = rec.identity
                self._db.execute(
                    "INSERT INTO generations "
                    "(stream, seq, dev, ino, fp_len, fp_hash, version, mtime_ns, base, end_, state)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(stream, seq) DO UPDATE "
                    "SET dev = excluded.dev, ino = excluded.ino, fp_len = excluded.fp_len, "
                    "fp_hash = excluded.fp_hash, version = excluded.version, "
                    "mtime_ns = excluded.mtime_ns, "
                    "base = excluded.base, end_ = excluded.end_, state = excluded.state",
                    (
                        stream,
                        rec.seq,
                        ident.dev,
                        ident.ino,
                        ident.fp_len,
                        ident.fp_hash,
                        ident.version,
                        ident.mtime_ns,
                        rec.base,
                        rec.end,
                        rec.state,
                    ),
                )
            for seq in forget:
                self._db.execute(
                    "DELETE FROM generations WHERE stream = ? AND seq = ?", (stream, seq)
                )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _timestamp(self) -> str:
        """``updated_at``: the injected clock's time, ISO 8601 in UTC."""
        return utc_iso(self._now(), timespec="auto")
