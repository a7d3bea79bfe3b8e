"""``decnet-admin check``: the fleet's health, with exit codes a script can act on.

Each host's agent (``/health`` and ``/status``: failed services), updater
(``/health``: reachable, current release) and log pipeline (the listener's
``<ingest>/workers.json``: LAST SEEN and LOG LAG) are probed at once; the
verdict rules are :mod:`decnet.master.health`.  Exit 0 when every host is
healthy, 1 when any is degraded, 2 when any is unreachable.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from decnet.cli import output
from decnet.cli.arguments import command, duration, json_flag, timeout_option
from decnet.cli.runtime import budget, run_async
from decnet.cli.sandbox_live import human_bytes
from decnet.listener import workers
from decnet.listener.workers import LogHealth, log_health, read_state, state_path
from decnet.master import health as rules
from decnet.master.registry import Host

DEFAULT_STALE = 300.0

CHECK_EPILOG = """\
examples:
  decnet-admin check                      every enrolled host
  decnet-admin check web-01 db-01         only these
  decnet-admin check --stale 2m --json    flag workers silent for 2 minutes; JSON
  decnet-admin check || page-oncall       exit 1: degraded, exit 2: unreachable
"""


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
        "healthy, 1 when any is degraded, 2 when any is unreachable.",
        epilog=CHECK_EPILOG,
    )
    p.add_argument("names", nargs="*", metavar="NAME", help="host names (default: every host)")
    stale_option(p)
    json_flag(p, "one JSON list, a verdict and its problems per host")
    timeout_option(
        p,
        10.0,
        "seconds, from the command's start, by which every host must have answered "
        "(default: %(default)s)",
    )


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


def last_seen(logs: LogHealth | None, now: float) -> str:
    """The LAST SEEN cell: ``now``, ``42s ago``, ``never``; ``STALE`` when flagged."""
    if logs is None or logs.state == workers.NO_STATE:
        return "-"
    if logs.state == workers.CONNECTED:
        text = "now"
    elif logs.last_seen is None:
        text = "never"
    else:
        text = f"{rules.duration(now - logs.last_seen)} ago"
    return f"{text} STALE" if logs.stale else text


def log_lag(logs: LogHealth | None) -> str:
    """The LOG LAG cell: bytes, ``unknown`` (plain mode, no STATUS yet), ``-`` (no state)."""
    if logs is None or logs.state == workers.NO_STATE:
        return "-"
    return "unknown" if logs.lag is None else human_bytes(logs.lag)


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
    logs = log_healths(ingest_dir(args), [h.name for h in hosts], args.stale)

    async def main(reactor) -> int:
        from decnet.master.agent_client import Probe, check_hosts

        now = time.time()
        arrived = lambda result: None  # noqa: E731
        if not args.json:
            widths = (max(len(h.name) for h in hosts), max(len(h.address) for h in hosts))
            table = output.StreamTable(CHECK_HEADERS, (*widths, 9, 12, 7, 12, 12, 8))
            arrived = lambda result: table.row(check_row(result, now))  # noqa: E731
        results = await check_hosts(
            reactor,
            ctx.identity,
            ctx.registry,
            hosts,
            revocations=ctx.revocations,
            timeout=budget(args.timeout),
            arrived=arrived,
            probe=Probe(logs=logs, now=now, stale=args.stale),
        )
        code = rules.exit_code(r.verdict for r in results)
        if args.json:
            output.print_json([r.as_dict() for r in results])
        else:
            output.line(summary(results))
        return code

    return run_async(main)


def summary(results) -> str:
    counts = {v: sum(1 for r in results if r.verdict == v) for v in HEALTH_CELL}
    return (
        f"{counts[rules.HEALTHY]} healthy, {counts[rules.DEGRADED]} degraded, "
        f"{counts[rules.UNREACHABLE]} unreachable"
    )
