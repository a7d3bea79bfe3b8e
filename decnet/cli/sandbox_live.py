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

import time
from collections.abc import Sequence

from decnet.cli import output
from decnet.cli.eventview import event_details, event_header, event_line
from decnet.listener import workers
from decnet.listener.workers import LogHealth
from decnet.master.health import duration
from decnet.sandbox.report import FeedEvents, HostRow, HostTable

__all__ = ["LiveLines", "event_details", "event_line", "host_table", "human_bytes"]

HOST_HEADERS = ("WORKER", "ADDRESS", "AGENT", "RELEASE", "DECKIES", "LISTENING", "LOG LAG")
FLEET_HEADERS = (*HOST_HEADERS[:-1], "LAST SEEN", "LOG LAG")
HEALTHY = ("up", "healthy")  # an AGENT cell that needs no detail after it


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
