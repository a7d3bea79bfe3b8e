"""What ``decnet-admin events`` asks and what one index row holds.  Pure.

* :func:`parse_since`, :func:`parse_time`, :func:`parse_network` turn the
  command's filter arguments into numbers (or raise :class:`FilterError`, which
  the command reports as a usage error);
* :func:`build_query` turns a :class:`Filters` into one SQL statement with
  parameters (never a value spliced into the text);
* :func:`index_row` turns one feed line into the values of one index row.

Addresses are stored as 16 bytes (IPv4 as ``::ffff:a.b.c.d``), so that a CIDR is
one range of a B-tree (``src BETWEEN lo AND hi``) for both families.  Times are
integers, microseconds since the epoch (UTC).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
import socket

import attrs

from decnet import config
from decnet.errors import FilterError

MICROS = 1_000_000
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(?:[0-9]{1,9}[smhdw])+")
_DURATION_PART = re.compile(r"([0-9]+)([smhdw])")
# A date alone, or a date and a time: what an operator types, and RFC 3339.
_DATE_ONLY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
# The parameters of an event in a feed entry: the SD-ELEMENT the agent writes.
EVENT_SD_PREFIX = config.EVENT_SD_ID.split("@")[0] + "@"


def parse_duration(text: str) -> int:
    """``90s``, ``15m``, ``1h30m``, ``2d``, ``1w`` as microseconds."""
    if not _DURATION.fullmatch(text):
        raise FilterError(
            f"{text!r} is not a duration: use a number and a unit, s m h d w (e.g. 15m, 1h30m, 2d)"
        )
    seconds = sum(int(n) * _UNITS[u] for n, u in _DURATION_PART.findall(text))
    return seconds * MICROS


def parse_time(text: str) -> int:
    """An absolute time (RFC 3339, or ``YYYY-MM-DD[ HH:MM[:SS]]``; no zone means UTC) as µs."""
    value = text.strip()
    if _DATE_ONLY.fullmatch(value):
        value += "T00:00:00"
    try:
        moment = datetime.datetime.fromisoformat(value.replace("z", "Z"))
    except ValueError:
        raise FilterError(
            f"{text!r} is not a time: use RFC 3339 (2026-05-01T12:00:00Z) or "
            "YYYY-MM-DD [HH:MM[:SS]] (UTC)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return micros_of(moment)


def micros_of(moment: datetime.datetime) -> int:
    """Microseconds since the epoch of an aware datetime (exact, no float)."""
    delta = moment - datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
    return (delta.days * 86400 + delta.seconds) * MICROS + delta.microseconds


def parse_since(text: str, now_us: int) -> int:
    """``--since``: a duration before ``now_us``, or an absolute time."""
    if _DURATION.fullmatch(text):
        return now_us - parse_duration(text)
    try:
        return parse_time(text)
    except FilterError:
        raise FilterError(
            f"{text!r} is neither a duration (15m, 1h30m, 2d: s m h d w) nor a time "
            "(2026-05-01T12:00:00Z, or YYYY-MM-DD [HH:MM[:SS]] in UTC)"
        ) from None


V4_MAPPED = b"\0" * 10 + b"\xff\xff"


def ip_key(text: object) -> bytes | None:
    """The 16-byte sort key of an address (IPv4 mapped into IPv6); ``None`` if not one.

    ``inet_pton`` is strict (dotted quads only for IPv4; no zone index), and C.
    """
    if not isinstance(text, str) or len(text) > 45:
        return None
    try:
        return V4_MAPPED + socket.inet_pton(socket.AF_INET, text)
    except OSError:
        pass
    try:
        return socket.inet_pton(socket.AF_INET6, text)
    except OSError:
        return None


def parse_network(text: str) -> tuple[bytes, bytes]:
    """``--src-ip``: one address or a CIDR, as the inclusive range of keys it covers."""
    try:
        network = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise FilterError(
            f"{text!r} is not an IP address or a CIDR (e.g. 203.0.113.9, 203.0.113.0/24, "
            "2001:db8::/32)"
        ) from None
    lo, hi = ip_key(str(network.network_address)), ip_key(str(network.broadcast_address))
    if lo is None or hi is None:
        raise AssertionError("an ipaddress network always has keys")
    return lo, hi


@attrs.frozen
class Filters:
    """Every filter of ``decnet-admin events``; ``None`` (or empty) means "any"."""

    workers: tuple[str, ...] = ()
    decky: str | None = None
    service: str | None = None
    event: str | None = None
    src: tuple[bytes, bytes] | None = None
    user: str | None = None
    since: int | None = None
    until: int | None = None
    grep: str | None = None


# Filter field → the column it compares with equality.
_EQUAL = (("decky", "decky"), ("service", "service"), ("event", "event"), ("user", '"user"'))


def network_text(lo: bytes, hi: bytes) -> str:
    """The CIDR of a :func:`parse_network` range (IPv4 when it lies in the mapped block)."""
    span = (int.from_bytes(lo, "big") ^ int.from_bytes(hi, "big")).bit_length()
    prefix = 128 - span
    if lo[:12] == V4_MAPPED and prefix >= 96:
        return f"{socket.inet_ntop(socket.AF_INET, lo[12:])}/{prefix - 96}"
    return f"{socket.inet_ntop(socket.AF_INET6, lo)}/{prefix}"


@attrs.frozen
class Dialect:
    """How one store spells the same filters: the SQLite index or the PostgreSQL sink's table.

    ``src_range``: addresses as 16-byte keys compared by range (SQLite), or
    ``inet`` compared with ``<<=`` (PostgreSQL, see :func:`network_text`).
    """

    table: str
    mark: str
    grep: str
    src_range: bool
    alias: str = ""  # (PostgreSQL names every subquery)


SQLITE = Dialect(table="events", mark="?", grep="instr(entry, {}) > 0", src_range=True)
POSTGRES = Dialect(
    table="decnet_events",
    mark="%s",
    grep="strpos(entry, {}) > 0",
    src_range=False,
    alias=" AS latest",
)


def _src_terms(src: tuple[bytes, bytes], dialect: Dialect) -> tuple[str, list[object]]:
    lo, hi = src
    m = dialect.mark
    if not dialect.src_range:
        return f"src_ip <<= {m}::inet", [network_text(lo, hi)]
    if lo == hi:
        return f"src = {m}", [lo]
    return f"src BETWEEN {m} AND {m}", [lo, hi]


def where(filters: Filters, dialect: Dialect = SQLITE) -> tuple[list[str], list[object]]:
    """The WHERE terms (joined by AND) and their parameters."""
    m = dialect.mark
    terms: list[str] = []
    params: list[object] = []
    if filters.workers:
        terms.append("worker IN (" + ",".join([m] * len(filters.workers)) + ")")
        params += filters.workers
    for field, column in _EQUAL:
        value = getattr(filters, field)
        if value is not None:
            terms.append(f"{column} = {m}")
            params.append(value)
    if filters.src is not None:
        term, values = _src_terms(filters.src, dialect)
        terms.append(term)
        params += values
    if filters.since is not None:
        terms.append(f"time >= {m}")
        params.append(filters.since)
    if filters.until is not None:
        terms.append(f"time < {m}")
        params.append(filters.until)
    if filters.grep is not None:
        terms.append(dialect.grep.format(m))
        params.append(filters.grep)
    return terms, params


def build_query(
    filters: Filters,
    *,
    limit: int,
    after_id: int | None = None,
    dialect: Dialect = SQLITE,
) -> tuple[str, list[object]]:
    """``SELECT id, entry`` of the matching rows, oldest first.

    Without ``after_id``: the ``limit`` latest by event time (0: all), found
    newest first through the index (so a search stops after ``limit`` rows) and
    returned oldest first.  With it (``--follow``): rows indexed after row
    ``after_id``, in the order they were indexed, at most ``limit``.
    """
    terms, params = where(filters, dialect)
    m = dialect.mark
    if after_id is not None:
        terms.insert(0, f"id > {m}")
        params.insert(0, after_id)
    matching = f"FROM {dialect.table}" + (" WHERE " + " AND ".join(terms) if terms else "")
    cap = ""
    if limit > 0:
        cap = f" LIMIT {m}"
        params.append(limit)
    if after_id is not None:
        return "SELECT id, entry " + matching + " ORDER BY id" + cap, params
    if not cap:
        return "SELECT id, entry " + matching + " ORDER BY time, id", params
    latest = "SELECT id, entry, time " + matching + " ORDER BY time DESC, id DESC" + cap
    # (Only constant text and placeholders are joined here: every value is a parameter.)
    return (
        "SELECT id, entry FROM (" + latest + ")" + dialect.alias + " ORDER BY time, id",  # noqa: S608
        params,
    )


def event_params(entry: dict) -> dict[str, str]:
    """The ``decnet@…`` parameters of a feed entry (first value of each name)."""
    params: dict[str, str] = {}
    elements = entry.get("structured_data")
    if not isinstance(elements, list):
        return params
    for element in elements:
        if not isinstance(element, dict) or not str(element.get("id", "")).startswith(
            EVENT_SD_PREFIX
        ):
            continue
        pairs = element.get("params")
        for pair in pairs if isinstance(pairs, list) else ():
            if isinstance(pair, list) and len(pair) == 2:
                params.setdefault(str(pair[0]), str(pair[1]))
    return params


def time_of(text: object) -> int | None:
    """Microseconds of an RFC 3339 timestamp; ``None`` if it is not one."""
    if not isinstance(text, str) or len(text) > 40:
        return None
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None
    return micros_of(moment)


IndexRow = tuple[int, int, int, str | None, str | None, str | None, bytes | None, str | None]


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def index_row(entry: dict) -> IndexRow:
    """``(mirror_offset, time, received, decky, service, event, src, user)`` of an entry.

    ``time`` is when the event happened by the worker's clock (``timestamp``),
    or when the listener received it if the line has none; ``received`` is the
    listener's clock always.  Decky, service and event are the RFC 5424
    HOSTNAME, APP-NAME and MSGID the agent writes; ``src_ip`` and ``user``
    come from its ``decnet@`` parameters.
    """
    offset = entry.get("mirror_offset")
    received = time_of(entry.get("received_at"))
    if not isinstance(offset, int) or received is None:
        raise ValueError("not a feed entry (no mirror_offset or received_at)")
    happened = time_of(entry.get("timestamp"))
    params = event_params(entry)
    return (
        offset,
        received if happened is None else happened,
        received,
        _text(entry.get("hostname")),
        _text(entry.get("app_name")),
        _text(entry.get("msgid")),
        ip_key(params.get("src_ip")),
        params.get("user"),
    )


def parse_entry(line: bytes | str) -> dict:
    """One feed line as its JSON object (``ValueError`` if it is not one)."""
    doc = json.loads(line)
    if not isinstance(doc, dict):
        raise ValueError("a feed line is a JSON object")
    return doc
