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
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs

from decnet.clock import utc_iso
from decnet.errors import (
    DuplicateHost,
    EnrollmentRefused,
    RegistryError,
    RenewalFailed,
    UnknownHost,
)
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
    # version 2: one-time enrollment tokens (``decnet-admin enroll --token``).  Only
    # the token's sha256 is stored; ``settings`` is the JSON the master decided for
    # the bundle (addresses, ports, validity).  ``used_at`` and ``answer`` (the
    # certificates and bundle.json sent back: public data) are set once, when a join
    # completes, in the transaction that adds the host.
    (
        """
    CREATE TABLE enroll_tokens (
        token_sha256 TEXT PRIMARY KEY,
        name         TEXT NOT NULL,
        settings     TEXT NOT NULL,
        created_at   REAL NOT NULL,
        expires_at   REAL NOT NULL,
        used_at      REAL,
        answer       TEXT
    )
        """,
        "CREATE INDEX enroll_tokens_by_name ON enroll_tokens (name)",
    ),
    # version 3: certificate renewal (``decnet-admin renew``, docs/Operations.md).
    # ``expires_at`` is the worker certificate's notAfter (ISO 8601, UTC; NULL for
    # hosts enrolled before it was recorded).  A renewal under way keeps the new
    # fingerprints (pinned alongside the current ones: the overlap window) and the
    # certificates the master signed (public data, pushed again on a rerun).
    (
        "ALTER TABLE hosts ADD COLUMN expires_at TEXT",
        "ALTER TABLE hosts ADD COLUMN pending_worker_fingerprint TEXT",
        "ALTER TABLE hosts ADD COLUMN pending_updater_fingerprint TEXT",
        "ALTER TABLE hosts ADD COLUMN pending_certificates TEXT",
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
    expires_at: str | None = None
    pending_worker_fingerprint: str | None = None
    pending_updater_fingerprint: str | None = None
    pending_certificates: str | None = None  # JSON: {"worker": PEM, "updater": PEM, "expires_at"}

    @property
    def renewing(self) -> bool:
        """A renewal is under way: both the current and the pending pins are accepted."""
        return self.pending_worker_fingerprint is not None

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
            _refuse_taken_name(db, host.name)
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

    # -- renewal (decnet.master.renewal) --------------------------------------------

    def begin_renewal(
        self, host: Host, worker_fp: str, updater_fp: str | None, certificates: str
    ) -> Host:
        """Record a renewal's new pins next to the current ones (the overlap begins).

        A compare-and-set on the current pins: refused (:class:`RenewalFailed`)
        when the host was decommissioned, or renewed by someone else, meanwhile.
        """
        with self._connect() as db:
            cur = db.execute(
                "UPDATE hosts SET pending_worker_fingerprint = ?, pending_updater_fingerprint = ?,"
                " pending_certificates = ? WHERE name = ? AND status != 'decommissioned'"
                " AND worker_fingerprint = ? AND pending_worker_fingerprint IS NULL",
                (worker_fp, updater_fp, certificates, host.name, host.worker_fingerprint),
            )
        if cur.rowcount != 1:
            raise RenewalFailed(_changed(host.name))
        return self.get(host.name)

    def confirm_renewal(self, host: Host, expires_at: str) -> Host:
        """Make the pending pins the only ones (the overlap ends); the host as it was before."""
        with self._connect() as db:
            cur = db.execute(
                "UPDATE hosts SET worker_fingerprint = pending_worker_fingerprint,"
                " updater_fingerprint = COALESCE(pending_updater_fingerprint, updater_fingerprint),"
                " expires_at = ?, pending_worker_fingerprint = NULL,"
                " pending_updater_fingerprint = NULL, pending_certificates = NULL"
                " WHERE name = ? AND status != 'decommissioned' AND pending_worker_fingerprint = ?",
                (expires_at, host.name, host.pending_worker_fingerprint),
            )
        if cur.rowcount != 1:
            raise RenewalFailed(_changed(host.name))
        return host

    def abandon_renewal(self, host: Host) -> None:
        """Forget a pending renewal the worker holds no key for (it starts again)."""
        with self._connect() as db:
            db.execute(
                "UPDATE hosts SET pending_worker_fingerprint = NULL,"
                " pending_updater_fingerprint = NULL, pending_certificates = NULL"
                " WHERE name = ? AND pending_worker_fingerprint = ?",
                (host.name, host.pending_worker_fingerprint),
            )


def _changed(name: str) -> str:
    return (
        f"{name!r} was decommissioned or renewed by another command meanwhile; "
        "nothing was changed (see `decnet-admin hosts`)"
    )


def _refuse_taken_name(db: sqlite3.Connection, name: str) -> None:
    """:class:`DuplicateHost` if ``name`` is enrolled, or was and has been decommissioned."""
    row = db.execute("SELECT status, revoked_at FROM hosts WHERE name = ?", (name,)).fetchone()
    if row is None:
        return
    if row[0] == "decommissioned":
        raise DuplicateHost(
            f"{name!r} was decommissioned at {row[1]}; a decommissioned name is never "
            "enrolled again (its certificates stay revoked): choose another name"
        )
    raise DuplicateHost(
        f"a host named {name!r} is already enrolled; choose another name (see `decnet-admin hosts`)"
    )


def token_digest(token: str) -> str:
    """How a token is stored and looked up: the sha256 of its text, lowercase hex."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


@attrs.frozen
class PendingEnrollment:
    """What an enrollment token was issued for (the token itself is never stored).

    ``settings`` holds what the master decided for the joining host: ``address``,
    ``sans``, ``updater``, ports, ``validity_days`` and the bundle's master values.
    """

    token_sha256: str
    name: str
    settings: dict
    created_at: float
    expires_at: float
    used_at: float | None = None
    answer: dict | None = None


def _add_token(db: sqlite3.Connection, pending: PendingEnrollment) -> None:
    _refuse_taken_name(db, pending.name)
    db.execute(
        "INSERT INTO enroll_tokens (token_sha256, name, settings, created_at, expires_at) "
        "VALUES (?, ?, ?, ?, ?)",
        (
            pending.token_sha256,
            pending.name,
            json.dumps(pending.settings, sort_keys=True),
            pending.created_at,
            pending.expires_at,
        ),
    )


_SELECT_ENROLLMENT = (
    "SELECT token_sha256, name, settings, created_at, expires_at, used_at, answer "
    "FROM enroll_tokens"
)


def _token_of(row: tuple) -> PendingEnrollment:
    answer = json.loads(row[6]) if row[6] is not None else None
    return PendingEnrollment(row[0], row[1], json.loads(row[2]), row[3], row[4], row[5], answer)


def _lookup(db: sqlite3.Connection, digest: str) -> PendingEnrollment | None:
    row = db.execute(f"{_SELECT_ENROLLMENT} WHERE token_sha256 = ?", (digest,)).fetchone()
    return None if row is None else _token_of(row)


def _pending(db: sqlite3.Connection, digest: str, now: float) -> PendingEnrollment:
    """The unused, unexpired token with ``digest``; :class:`EnrollmentRefused` otherwise."""
    pending = _lookup(db, digest)
    if pending is None:
        raise EnrollmentRefused("unknown enrollment token (ask the operator for a new one)")
    if pending.used_at is not None:
        raise EnrollmentRefused("this enrollment token has already been used")
    if now >= pending.expires_at:
        raise EnrollmentRefused(
            "this enrollment token has expired (issue a new one with `decnet-admin enroll --token`)"
        )
    return pending


class Tokens:
    """The enrollment-token half of a :class:`Registry` (same database, same lock)."""

    def __init__(self, registry: Registry):
        self.registry = registry

    def add(self, pending: PendingEnrollment) -> None:
        """Store a new token; refused if its name is enrolled or was decommissioned."""
        with self.registry._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                _add_token(db, pending)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def used(self, token: str) -> PendingEnrollment | None:
        """The token, if it exists and has been used (with the answer its join got)."""
        with self.registry._connect() as db:
            found = _lookup(db, token_digest(token))
        return found if found is not None and found.used_at is not None else None

    def redeem(
        self, token: str, complete: Callable[[PendingEnrollment], tuple[Host, dict]]
    ) -> tuple[Host, dict]:
        """Use ``token`` once: ``complete(pending)`` signs, its host is added, its answer kept.

        One transaction: the token is checked (known, unused, unexpired), the name
        is checked free, ``complete`` runs, the host row is inserted and the
        token marked used; any refusal or error rolls all of it back.  SQLite's
        write lock (``BEGIN IMMEDIATE``) makes two redemptions of one token
        strictly one after the other: the second sees ``used_at`` and is refused.
        """
        now = self.registry.now()
        with self.registry._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                pending = _pending(db, token_digest(token), now)
                try:
                    _refuse_taken_name(db, pending.name)
                except DuplicateHost as exc:
                    raise EnrollmentRefused(str(exc)) from None
                host, answer = complete(pending)
                db.execute(_INSERT, attrs.astuple(host))
                db.execute(
                    "UPDATE enroll_tokens SET used_at = ?, answer = ? WHERE token_sha256 = ?",
                    (now, json.dumps(answer, sort_keys=True), pending.token_sha256),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return host, answer

    def cancel(self, name: str) -> int:
        """Delete every unused token issued for ``name``; how many there were."""
        with self.registry._connect() as db:
            cur = db.execute(
                "DELETE FROM enroll_tokens WHERE name = ? AND used_at IS NULL", (name,)
            )
            return cur.rowcount

    def pending(self, name: str) -> list[PendingEnrollment]:
        """The unused tokens issued for ``name`` (expired ones included)."""
        with self.registry._connect() as db:
            rows = db.execute(
                f"{_SELECT_ENROLLMENT} WHERE name = ? AND used_at IS NULL ORDER BY created_at",
                (name,),
            ).fetchall()
        return [_token_of(row) for row in rows]
