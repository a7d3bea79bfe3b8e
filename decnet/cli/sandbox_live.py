"""What the live view of ``sandbox up`` prints: the host table and one line per event (pure).

Everything here turns the sandbox's data (:mod:`decnet.sandbox.report`, feed
entries) into text and is tested without a reactor.  The output is plain lines,
no cursor movement or colours, so that it reads the same in a terminal, a
terminal recorder and a CI log.

Event text comes from attackers, and agent replies from workers that may be
compromised.  The decoys already escape what they log (``docs/Deckies.md``), but
the feed could hold anything a worker sent, so every value goes through the one
escaping function of the output layer (:mod:`decnet.cli.output`) before it
reaches a terminal: an escape sequence in a user name must never repaint the screen.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Sequence

from decnet.cli import output
from decnet.listener import workers
from decnet.listener.workers import LogHealth
from decnet.master.health import duration
from decnet.sandbox.feeds import event_params
from decnet.sandbox.report import FeedEvents, HostRow, HostTable

# Which parameters make an event interesting, per event type (MSGID).
INTERESTING: dict[str, tuple[str, ...]] = {
    "login": ("method", "mechanism", "user", "password", "key_type", "key_fp", "authzid"),
    "command": ("command", "args"),
    "request": ("method", "path", "user_agent"),
    "kex": ("client_version", "hassh"),
    "data": ("size", "data"),
    "disconnect": ("reason", "duration", "bytes_in"),
}
# What every event carries and an unknown event type's details leave out.
CONNECTION = frozenset({"session", "src_ip", "src_port", "dst_ip", "dst_port"})
VALUE_WIDTH = 40  # one value (a password, a path) at most
DETAILS_WIDTH = 62  # the DETAILS column at most: a line fits 120 columns (the feed has it all)
EVENT_HEADERS = ("TIME (UTC)", "WORKER", "DECKY", "SERVICE", "EVENT", "DETAILS")
EVENT_WIDTHS = (12, 6, 10, 10, 10)
HOST_HEADERS = ("WORKER", "ADDRESS", "AGENT", "RELEASE", "DECKIES", "LISTENING", "LOG LAG")
FLEET_HEADERS = (*HOST_HEADERS[:-1], "LAST SEEN", "LOG LAG")
HEALTHY = ("up", "healthy")  # an AGENT cell that needs no detail after it


def _value(text: str) -> str:
    shown = output.printable(text, VALUE_WIDTH)
    if shown == "" or any(c in shown for c in ' "='):
        shown = '"' + shown.replace('"', '\\"') + '"'
    return shown


def _words(params: dict[str, str], names: Sequence[str]) -> list[str]:
    return [f"{name}={_value(params[name])}" for name in names if name in params]


def _connect(params: dict[str, str]) -> str:
    return f"from {params.get('src_ip', '?')}:{params.get('src_port', '?')}"


def _login(params: dict[str, str]) -> str:
    """``form: user=admin password=admin -> refused``"""
    how = params.get("method") or params.get("mechanism")
    prefix = f"{output.printable(how, VALUE_WIDTH)}: " if how else ""
    names = [n for n in INTERESTING["login"] if n not in ("method", "mechanism")]
    words = _words(params, names)
    if params.get("result"):
        words.append(f"-> {output.printable(params['result'], VALUE_WIDTH)}")
    return prefix + " ".join(words)


def _unknown(params: dict[str, str]) -> str:
    """An event type this view does not know: show everything but the connection."""
    return " ".join(f"{k}={_value(v)}" for k, v in params.items() if k not in CONNECTION)


DETAILS: dict[str, Callable[[dict[str, str]], str]] = {"connect": _connect, "login": _login}


def event_details(entry: dict) -> str:
    """The interesting parameters of one event, as ``name=value`` words."""
    kind = entry.get("msgid") or "-"
    params = event_params(entry)
    if kind in DETAILS:
        return DETAILS[kind](params)
    if kind in INTERESTING:
        return " ".join(_words(params, INTERESTING[kind]))
    return _unknown(params)


def clock_time(timestamp: str | None) -> str:
    """``HH:MM:SS.mmm`` (UTC) of an RFC 3339 timestamp; ``-`` if it is not one."""
    if not timestamp:
        return "-"
    try:
        moment = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return output.printable(timestamp, 12)
    moment = moment.astimezone(datetime.UTC)
    return moment.strftime("%H:%M:%S.") + f"{moment.microsecond // 1000:03d}"


def _row(cells: Sequence[object]) -> str:
    padded = [
        output.printable(str(c), w).ljust(w) for c, w in zip(cells, EVENT_WIDTHS, strict=False)
    ]
    return "  ".join([*padded, *map(str, cells[len(EVENT_WIDTHS) :])]).rstrip()


def event_header() -> str:
    return _row(EVENT_HEADERS)


def event_line(entry: dict) -> str:
    """One feed entry as one line: time, source worker (the certificate), decky, service, …"""
    worker = entry.get("source_worker") or "?"
    if not entry.get("parsed", True):
        raw = output.printable(str(entry.get("raw", "")), 80)
        return _row((clock_time(entry.get("received_at")), worker, "?", "?", "unparsed", raw))
    return _row(
        (
            clock_time(entry.get("timestamp") or entry.get("received_at")),
            worker,
            entry.get("hostname") or "-",
            entry.get("app_name") or "-",
            entry.get("msgid") or "-",
            output.printable(event_details(entry), DETAILS_WIDTH),
        )
    )


def human_bytes(count: int | None) -> str:
    if count is None:
        return "-"
    size = float(count)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024 or unit == "MiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def last_seen(logs: LogHealth | None, now: float) -> str:
    """The LAST SEEN cell: ``now``, ``42s ago``, ``never``; ``STALE`` when flagged."""
    if logs is None or logs.state == workers.NO_STATE:
        return "-"
    if logs.state == workers.CONNECTED:
        text = "now"
    elif logs.last_seen is None:
        text = "never"
    else:
        text = f"{duration(now - logs.last_seen)} ago"
    return f"{text} STALE" if logs.stale else text


def log_lag(logs: LogHealth | None) -> str:
    """The LOG LAG cell: bytes, ``unknown`` (plain mode, no STATUS yet), ``-`` (no state)."""
    if logs is None or logs.state == workers.NO_STATE:
        return "-"
    return "unknown" if logs.lag is None else human_bytes(logs.lag)


def host_table(rows: Sequence[HostRow], now: float | None = None) -> str:
    """The workers' table: agent health, release, deckies, listening services, log lag.

    Rows that carry the listener's view (``top``) add LAST SEEN, and their LOG
    LAG is the listener's (``now``: the time LAST SEEN is counted to).
    """
    fleet = any(r.logs is not None for r in rows)
    moment = time.time() if now is None else now
    cells = []
    for r in rows:
        listening = "-" if r.listening is None else f"{r.listening}/{r.services}"
        agent = r.agent + (f" ({r.detail})" if r.detail and r.agent not in HEALTHY else "")
        cells.append(
            (
                r.worker,
                r.address,
                output.printable(agent, 120 if fleet else 60),
                r.release or "-",
                "-" if r.deckies is None else r.deckies,
                listening,
                *((last_seen(r.logs, moment), log_lag(r.logs)) if fleet else ()),
                *(() if fleet else (human_bytes(r.lag),)),
            )
        )
    return output.table(FLEET_HEADERS if fleet else HOST_HEADERS, cells)


class LiveLines:
    """The live view's two kinds of output; the event header follows every table once."""

    def __init__(self) -> None:
        self.header_shown = False

    def table(self, event: HostTable) -> list[str]:
        self.header_shown = False
        return ["", host_table(event.rows), ""]

    def events(self, event: FeedEvents) -> list[str]:
        lines = [] if self.header_shown else [event_header()]
        self.header_shown = True
        return lines + [event_line(entry) for entry in event.entries]
