"""The master's host registry: one SQLite row per enrolled worker.

Blocking by design (``sqlite3``): the CLI calls it directly; a daemon calls it
through :mod:`decnet.threads`.  Each operation opens its own connection, so it is
safe from any thread, and the file uses WAL so readers never wait for a writer.

Schema migrations are a list indexed by ``PRAGMA user_version``; opening a
database applies whatever steps it has not seen yet, in one transaction each.

Single statements are atomic in SQLite.  A decision that reads a row and then
writes (``decommission``: read the host, revoke its certificates, mark it) is
not, across processes: such callers hold :meth:`Registry.lock`, an ``flock``
on ``.registry.sqlite.lock`` next to the database.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs

from decnet.clock import utc_iso
from decnet.errors import DuplicateHost, RegistryError, UnknownHost
from decnet.fsutil import lock_path_for, locked

STATUSES = ("enrolled", "active", "unreachable", "decommissioned")

# Each migration is a tuple of statements, applied inside one transaction.
MIGRATIONS: list[tuple[str, ...]] = [
    # version 1
    (
        """
    CREATE TABLE hosts (
        name                TEXT PRIMARY KEY,
        address             TEXT NOT NULL,
        agent_port          INTEGER NOT NULL,
        updater_port        INTEGER NOT NULL,
        worker_fingerprint  TEXT NOT NULL UNIQUE,
        updater_fingerprint TEXT UNIQUE,
        enrolled_at         TEXT NOT NULL,
        status              TEXT NOT NULL DEFAULT 'enrolled' CHECK (status IN
                            ('enrolled', 'active', 'unreachable', 'decommissioned')),
        revoked_at          TEXT
    )
        """,
    ),
]


def utc_now_iso() -> str:
    """Now, as the CLI records it (the wall clock; a :class:`Registry` takes its own)."""
    return utc_iso(time.time())


@attrs.frozen
class Host:
    name: str
    address: str
    agent_port: int
    updater_port: int
    worker_fingerprint: str
    updater_fingerprint: str | None
    enrolled_at: str
    status: str = "enrolled"
    revoked_at: str | None = None

    @property
    def has_updater(self) -> bool:
        return self.updater_fingerprint is not None

    @property
    def decommissioned(self) -> bool:
        return self.status == "decommissioned"

    def as_dict(self) -> dict:
        return attrs.asdict(self)


_COLUMNS = ", ".join(f.name for f in attrs.fields(Host))
# Built once from constant column names, never from input.
_SELECT = f"SELECT {_COLUMNS} FROM hosts"  # noqa: S608
_INSERT = f"INSERT INTO hosts ({_COLUMNS}) VALUES ({', '.join('?' * len(attrs.fields(Host)))})"  # noqa: S608


class Registry:
    """Enrolled hosts, persisted in ``path`` (created, and migrated, on open).

    ``now`` is the clock that dates what the registry records (seconds since the epoch).
    """

    def __init__(self, path: str | os.PathLike, *, now: Callable[[], float] = time.time):
        self.path = Path(path)
        self.now = now
        with self._connect() as db:
            self._migrate(db)

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """An exclusive ``flock`` for a read-modify-write spanning several calls.

        Blocks until every other process holding it is done.  Not reentrant.
        """
        return locked(lock_path_for(self.path))

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            yield db
        finally:
            db.close()

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        db.execute("BEGIN IMMEDIATE")
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise RegistryError(
                    f"registry schema version {version} is newer than this software "
                    f"({len(MIGRATIONS)}); upgrade decnet"
                )
            for number, statements in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in statements:
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {number}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    @property
    def schema_version(self) -> int:
        with self._connect() as db:
            return db.execute("PRAGMA user_version").fetchone()[0]

    def add(self, host: Host) -> None:
        """Insert a new host; :class:`DuplicateHost` if the name (or a fingerprint) exists."""
        with self._connect() as db:
            try:
                db.execute(_INSERT, attrs.astuple(host))
            except sqlite3.IntegrityError as exc:
                if "hosts.name" in str(exc):
                    raise DuplicateHost(
                        f"a host named {host.name!r} is already enrolled; "
                        "choose another name (see `decnet-admin hosts`)"
                    ) from None
                raise RegistryError(f"cannot enroll {host.name!r}: {exc}") from None

    def remove(self, name: str) -> None:
        """Delete a row outright (only used to undo an enrollment that failed half-way)."""
        with self._connect() as db:
            db.execute("DELETE FROM hosts WHERE name = ?", (name,))

    def get(self, name: str) -> Host:
        with self._connect() as db:
            row = db.execute(f"{_SELECT} WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise UnknownHost(f"no host named {name!r} is enrolled (see `decnet-admin hosts`)")
        return Host(*row)

    def list(self) -> list[Host]:
        with self._connect() as db:
            rows = db.execute(f"{_SELECT} ORDER BY name").fetchall()
        return [Host(*row) for row in rows]

    def set_status(self, name: str, status: str) -> None:
        """Record a health observation; a decommissioned host stays decommissioned."""
        if status not in STATUSES or status == "decommissioned":
            raise ValueError(f"invalid status {status!r}")
        with self._connect() as db:
            cur = db.execute(
                "UPDATE hosts SET status = ? WHERE name = ? AND status != 'decommissioned'",
                (status, name),
            )
            if cur.rowcount == 0:
                self.get(name)  # raises UnknownHost if that is why

    def decommission(self, name: str, when: str | None = None) -> Host:
        """Mark ``name`` decommissioned and revoked; returns the updated host."""
        when = when or utc_iso(self.now())
        with self._connect() as db:
            db.execute(
                "UPDATE hosts SET status = 'decommissioned', revoked_at = COALESCE(revoked_at, ?) "
                "WHERE name = ?",
                (when, name),
            )
        return self.get(name)
