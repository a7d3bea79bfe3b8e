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

from collections.abc import Sequence

from decnet.cli import output
from decnet.cli.eventview import event_details, event_header, event_line
from decnet.sandbox.report import FeedEvents, HostRow, HostTable

__all__ = ["LiveLines", "event_details", "event_line", "host_table", "human_bytes"]

HOST_HEADERS = ("WORKER", "ADDRESS", "AGENT", "RELEASE", "DECKIES", "LISTENING", "LOG LAG")


def human_bytes(count: int | None) -> str:
    if count is None:
        return "-"
    size = float(count)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024 or unit == "MiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def host_table(rows: Sequence[HostRow]) -> str:
    """The workers' table: agent health, release, deckies, listening services, log lag."""
    cells = []
    for r in rows:
        listening = "-" if r.listening is None else f"{r.listening}/{r.services}"
        agent = r.agent + (f" ({r.detail})" if r.detail and r.agent != "up" else "")
        cells.append(
            (
                r.worker,
                r.address,
                output.printable(agent, 60),
                r.release or "-",
                "-" if r.deckies is None else r.deckies,
                listening,
                human_bytes(r.lag),
            )
        )
    return output.table(HOST_HEADERS, cells)


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
