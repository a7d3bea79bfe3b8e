"""The PostgreSQL side of the sink and of ``decnet-admin events --postgres``.  Blocking.

psycopg 3 is imported here only, and only when a PostgreSQL store is used:
``make run``, the listener and the SQLite index never load it.  Every call
blocks; the sink runs them in the reactor's thread pool
(:mod:`decnet.threads`), the command in its own.

:meth:`SinkStore.write` stores one batch in one transaction: the event rows
with ``INSERT ... ON CONFLICT (worker, stream, stream_offset) DO NOTHING`` (a
message delivered again after a crash adds nothing), the rejected messages
beside them, then COMMIT.  The sink acknowledges the batch to JetStream only
after this returns.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from decnet.errors import DecnetError
from decnet.events.query import POSTGRES, Filters, build_query
from decnet.sink import rows

# Seconds a connection attempt may take (an unreachable server is retried, not waited on).
CONNECT_TIMEOUT = 5


class StoreUnavailable(DecnetError):
    """PostgreSQL cannot be used now (down, unreachable, disk full): retried later."""


class SchemaMismatch(DecnetError):
    """The tables exist with other columns than ours: the operator must fix them."""


def _psycopg() -> Any:
    import psycopg

    return psycopg


def connect(dsn: str, *, autocommit: bool = False) -> Any:
    """A psycopg connection; :class:`StoreUnavailable` with the reason when there is none."""
    psycopg = _psycopg()
    try:
        return psycopg.connect(
            dsn, autocommit=autocommit, connect_timeout=CONNECT_TIMEOUT, application_name="decnet"
        )
    except psycopg.Error as exc:
        raise StoreUnavailable(one_line(exc)) from None


def one_line(exc: BaseException) -> str:
    """The first line of a driver error (PostgreSQL's own are several)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def read_schema(conn: Any) -> dict[str, dict[str, str]]:
    """``{table: {column: data_type}}`` of our tables that exist (in the search path)."""
    found: dict[str, dict[str, str]] = {}
    cursor = conn.execute(
        "SELECT table_name, column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND table_name = ANY(%s)",
        ([rows.EVENTS_TABLE, rows.REJECTED_TABLE],),
    )
    for table, column, kind in cursor.fetchall():
        found.setdefault(table, {})[column] = kind
    return found


class SinkStore:
    """The sink's connection: creates the schema, writes batches."""

    def __init__(self, dsn: str):
        self.dsn = dsn
        self.conn: Any = None

    def open(self) -> None:
        """Connect (again) and make sure the tables are ours (created when absent)."""
        self.close()
        conn = connect(self.dsn)
        psycopg = _psycopg()
        try:
            # Two sinks starting on an empty database would race in CREATE TABLE IF NOT
            # EXISTS (a unique violation in PostgreSQL's catalog): one at a time.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (rows.WRITER_LOCK,))
            differences = rows.schema_differences(read_schema(conn))
            if differences:
                raise SchemaMismatch(
                    "PostgreSQL tables exist with another schema ("
                    + "; ".join(differences)
                    + "): rename or drop them, or point --postgres at another database"
                )
            conn.execute(rows.SCHEMA)
            conn.commit()
        except psycopg.Error as exc:
            conn.close()
            raise StoreUnavailable(one_line(exc)) from None
        except BaseException:
            conn.close()
            raise
        self.conn = conn

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            finally:
                self.conn = None

    def write(self, messages: Sequence[rows.Message]) -> tuple[int, int, list[rows.Rejected]]:
        """Store one batch in one transaction: ``(rows added, duplicates, rejected)``.

        A row PostgreSQL itself refuses (a value it cannot hold) is rejected
        with its reason instead of failing the batch; a connection or server
        failure raises :class:`StoreUnavailable` and nothing is committed.
        """
        psycopg = _psycopg()
        planned = rows.plan(messages)
        try:
            if self.conn is None or self.conn.closed:
                self.open()
            try:
                added, refused = self._write(planned.events)
            except psycopg.DataError:
                self.conn.rollback()
                added, refused = self._write_one_by_one(planned.events)
            rejected = planned.rejected + [
                rows.Rejected(_message_of(messages, row), reason) for row, reason in refused
            ]
            self._reject(rejected)
            self.conn.commit()
        except psycopg.Error as exc:
            self.close()
            raise StoreUnavailable(one_line(exc)) from None
        return added, len(planned.events) - added - len(refused), rejected

    def _lock(self) -> None:
        self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (rows.WRITER_LOCK,))

    def _write(self, events: list[rows.EventRow]) -> tuple[int, list[tuple[rows.EventRow, str]]]:
        self._lock()
        if not events:
            return 0, []
        # COPY into a session-local staging table, then one INSERT ... SELECT ... ON
        # CONFLICT DO NOTHING: a round trip per batch, not per row (executemany was one).
        self.conn.execute(rows.CREATE_STAGING)
        with self.conn.cursor() as cursor:
            with cursor.copy(rows.COPY_STAGING) as copy:
                for row in events:
                    copy.write_row(row)
            cursor.execute(rows.INSERT_FROM_STAGING)
            return max(cursor.rowcount, 0), []

    def _write_one_by_one(
        self, events: list[rows.EventRow]
    ) -> tuple[int, list[tuple[rows.EventRow, str]]]:
        psycopg = _psycopg()
        self._lock()
        added = 0
        refused = []
        for row in events:
            try:
                with self.conn.transaction():
                    added += self.conn.execute(rows.INSERT_EVENT, row).rowcount
            except psycopg.DataError as exc:
                refused.append((row, "PostgreSQL refused the row: " + one_line(exc)[:200]))
        return added, refused

    def _reject(self, rejected: list[rows.Rejected]) -> None:
        if rejected:
            with self.conn.cursor() as cursor:
                cursor.executemany(rows.INSERT_REJECTED, [r.row() for r in rejected])

    def counts(self) -> tuple[int, int]:
        """``(events, rejected)`` stored (for tests and operators)."""
        conn = connect(self.dsn, autocommit=True)
        try:
            events = conn.execute(f"SELECT count(*) FROM {rows.EVENTS_TABLE}").fetchone()[0]  # noqa: S608
            bad = conn.execute(f"SELECT count(*) FROM {rows.REJECTED_TABLE}").fetchone()[0]  # noqa: S608
        finally:
            conn.close()
        return int(events), int(bad)


def _message_of(messages: Sequence[rows.Message], row: rows.EventRow) -> rows.Message:
    for message in messages:
        if message.js_seq == row[-1]:
            return message
    raise AssertionError("a row always comes from a message of its batch")


class PgEvents:
    """``decnet-admin events --postgres``: :class:`EventIndex`'s queries on the sink's table."""

    def __init__(self, dsn: str):
        self.dsn = dsn
        self.path = "the PostgreSQL store"  # (named as EventIndex names its file)
        try:
            self.conn = connect(dsn, autocommit=True)
        except StoreUnavailable as exc:
            raise query_error(f"cannot connect to PostgreSQL: {exc}") from None
        found = read_schema(self.conn)
        if rows.EVENTS_TABLE not in found:
            self.conn.close()
            raise query_error(
                f"no table {rows.EVENTS_TABLE} in that database: it is created by "
                "twistd decnet-sink --postgres (is the sink running on this DSN?)"
            )

    def _run(self, sql: str, params: list[object]) -> Any:
        psycopg = _psycopg()
        try:
            return self.conn.execute(sql, params)
        except psycopg.Error as exc:
            raise query_error(f"PostgreSQL: {one_line(exc)}") from None

    def query(self, filters: Filters, limit: int) -> list[tuple[int, str]]:
        return [row for batch in self.batches(filters, limit) for row in batch]

    def batches(
        self, filters: Filters, limit: int, size: int = 1000
    ) -> Iterator[list[tuple[int, str]]]:
        sql, params = build_query(filters, limit=limit, dialect=POSTGRES)
        cursor = self._run(sql, params)
        while batch := cursor.fetchmany(size):
            yield [(int(i), str(e)) for i, e in batch]

    def follow(self, filters: Filters, after_id: int, limit: int) -> list[tuple[int, str]]:
        sql, params = build_query(filters, limit=limit, after_id=after_id, dialect=POSTGRES)
        return [(int(i), str(e)) for i, e in self._run(sql, params).fetchall()]

    def snapshot(self, filters: Filters, limit: int) -> tuple[list[tuple[int, str]], int]:
        """The ``limit`` latest matches and the last row id, in one REPEATABLE READ snapshot."""
        with self.conn.transaction():
            self._run("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ", [])
            found = self.query(filters, limit)
            last = self._run(f"SELECT coalesce(max(id), 0) FROM {rows.EVENTS_TABLE}", []).fetchone()  # noqa: S608
        return found, int(last[0])

    def replaced(self) -> bool:
        return False

    def close(self) -> None:
        self.conn.close()


def query_error(message: str) -> DecnetError:
    from decnet.errors import EventIndexError

    return EventIndexError(message)
