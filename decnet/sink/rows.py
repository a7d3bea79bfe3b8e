"""What the PostgreSQL sink stores, decided without I/O.

One JetStream message of ``decnet.events.<worker>.<stream>`` (the publisher's,
see docs/Scale-Out.md) becomes one row of ``decnet_events`` keyed by
``(worker, stream, stream_offset)`` (its ``Decnet-Offset``: the logical offset
of its line in the worker's stream, the same whichever listener received it),
or, when it cannot be one, one row of
``decnet_rejected_events`` that keeps its bytes and says why (:func:`plan`).
A rejected message is still acknowledged: a message that can never be stored
must not come back for ever (poison message; docs/Events.md).

The columns are the filters of ``decnet-admin events`` (:mod:`decnet.events.query`
computes them, as for the SQLite index); ``entry`` is the feed line exactly as
published, so ``--json`` prints the same bytes from either store.  PostgreSQL
text holds neither NUL nor lone surrogates: a filter column with one (JSON
``\u0000``, ``\ud800``) gets U+FFFD instead (:func:`pg_text`); the ``entry``
keeps its escapes as written, and an entry holding a raw NUL byte or bytes
that are not UTF-8 is rejected.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Mapping, Sequence

import attrs

from decnet.events import query
from decnet.listener import publishing

EVENTS_TABLE = "decnet_events"
REJECTED_TABLE = "decnet_rejected_events"
# The largest entry stored as an event; a longer one is rejected (kept as bytes).
MAX_ENTRY = 1024 * 1024

# name → PostgreSQL type (information_schema.columns.data_type) of each table.
EVENT_COLUMNS: dict[str, str] = {
    "id": "bigint",
    "worker": "text",
    "stream": "text",
    "stream_offset": "bigint",
    "time": "bigint",
    "received": "bigint",
    "decky": "text",
    "service": "text",
    "event": "text",
    "src_ip": "inet",
    "user": "text",
    "entry": "text",
    "js_seq": "bigint",
}
REJECTED_COLUMNS: dict[str, str] = {
    "id": "bigint",
    "js_stream": "text",
    "js_seq": "bigint",
    "subject": "text",
    "headers": "text",
    "data": "bytea",
    "reason": "text",
    "rejected_at": "timestamp with time zone",
}

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {EVENTS_TABLE} (
    id bigserial NOT NULL UNIQUE,
    worker text NOT NULL, stream text NOT NULL, stream_offset bigint NOT NULL,
    time bigint NOT NULL, received bigint NOT NULL,
    decky text, service text, event text, src_ip inet, "user" text,
    entry text NOT NULL, js_seq bigint NOT NULL,
    PRIMARY KEY (worker, stream, stream_offset));
CREATE INDEX IF NOT EXISTS {EVENTS_TABLE}_time ON {EVENTS_TABLE} (time);
CREATE INDEX IF NOT EXISTS {EVENTS_TABLE}_worker ON {EVENTS_TABLE} (worker, time);
CREATE INDEX IF NOT EXISTS {EVENTS_TABLE}_src ON {EVENTS_TABLE} USING gist (src_ip inet_ops);
CREATE INDEX IF NOT EXISTS {EVENTS_TABLE}_decky ON {EVENTS_TABLE} (decky, time);
CREATE INDEX IF NOT EXISTS {EVENTS_TABLE}_service ON {EVENTS_TABLE} (service, time);
CREATE INDEX IF NOT EXISTS {EVENTS_TABLE}_event ON {EVENTS_TABLE} (event, time);
CREATE INDEX IF NOT EXISTS {EVENTS_TABLE}_user ON {EVENTS_TABLE} ("user", time);
CREATE TABLE IF NOT EXISTS {REJECTED_TABLE} (
    id bigserial PRIMARY KEY,
    js_stream text NOT NULL, js_seq bigint NOT NULL,
    subject text NOT NULL, headers text NOT NULL, data bytea NOT NULL, reason text NOT NULL,
    rejected_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (js_stream, js_seq));
"""

INSERT_EVENT = (
    f"INSERT INTO {EVENTS_TABLE} (worker, stream, stream_offset, time, received, decky, "  # noqa: S608
    'service, event, src_ip, "user", entry, js_seq) '
    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s::inet, %s, %s, %s) "
    "ON CONFLICT (worker, stream, stream_offset) DO NOTHING"
)
_COLUMNS = (
    'worker, stream, stream_offset, time, received, decky, service, event, src_ip, "user", '
    "entry, js_seq"
)
# A batch is copied into this (per session, emptied at each commit), then inserted at once.
CREATE_STAGING = (
    "CREATE TEMP TABLE IF NOT EXISTS decnet_batch "
    "(worker text, stream text, stream_offset bigint, time bigint, received bigint, "
    'decky text, service text, event text, src_ip inet, "user" text, entry text, js_seq bigint) '
    "ON COMMIT DELETE ROWS"
)
COPY_STAGING = f"COPY decnet_batch ({_COLUMNS}) FROM STDIN"
INSERT_FROM_STAGING = (
    f"INSERT INTO {EVENTS_TABLE} ({_COLUMNS}) SELECT {_COLUMNS} FROM decnet_batch "  # noqa: S608
    "ORDER BY js_seq ON CONFLICT (worker, stream, stream_offset) DO NOTHING"
)
INSERT_REJECTED = (
    f"INSERT INTO {REJECTED_TABLE} (js_stream, js_seq, subject, headers, data, reason) "  # noqa: S608
    "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (js_stream, js_seq) DO NOTHING"
)
# Every writer takes this transaction lock first: rows are numbered (``id``) in
# commit order, so ``--follow`` (``id > last``) never skips a row committed late.
WRITER_LOCK = 0x64656E6574  # "denet"


@attrs.frozen
class Message:
    """One JetStream message as the consumer process hands it over."""

    subject: str
    headers: Mapping[str, str]
    data: bytes
    js_stream: str
    js_seq: int


EventRow = tuple[
    str, str, int, int, int, str | None, str | None, str | None, str | None, str | None, str, int
]


@attrs.frozen
class Rejected:
    """A message that is no event row: kept whole, with the reason."""

    message: Message
    reason: str

    def row(self) -> tuple[str, int, str, str, bytes, str]:
        m = self.message
        headers = json.dumps(dict(m.headers), sort_keys=True)
        return (m.js_stream, m.js_seq, pg_text(m.subject), headers, m.data, self.reason)


@attrs.frozen
class Plan:
    """What one batch writes."""

    events: list[EventRow]
    rejected: list[Rejected]


def pg_text(value: str) -> str:
    """``value`` as PostgreSQL text can hold it: NUL and lone surrogates become U+FFFD."""
    if value.isascii() and "\x00" not in value:
        return value
    fixed = value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return fixed.replace("\x00", "\ufffd")


def inet_text(key: bytes | None) -> str | None:
    """The address of a 16-byte :func:`decnet.events.query.ip_key` (IPv4 when mapped)."""
    if key is None:
        return None
    if key[:12] == query.V4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, key[12:])
    return socket.inet_ntop(socket.AF_INET6, key)


def _optional(value: str | None) -> str | None:
    return None if value is None else pg_text(value)


def event_row(message: Message) -> EventRow:
    """The ``decnet_events`` row of one message; ``ValueError`` says why there is none."""
    _kind, worker, stream = _subject(message.subject)
    if len(message.data) > MAX_ENTRY:
        raise ValueError(f"entry of {len(message.data)} bytes, above {MAX_ENTRY}")
    if b"\x00" in message.data:
        raise ValueError("the entry holds a NUL byte")
    try:
        text = message.data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"the entry is not UTF-8 (byte {exc.start})") from None
    entry = query.parse_entry(text)
    _mirror, happened, received, decky, service, event, src, user = query.index_row(entry)
    offset, end = (_header_number(message, h) for h in (publishing.H_OFFSET, publishing.H_END))
    if end <= offset:
        raise ValueError(f"header {publishing.H_END} {end} is not after the offset {offset}")
    for name, value in ((publishing.H_WORKER, worker), (publishing.H_STREAM, stream)):
        if message.headers.get(name) != value:
            raise ValueError(f"header {name} does not name the subject's {value!r}")
    return (
        pg_text(worker),
        pg_text(stream),
        offset,
        happened,
        received,
        _optional(decky),
        _optional(service),
        _optional(event),
        inet_text(src),
        _optional(user),
        text,
        message.js_seq,
    )


def _header_number(message: Message, name: str) -> int:
    """A header holding the logical offset of the line in its worker's stream."""
    value = message.headers.get(name)
    if value is None or not value.isascii() or not value.isdigit():
        raise ValueError(f"header {name} {value!r} is not an offset")
    return int(value)


def _subject(subject: str) -> tuple[str, str, str]:
    parsed = publishing.parse_subject(subject)
    if parsed[0] != "events":
        raise ValueError(f"{subject!r} is not an events subject")
    return parsed


def plan(messages: Sequence[Message]) -> Plan:
    """Each message as an event row or a rejection (in order)."""
    events: list[EventRow] = []
    rejected: list[Rejected] = []
    for message in messages:
        try:
            events.append(event_row(message))
        except (ValueError, TypeError, OverflowError) as exc:
            rejected.append(Rejected(message, str(exc)[:300]))
    return Plan(events, rejected)


def schema_differences(found: Mapping[str, Mapping[str, str]]) -> list[str]:
    """How existing tables (``{table: {column: data_type}}``) differ from ours; ``[]``: fine.

    A table that is absent is no difference (it is created).
    """
    out = []
    for table, wanted in ((EVENTS_TABLE, EVENT_COLUMNS), (REJECTED_TABLE, REJECTED_COLUMNS)):
        have = found.get(table)
        if not have:
            continue
        for column, kind in wanted.items():
            if column not in have:
                out.append(f"{table}.{column} is missing")
            elif have[column] != kind:
                out.append(f"{table}.{column} is {have[column]}, not {kind}")
    return out
