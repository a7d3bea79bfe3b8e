"""One feed entry as one line of text: the event table of ``decnet-admin events`` and the sandbox.

Columns TIME, WORKER, DECKY, SERVICE, EVENT, SRC, DETAILS.  WORKER is the
certificate CN (``source_worker``); DECKY, SERVICE and EVENT are what the line
claims (HOSTNAME, APP-NAME, MSGID); SRC and DETAILS come from the agent's
``decnet@`` parameters.  Pure: tested without a reactor.

Event text comes from attackers, and the feed holds whatever a (possibly
compromised) worker sent, so every value goes through the one escaping
function of the output layer (:func:`decnet.cli.output.printable`) before it
reaches a terminal: an escape sequence in a user name must never repaint the screen.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence

from decnet.cli import output
from decnet.events.query import event_params

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
DETAILS_WIDTH = 57  # the DETAILS column at most: a line fits 132 columns (the feed has it all)
SRC_WIDTH = 39  # an IPv6 address in full; anything longer is not an address
EVENT_HEADERS = ("TIME (UTC)", "WORKER", "DECKY", "SERVICE", "EVENT", "SRC", "DETAILS")
EVENT_WIDTHS = (12, 6, 10, 10, 10, 15)  # padded to this (a longer cell widens its line)
# ... and cut to this (a worker is a host name, HOSTNAME/APP-NAME/MSGID have RFC 5424 caps).
EVENT_LIMITS = (23, 63, 48, 48, 32, SRC_WIDTH)
DATED_TIME_WIDTH = 23  # YYYY-MM-DD HH:MM:SS.mmm


def _value(text: str) -> str:
    shown = output.printable(text, VALUE_WIDTH)
    if shown == "" or any(c in shown for c in ' "='):
        shown = '"' + shown.replace('"', '\\"') + '"'
    return shown


def _words(params: dict[str, str], names: Sequence[str]) -> list[str]:
    return [f"{name}={_value(params[name])}" for name in names if name in params]


def _connect(params: dict[str, str]) -> str:
    return f"src_port={_value(params.get('src_port', '?'))}"


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


def clock_time(timestamp: object, *, dated: bool = False) -> str:
    """``HH:MM:SS.mmm`` (UTC; with ``dated``, the date first) of an RFC 3339 timestamp.

    ``-`` if there is none; a timestamp that does not parse is shown escaped.
    """
    if not timestamp:
        return "-"
    text = str(timestamp)
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return output.printable(text, DATED_TIME_WIDTH if dated else 12)
    if moment.tzinfo is not None:
        moment = moment.astimezone(datetime.UTC)
    shown = moment.strftime("%Y-%m-%d %H:%M:%S." if dated else "%H:%M:%S.")
    return shown + f"{moment.microsecond // 1000:03d}"


def _widths(dated: bool) -> tuple[int, ...]:
    return (DATED_TIME_WIDTH, *EVENT_WIDTHS[1:]) if dated else EVENT_WIDTHS


def _row(cells: Sequence[object], dated: bool) -> str:
    widths = _widths(dated)
    padded = [
        output.printable(str(c), limit).ljust(w)
        for c, w, limit in zip(cells, widths, EVENT_LIMITS, strict=False)
    ]
    return "  ".join([*padded, *map(str, cells[len(widths) :])]).rstrip()


def event_header(*, dated: bool = False) -> str:
    return _row(EVENT_HEADERS, dated)


def event_line(entry: dict, *, dated: bool = False) -> str:
    """One feed entry as one line: time, source worker (the certificate), decky, service, …

    The time is when the event happened by the worker's clock (``timestamp``),
    or when the listener received it for a line without one.
    """
    worker = entry.get("source_worker") or "?"
    if not entry.get("parsed", True):
        raw = output.printable(str(entry.get("raw", "")), 80)
        when = clock_time(entry.get("received_at"), dated=dated)
        return _row((when, worker, "?", "?", "unparsed", "", raw), dated)
    return _row(
        (
            clock_time(entry.get("timestamp") or entry.get("received_at"), dated=dated),
            worker,
            entry.get("hostname") or "-",
            entry.get("app_name") or "-",
            entry.get("msgid") or "-",
            event_params(entry).get("src_ip") or "-",
            output.printable(event_details(entry), DETAILS_WIDTH),
        ),
        dated,
    )
