"""``decnet-admin check``: the fleet's health, with exit codes a script can act on.

Each host's agent (``/health`` and ``/status``: failed services), updater
(``/health``: reachable, current release) and log pipeline (the listener's
``<ingest>/workers.json``: LAST SEEN and LOG LAG) are probed at once; the
verdict rules are :mod:`decnet.master.health`.  Exit 0 when every host is
healthy, 1 when any is degraded, 2 when any is unreachable.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import attrs
from twisted.internet import defer, task

from decnet.cli import output
from decnet.cli.arguments import command, duration, json_flag, timeout_option
from decnet.cli.eventview import event_header, event_line
from decnet.cli.expiry import expiry_fields, expiry_warning
from decnet.cli.runtime import budget, run_async
from decnet.cli.sandbox_live import host_table, last_seen, log_lag
from decnet.listener.workers import LogHealth, log_health, read_state, state_path
from decnet.master import health as rules
from decnet.master.registry import Host
from decnet.sandbox import report

DEFAULT_STALE = 300.0

WAIT_INTERVAL = 1.0  # seconds between two probe rounds of check --wait

CHECK_EXAMPLES = [
    "decnet-admin check   # every enrolled host",
    "decnet-admin check web-01 db-01   # only these",
    "decnet-admin check --stale 2m --json   # flag workers silent for 2 minutes; JSON",
    "decnet-admin check || page-oncall   # exit 1: degraded, exit 2: unreachable",
    "decnet-admin update --all && decnet-admin check --wait 1m   # until the forwarders connect",
]


def stale_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stale",
        type=duration,
        default=DEFAULT_STALE,
        metavar="DURATION",
        help="flag a worker the log listener has not seen for longer than this "
        "(90s, 5m, 2h; default: 5m)",
    )
    parser.add_argument(
        "--ingest-dir",
        default=None,
        metavar="DIR",
        help="the log listener's ingest directory, where it keeps workers.json "
        "(default: <home>/ingest)",
    )


def register(sub, parents) -> None:
    p = command(
        sub,
        parents,
        "check",
        cmd_check,
        summary="probe every host's agent, updater and logs; exit 0/1/2",
        description="Probe every enrolled (not decommissioned) host, or each NAME, at once: "
        "the agent's /health and /status (a failed decoy service makes the host degraded), "
        "the updater's /health and release, and the log listener's state (LAST SEEN, LOG "
        "LAG). Records active/unreachable in the registry. Exits 0 when every host is "
        "healthy, 1 when any is degraded, 2 when any is unreachable. The --timeout is per "
        "probe round with --wait.",
        examples=CHECK_EXAMPLES,
    )
    p.add_argument("names", nargs="*", metavar="NAME", help="host names (default: every host)")
    stale_option(p)
    p.add_argument(
        "--wait",
        type=duration,
        default=0.0,
        metavar="DURATION",
        help="probe again until every host is healthy or DURATION has passed, then report "
        "(after an update, while the forwarder connects; default: report the first probe)",
    )
    json_flag(p, "one JSON list, a verdict and its problems per host")
    timeout_option(
        p,
        10.0,
        "seconds, from the command's start, by which every host must have answered "
        "(default: %(default)s)",
    )
    register_top(sub, parents)


# -- the listener's state -----------------------------------------------------------------


def ingest_dir(args: argparse.Namespace) -> Path:
    return Path(args.ingest_dir) if args.ingest_dir else args.paths.ingest_dir


def log_healths(directory: Path, names: list[str], stale: float) -> dict[str, LogHealth]:
    """Each host's log pipeline from the listener's state file (blocking; warns if unreadable)."""
    path = state_path(directory)
    try:
        doc = read_state(path)
    except (OSError, ValueError) as exc:
        output.line(f"decnet-admin: warning: cannot read {path}: {exc}", sys.stderr)
        doc = None
    now = time.time()
    return {name: log_health(doc, name, now, stale) for name in names}


# -- check --------------------------------------------------------------------------------

CHECK_HEADERS = (
    "NAME",
    "ADDRESS",
    "HEALTH",
    "RELEASE",
    "DECKIES",
    "UPDATER",
    "LAST SEEN",
    "LOG LAG",
    "DETAIL",
)
HEALTH_CELL = {rules.HEALTHY: "healthy", rules.DEGRADED: "degraded", rules.UNREACHABLE: "DOWN"}


def selected_hosts(registry, names: list[str]) -> list[Host]:
    if names:
        return [registry.get(name) for name in dict.fromkeys(names)]
    return [h for h in registry.list() if not h.decommissioned]


def updater_cell(result) -> str:
    u = result.updater
    if u is None or u.state == rules.UPDATER_NONE:
        return "-"
    if u.state == rules.UPDATER_UP:
        return f"up {u.release}"
    return "waiting" if u.state == rules.UPDATER_WAITING else "DOWN"


def check_row(result, now: float) -> tuple:
    health = "BAD REPLY" if result.bad_reply else HEALTH_CELL[result.verdict]
    detail = result.detail
    if result.updater is not None and result.updater.state == rules.UPDATER_WAITING:
        detail = rules.WAITING_TEXT if detail == "ok" else f"{detail}; {rules.WAITING_TEXT}"
    return (
        result.name,
        result.address,
        health,
        result.health.get("release") or "-",
        "-" if result.deckies is None else result.deckies,
        updater_cell(result),
        last_seen(result.logs, now),
        log_lag(result.logs),
        detail,
    )


def cmd_check(args: argparse.Namespace) -> int:
    from decnet.cli.agents import Context

    ctx = Context(args)
    hosts = selected_hosts(ctx.registry, args.names)
    if not hosts:
        if args.json:
            output.print_json([])
        else:
            output.line("No hosts enrolled yet (use `decnet-admin enroll`).")
        return 0

    async def main(reactor) -> int:
        if args.wait:
            now, results = await _wait_healthy(reactor, ctx, hosts, args)
            if not args.json:
                table = _check_table(hosts)
                for result in results:
                    table.row(check_row(result, now))
        else:
            arrived = lambda result: None  # noqa: E731
            if not args.json:
                table = _check_table(hosts)
                arrived = lambda result: table.row(check_row(result, time.time()))  # noqa: E731
            now, results = await _probe_round(reactor, ctx, hosts, args, arrived)
        return _report_check(args, hosts, results, now)

    return run_async(main)


def _check_table(hosts) -> output.StreamTable:
    widths = (max(len(h.name) for h in hosts), max(len(h.address) for h in hosts))
    return output.StreamTable(CHECK_HEADERS, (*widths, 9, 12, 7, 12, 12, 8))


async def _probe_round(reactor, ctx, hosts, args, arrived) -> tuple[float, list]:
    """One probe of every host (agent, updater, the listener's state): (when, results)."""
    from decnet.master.agent_client import Probe, check_hosts

    now = time.time()
    logs = log_healths(ingest_dir(args), [h.name for h in hosts], args.stale)
    results = await check_hosts(
        reactor,
        ctx.identity,
        ctx.registry,
        hosts,
        revocations=ctx.revocations,
        timeout=args.timeout if args.wait else budget(args.timeout),
        arrived=arrived,
        probe=Probe(logs=logs, now=now, stale=args.stale),
    )
    return now, results


async def _wait_healthy(reactor, ctx, hosts, args) -> tuple[float, list]:
    """``--wait``: probe again every :data:`WAIT_INTERVAL` until all are healthy or time is up."""
    give_up = time.monotonic() + args.wait
    while True:
        now, results = await _probe_round(reactor, ctx, hosts, args, lambda result: None)
        if rules.exit_code(r.verdict for r in results) == 0 or time.monotonic() >= give_up:
            return now, results
        await task.deferLater(reactor, WAIT_INTERVAL, lambda: None)


def _report_check(args: argparse.Namespace, hosts, results, now: float) -> int:
    by_name = {h.name: h for h in hosts}
    if args.json:
        output.print_json([{**r.as_dict(), **expiry_fields(by_name[r.name], now)} for r in results])
    else:
        output.line(summary(results))
        for host in hosts:
            warning = expiry_warning(host, now)
            if warning is not None:
                output.line(f"warning: {warning}", sys.stderr)
    return rules.exit_code(r.verdict for r in results)


def summary(results) -> str:
    counts = {v: sum(1 for r in results if r.verdict == v) for v in HEALTH_CELL}
    return (
        f"{counts[rules.HEALTHY]} healthy, {counts[rules.DEGRADED]} degraded, "
        f"{counts[rules.UNREACHABLE]} unreachable"
    )


# -- top ----------------------------------------------------------------------------------

TOP_EXAMPLES = [
    "decnet-admin top   # the host table above every new event; Ctrl-C ends it",
    "decnet-admin top --stale 1m   # flag workers whose logs were not seen for a minute",
    "decnet-admin top | tee watch.log   # not a terminal: plain lines, the table when it changes",
    'decnet-admin top --json | jq -c .   # NDJSON: {"type": "hosts"|"event", ...} per line',
]


def register_top(sub, parents) -> None:
    p = command(
        sub,
        parents,
        "top",
        cmd_top,
        summary="watch the fleet: host health above a stream of events",
        description="The sandbox's live view for the real fleet: every enrolled host's health "
        "(agent, release, deckies, LAST SEEN, LOG LAG, as `check` probes them) above every "
        "event that reaches the master's feeds, as it arrives. In a terminal the screen is "
        "redrawn; otherwise plain lines are printed. Ctrl-C ends it (exit 130).",
        examples=TOP_EXAMPLES,
        streams=True,
    )
    stale_option(p)
    p.add_argument(
        "--interval",
        type=duration,
        default=3.0,
        metavar="DURATION",
        help="how often every host is probed (default: 3s)",
    )
    json_flag(p, "NDJSON: one host table or one event per line")
    timeout_option(p, 5.0, "seconds each host gets to answer one probe (default: %(default)s)")


def cmd_top(args: argparse.Namespace) -> int:
    from decnet.cli.agents import Context
    from decnet.cli.sandbox_view import SandboxConsole
    from decnet.master.top import FleetView

    ctx = Context(args)  # the master identity and registry, checked before anything starts
    if args.json:
        show = NDJSONConsole().show
    elif sys.stdout.isatty():
        show = ScreenConsole().show
    else:
        show = SandboxConsole().show

    async def main(reactor) -> int:
        view = FleetView(
            reactor,
            show,
            identity=ctx.identity,
            registry=args.paths.registry,
            revocations=ctx.revocations,
            ingest_dir=ingest_dir(args),
            stale=args.stale,
            interval=args.interval,
            timeout=args.timeout,
        )
        reactor.addSystemEventTrigger("before", "shutdown", view.stop)
        await view.start()
        forever: defer.Deferred[int] = defer.Deferred()
        return await forever  # until Ctrl-C stops the reactor: run_async returns 130

    return run_async(main)


class NDJSONConsole:
    """``top --json``: each host table and each event as one line of ASCII JSON."""

    def show(self, event: object) -> None:
        docs: list[dict[str, object]]
        if isinstance(event, report.HostTable):
            docs = [{"type": "hosts", "hosts": [_row_doc(r) for r in event.rows]}]
        elif isinstance(event, report.FeedEvents):
            docs = [{"type": "event", "event": entry} for entry in event.entries]
        else:
            return
        for doc in docs:
            output.print_ndjson(doc)


def _row_doc(row: report.HostRow) -> dict:
    doc = attrs.asdict(row, recurse=False)
    doc["logs"] = None if row.logs is None else row.logs.as_dict()
    return doc


class ScreenConsole:
    """``top`` in a terminal: the host table on top, the newest events below, redrawn."""

    def __init__(self, stream=None, size: Callable[[], os.terminal_size] | None = None) -> None:
        self.stream = stream or sys.stdout
        self.size = size or (lambda: shutil.get_terminal_size((120, 40)))
        self.table = ""
        self.events: collections.deque[str] = collections.deque(maxlen=500)

    def show(self, event: object) -> None:
        if isinstance(event, report.HostTable):
            self.table = host_table(event.rows)
        elif isinstance(event, report.FeedEvents):
            self.events.extend(event_line(entry) for entry in event.entries)
        else:
            return
        self.draw()

    def lines(self) -> list[str]:
        cols, rows = self.size()
        top = [line[:cols] for line in self.table.split("\n") if self.table]
        room = max(0, rows - len(top) - 3)
        shown = list(self.events)[-room:] if room else []
        return [*top, "", event_header()[:cols], *(line[:cols] for line in shown)]

    def draw(self) -> None:
        try:
            output.screen(self.lines(), self.stream)
        except (OSError, ValueError):
            pass  # the terminal went away; Ctrl-C / SIGHUP ends the command
