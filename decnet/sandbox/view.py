"""What ``sandbox up`` prints: the host table and one line per event (pure).

Everything here turns data into text and is tested without a reactor.  The
output is plain lines, no cursor movement or colours, so that it reads the same
in a terminal, a terminal recorder and a CI log.

Event text comes from attackers, and agent replies from workers that may be
compromised.  The decoys already escape what they log (``docs/Deckies.md``), but
the feed could hold anything a worker sent, so every value goes through the one
escaping function of the output layer (:mod:`decnet.cli.output`) before it
reaches a terminal: an escape sequence in a user name must never repaint the screen.
"""

from __future__ import annotations

import datetime

import attrs

from decnet.cli import output

# Which parameters make an event interesting, per event type (MSGID).
INTERESTING: dict[str, tuple[str, ...]] = {
    "login": ("method", "mechanism", "user", "password", "key_type", "key_fp", "authzid"),
    "command": ("command", "args"),
    "request": ("method", "path", "user_agent"),
    "kex": ("client_version", "hassh"),
    "data": ("size", "data"),
    "disconnect": ("reason", "duration", "bytes_in"),
}
VALUE_WIDTH = 40  # one value (a password, a path) at most
DETAILS_WIDTH = 62  # the DETAILS column at most: a line fits 120 columns (the feed has it all)
EVENT_HEADERS = ("TIME (UTC)", "WORKER", "DECKY", "SERVICE", "EVENT", "DETAILS")
EVENT_WIDTHS = (12, 6, 10, 10, 10)
HOST_HEADERS = ("WORKER", "ADDRESS", "AGENT", "RELEASE", "DECKIES", "LISTENING", "LOG LAG")


def _value(text: str) -> str:
    shown = output.printable(text, VALUE_WIDTH)
    if shown == "" or any(c in shown for c in ' "='):
        shown = '"' + shown.replace('"', '\\"') + '"'
    return shown


def event_params(entry: dict) -> dict[str, str]:
    """The ``decnet@…`` parameters of a feed entry (first value of each name)."""
    params: dict[str, str] = {}
    for element in entry.get("structured_data") or ():
        if not str(element.get("id", "")).startswith("decnet@"):
            continue
        for pair in element.get("params") or ():
            if len(pair) == 2:
                params.setdefault(str(pair[0]), str(pair[1]))
    return params


def event_details(entry: dict) -> str:
    kind = entry.get("msgid") or "-"
    params = event_params(entry)
    if kind == "connect":
        return f"from {params.get('src_ip', '?')}:{params.get('src_port', '?')}"
    if kind not in INTERESTING:  # an event type this view does not know: show everything
        skip = {"session", "src_ip", "src_port", "dst_ip", "dst_port"}
        return " ".join(f"{k}={_value(v)}" for k, v in params.items() if k not in skip)
    names = INTERESTING[kind]
    prefix = ""
    if kind == "login":  # "form: user=admin password=admin -> refused"
        how = params.get("method") or params.get("mechanism")
        prefix = f"{output.printable(how, VALUE_WIDTH)}: " if how else ""
        names = tuple(n for n in names if n not in ("method", "mechanism"))
    words = [f"{name}={_value(params[name])}" for name in names if name in params]
    if kind == "login" and params.get("result"):
        words.append(f"-> {output.printable(params['result'], VALUE_WIDTH)}")
    return prefix + " ".join(words)


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


def _row(cells) -> str:
    padded = [
        output.printable(str(c), w).ljust(w) for c, w in zip(cells, EVENT_WIDTHS, strict=False)
    ]
    return "  ".join([*padded, *cells[len(EVENT_WIDTHS) :]]).rstrip()


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


def sort_key(entry: dict) -> tuple:
    return (entry.get("timestamp") or entry.get("received_at") or "", entry.get("mirror_offset", 0))


# -- hosts ---------------------------------------------------------------------


@attrs.frozen
class HostRow:
    """What the live view knows about one worker."""

    worker: str
    address: str
    agent: str  # "up", "DOWN", "decommissioned", "starting"
    release: str | None = None
    deckies: int | None = None
    services: int | None = None
    listening: int | None = None
    lag: int | None = None  # bytes of the decoy log not yet in the master's mirror
    detail: str = ""

    def key(self) -> tuple:
        """What counts as a change worth reprinting the table for (not the lag)."""
        return (self.agent, self.release, self.deckies, self.services, self.listening)


def human_bytes(count: int | None) -> str:
    if count is None:
        return "-"
    size = float(count)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024 or unit == "MiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def host_table(rows: list[HostRow]) -> str:
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


def log_lag(local_size: int | None, mirror_size: int | None) -> int:
    """Bytes of the worker's decoy log the master does not have yet.

    The mirror is the worker's file byte for byte (``docs/Logging.md``); the
    sandbox never rotates the decoy log, so the difference of the sizes is the lag.
    """
    return max(0, (local_size or 0) - (mirror_size or 0))


def row_from_status(
    worker: str,
    address: str,
    health: dict | None,
    status: dict | None,
    lag: int | None,
    problem: str | None = None,
) -> HostRow:
    if health is None or health.get("status") != "ok":
        detail = problem or (f"status {health.get('status')!r}" if health else "no answer")
        return HostRow(worker, address, "DOWN", lag=lag, detail=detail)
    summary = (status or {}).get("summary") or {}
    return HostRow(
        worker,
        address,
        "up",
        release=health.get("release"),
        deckies=summary.get("deckies"),
        services=summary.get("services"),
        listening=summary.get("listening"),
        lag=lag,
    )


# -- the start-up summary ----------------------------------------------------------


def deploy_summary(worker: str, spec: dict, result: dict) -> list[str]:
    """Lines describing what a deploy started on ``worker``: decky, address, services."""
    lines = []
    for i, decky in enumerate(spec["deckies"]):
        services = []
        for s in decky["services"]:
            name = s.get("name", s["type"])
            state = result.get("deckies", {}).get(decky["name"], {}).get(name, {}).get("state")
            mark = "" if state == "listening" else f" ({output.printable(str(state or '?'), 40)})"
            services.append(f"{name}:{s['port']}{mark}")
        head = worker if i == 0 else ""
        lines.append(
            f"  {head:<4}{decky['name']:<10} {decky['services'][0]['bind']:<13} "
            + " ".join(services)
        )
    return lines


def elapsed(seconds: float) -> str:
    return f"{seconds:.1f}s"
