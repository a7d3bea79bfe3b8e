"""``decnet-admin events``: search and follow every worker's events through the event index.

The index (``<ingest>/events.sqlite``, :mod:`decnet.events.index`) is kept by
the listener's feed process; this command only reads it (never the feed
files).  Filters are parsed by :mod:`decnet.events.query` (pure); a filter that
does not parse is a usage error (exit 2).  Rows are printed as the event table
(:mod:`decnet.cli.eventview`, shared with the sandbox) or, with ``--json``, as
NDJSON: each feed entry unchanged (as ASCII-only JSON: nothing a worker sent
can reach the terminal unescaped either way).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING

from twisted.internet import task

from decnet.cli import eventview, output
from decnet.cli.arguments import command, flag, json_flag
from decnet.cli.runtime import require_home, run_async
from decnet.errors import EventIndexError, FilterError
from decnet.events import query
from decnet.events.index import EventIndex, index_path
from decnet.interfaces import IDecnetReactor
from decnet.threads import run_in_pool

if TYPE_CHECKING:
    from decnet.sink.store import PgEvents

    EventStore = EventIndex | PgEvents

USAGE_ERROR = 2
DEFAULT_LIMIT = 100  # rows of a search without --limit
FOLLOW_BACKLOG = 10  # rows shown before following, without --limit (as tail -f)
FOLLOW_INTERVAL = 0.05  # seconds between two looks at the index while following
FOLLOW_BATCH = 1000  # rows read per look

EXAMPLES = [
    "# every login attempt from 203.0.113.0/24 in the last hour, on any worker:",
    "decnet-admin events --event login --src-ip 203.0.113.0/24 --since 1h",
    "# the last 20 events of two workers:",
    "decnet-admin events --worker w1 --worker w2 --limit 20",
    "# what one attacker did on the ssh decoys since a date (UTC), as NDJSON:",
    "decnet-admin events --src-ip 2001:db8::7 --service ssh --since 2026-05-01 --json",
    "# watch every new event as it arrives (Ctrl-C stops):",
    "decnet-admin events --follow",
    "# every user name tried in the last day, through jq:",
    "decnet-admin events --event login --since 1d --limit 0 --json \\",
    "  | jq -r '.structured_data[].params[] | select(.[0] == \"user\") | .[1]'",
    "# the same filters on the PostgreSQL store of twistd decnet-sink (at scale):",
    "decnet-admin events --postgres 'host=db.example dbname=decnet user=soc' --since 1h",
]


def _limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a row count (0 or more; 0: no limit)")
    return value


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = command(
        sub,
        parents,
        "events",
        cmd_events,
        summary="search and follow the events of every worker",
        description="Search the events every worker sent (the listener's event index, "
        "<ingest>/events.sqlite) with filters, newest last, or follow new ones as they "
        "arrive. Filters combine with AND; --worker may be repeated (any of them). DURATION "
        "is a number and a unit (s m h d w), e.g. 90s, 15m, 1h30m, 2d; TIME is RFC 3339 "
        "(2026-05-01T12:00:00Z) or YYYY-MM-DD [HH:MM[:SS]] in UTC. Times are the events' own "
        "(the worker's clock). See docs/Events.md.",
        examples=EXAMPLES,
        needs_home=False,  # with --ingest only the index is read (checked in cmd_events)
        streams=True,
    )
    p.add_argument(
        "--ingest",
        type=Path,
        default=None,
        metavar="DIR",
        help="the listener's ingest directory (default: <home>/ingest, as the listener's "
        "--ingest-dir)",
    )
    p.add_argument(
        "--postgres",
        metavar="DSN",
        default=None,
        help="query the PostgreSQL store that twistd decnet-sink fills instead of the index "
        "(a libpq DSN or postgresql:// URL; keep a password in ~/.pgpass)",
    )
    p.add_argument("--worker", action="append", default=[], metavar="W", help="source worker")
    p.add_argument("--decky", metavar="D", help="decky (the line's HOSTNAME)")
    p.add_argument("--service", metavar="S", help="service (APP-NAME), e.g. ssh, http")
    p.add_argument("--event", metavar="E", help="event type (MSGID), e.g. login, connect")
    p.add_argument("--src-ip", metavar="IP|CIDR", help="attacker address or network (v4 or v6)")
    p.add_argument("--user", metavar="U", help="user name the attacker gave")
    p.add_argument("--since", metavar="DURATION|TIME", help="events at or after (e.g. 1h)")
    p.add_argument("--until", metavar="TIME", help="events before this time")
    p.add_argument("--grep", metavar="TEXT", help="entries whose JSON contains TEXT (exact case)")
    p.add_argument(
        "--limit",
        type=_limit,
        default=None,
        metavar="N",
        help=f"the N latest matches (default {DEFAULT_LIMIT}; with --follow "
        f"{FOLLOW_BACKLOG} before following; 0: all)",
    )
    flag(p, "--follow", "then print new matching events as they arrive, from every worker")
    json_flag(p, "NDJSON: one feed entry per line, unchanged")


def filters_of(args: argparse.Namespace, now_us: int) -> query.Filters:
    """The command's filters (``FilterError`` for one that does not parse)."""
    return query.Filters(
        workers=tuple(args.worker),
        decky=args.decky,
        service=args.service,
        event=args.event,
        src=None if args.src_ip is None else query.parse_network(args.src_ip),
        user=args.user,
        since=None if args.since is None else query.parse_since(args.since, now_us),
        until=None if args.until is None else query.parse_time(args.until),
        grep=args.grep,
    )


def ascii_json(line: str) -> str:
    """A feed line as ASCII-only JSON: the same entry, nothing unescaped for a terminal.

    Feed lines are written with ``ensure_ascii=False``; one that is ASCII already
    (the common case) is printed byte for byte.  DEL is ASCII that JSON does not
    escape: it becomes ``\\u007f`` (it can only occur inside a string).
    """
    if not line.isascii():
        line = json.dumps(json.loads(line), ensure_ascii=True, separators=(",", ":"))
    return line.replace("\x7f", "\\u007f")


class Printer:
    """Writes rows as the event table or NDJSON, whole lines, flushed per batch."""

    def __init__(self, as_json: bool, stream: IO[str] | None = None):
        self.as_json = as_json
        self.stream = stream or sys.stdout
        self.header_shown = as_json

    def rows(self, rows: list[tuple[int, str]]) -> None:
        if self.as_json and self.stream is sys.stdout:
            output.print_json_lines([ascii_json(line) for _id, line in rows])
            return
        out: list[str] = []
        if not self.header_shown:
            out.append(output.printable(eventview.event_header(dated=True)))
            self.header_shown = True
        for _id, line in rows:
            out.append(ascii_json(line) if self.as_json else self._table_line(line))
        if out:
            self.stream.write("\n".join(out) + "\n")
            self.stream.flush()

    @staticmethod
    def _table_line(line: str) -> str:
        try:
            entry = query.parse_entry(line)
        except ValueError:
            entry = {"parsed": False, "raw": line}
        return output.printable(eventview.event_line(entry, dated=True))


def _usage_error(message: str, as_json: bool) -> int:
    if as_json:
        output.json_error([message], usage=True)
        output.print_json({"problems": [message]})
    else:
        output.line(f"decnet-admin events: error: {message}", sys.stderr)
        output.line("(decnet-admin events --help shows the forms every filter takes)", sys.stderr)
    return USAGE_ERROR


def open_store(args: argparse.Namespace) -> EventStore:
    """The SQLite index (default) or the sink's PostgreSQL store (``--postgres``)."""
    if args.postgres is not None:
        from decnet.sink.store import PgEvents

        return PgEvents(args.postgres)
    if args.ingest is None:
        require_home(args.paths)
    ingest = args.ingest if args.ingest is not None else args.paths.ingest_dir
    return EventIndex(index_path(ingest), readonly=True)


def cmd_events(args: argparse.Namespace) -> int:
    if args.postgres is not None and args.ingest is not None:
        return _usage_error(
            "--postgres and --ingest name two different stores: give one", args.json
        )
    try:
        filters = filters_of(args, time.time_ns() // 1000)
    except FilterError as exc:
        return _usage_error(str(exc), args.json)
    printer = Printer(args.json)
    index = open_store(args)  # EventIndexError: reported by main
    try:
        if args.follow:
            backlog = FOLLOW_BACKLOG if args.limit is None else args.limit
            return run_async(lambda reactor: follow(reactor, index, filters, backlog, printer))
        limit = DEFAULT_LIMIT if args.limit is None else args.limit
        for batch in index.batches(filters, limit):
            printer.rows(batch)
        if not printer.header_shown:
            printer.rows([])  # the header of an empty table
        return 0
    finally:
        index.close()


async def follow(
    reactor: IDecnetReactor,
    index: EventStore,
    filters: query.Filters,
    backlog: int,
    printer: Printer,
) -> int:
    """Print the ``backlog`` latest matches, then every new match, until interrupted."""
    rows, after = await run_in_pool(reactor, index.snapshot, filters, backlog)
    printer.rows(rows)
    while True:
        rows = await run_in_pool(reactor, index.follow, filters, after, FOLLOW_BATCH)
        if rows:
            printer.rows(rows)
            after = rows[-1][0]
        if len(rows) < FOLLOW_BATCH:
            if index.replaced():
                raise EventIndexError(
                    f"{index.path} was deleted or rebuilt while following: run the command again"
                )
            await task.deferLater(reactor, FOLLOW_INTERVAL, lambda: None)
