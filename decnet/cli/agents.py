"""``decnet-admin status / check / deploy / teardown``: commanding worker agents.

Each command reads the registry and the master identity first (blocking, before
the reactor runs), then talks to the agents with :class:`AgentClient` inside
``react``.  Failures are printed as one line per problem; the exit code is
non-zero when any host or service failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from twisted.internet import defer

from decnet import config
from decnet.agent.spec import parse_spec
from decnet.cli import output
from decnet.cli.arguments import command, flag, json_flag, timeout_option
from decnet.cli.expiry import expiry_fields, expiry_warning
from decnet.cli.runtime import budget, run_async
from decnet.errors import BadReply, DecnetError, ValidationError
from decnet.master.registry import Host, Registry
from decnet.revocation import RevocationSet
from decnet.tls import TLSIdentity

TIMEOUT_HELP = (
    "seconds, from the command's start, by which every host must have answered in full "
    "(connect, TLS handshake, headers and body); a host that has not is reported as such "
    "(default: %(default)s)"
)


def register(sub, parents) -> None:
    p = command(
        sub,
        parents,
        "status",
        cmd_status,
        summary="show the deckies a worker runs (or every worker's)",
        description="Ask the agent of NAME (or, with --all or no NAME, of every enrolled "
        "host) for its deployed spec and the live state of each decky and service.",
    )
    p.add_argument("name", nargs="?", help="host name (default: every host)")
    flag(p, "--all", "every enrolled host (the default)")
    _json_and_timeout(p, config.HTTP_TIMEOUT)

    p = command(
        sub,
        parents,
        "check",
        cmd_check,
        summary="probe every agent's health and record it in the registry",
        description="Probe GET /health of every enrolled (not decommissioned) host "
        "concurrently, record active/unreachable in the registry, print a table. Exits 1 "
        "if any host is down.",
    )
    _json_and_timeout(p, config.HTTP_TIMEOUT)

    p = command(
        sub,
        parents,
        "deploy",
        cmd_deploy,
        summary="deploy a spec of deckies to a worker",
        description="Validate the spec locally, send it to NAME's agent and print the "
        "result of every service. Deploying the same spec again changes nothing; a changed "
        "spec starts and stops only what changed. Exits 1 if any service failed.",
    )
    p.add_argument("name", help="host name")
    p.add_argument("--spec", required=True, metavar="FILE", help="deployment spec (JSON)")
    _json_and_timeout(p, config.AGENT_DEPLOY_TIMEOUT)

    p = command(
        sub,
        parents,
        "teardown",
        cmd_teardown,
        summary="stop one decky, or every decky, on a worker",
        description="Stop decky --decky on NAME's agent, or every decky without it.",
    )
    p.add_argument("name", help="host name")
    p.add_argument("--decky", default=None, help="the decky to stop (default: all)")
    _json_and_timeout(p, config.AGENT_DEPLOY_TIMEOUT)


def _json_and_timeout(parser: argparse.ArgumentParser, timeout: float) -> None:
    json_flag(parser)
    timeout_option(parser, timeout, TIMEOUT_HELP)


class _Context:
    """What every command needs, loaded before the reactor runs."""

    def __init__(self, args: argparse.Namespace):
        self.identity = TLSIdentity.master(args.paths)
        self.registry = Registry(args.paths.registry)
        self.revocations = RevocationSet(args.paths.revocations)

    def client(self, reactor, host, timeout: float = config.HTTP_TIMEOUT):
        # treq and the HTTP client stack load only for commands that talk to agents.
        from decnet.master.agent_client import AgentClient

        return AgentClient(
            reactor, self.identity, host, revocations=self.revocations, timeout=timeout
        )


def _failure_state(exc: DecnetError) -> str:
    """What a host's row says when its agent could not be used."""
    return "BAD REPLY" if isinstance(exc, BadReply) else "UNREACHABLE"


async def _each(hosts, fn) -> None:
    """Run ``fn(host)`` for every host at once; re-raise a bug once all have ended."""
    outcomes = await defer.DeferredList(
        [defer.ensureDeferred(fn(h)) for h in hosts], consumeErrors=True
    )
    for ok, value in outcomes:
        if not ok:
            value.raiseException()


STATUS_HEADERS = (
    "HOST",
    "DECKY",
    "SERVICE",
    "TYPE",
    "STATE",
    "ADDRESS",
    "CONNS",
    "EVENTS",
    "REASON",
)
# Typical widths of what the agents will say (a longer value widens its own row only).
STATUS_WIDTHS = (10, 10, 10, 9, 21, 5, 6)


def cmd_status(args: argparse.Namespace) -> int:
    ctx = _Context(args)
    if args.name and args.all:
        raise ValidationError("give a host NAME or --all, not both")
    hosts = [ctx.registry.get(args.name)] if args.name else ctx.registry.list()
    if not args.name:
        hosts = [h for h in hosts if not h.decommissioned]
    if not hosts:
        output.line("No hosts enrolled yet (use `decnet-admin enroll`).")
        return 0

    async def main(reactor):
        docs, errors = {}, {}
        table = None
        if not args.json:
            width = max(len(h.name) for h in hosts)
            table = output.StreamTable(STATUS_HEADERS, (width, *STATUS_WIDTHS))

        async def one(host):
            try:
                client = ctx.client(reactor, host, budget(args.timeout))
                try:
                    doc = await client.status()
                finally:
                    await client.close()
            except DecnetError as exc:  # refused before connecting, unreachable, bad reply
                errors[host.name] = str(exc)
                if table is not None:
                    table.row((host.name, "-", "-", "-", _failure_state(exc), "", "", "", exc))
                return
            docs[host.name] = doc
            if table is not None:
                for row in _status_rows(host.name, doc):
                    table.row(row)

        await _each(hosts, one)
        if args.json:
            output.print_json({"hosts": docs, "errors": errors})
        return 1 if errors else 0

    return run_async(main)


def _status_rows(host: str, doc: dict) -> list[tuple]:
    """One row per service of a validated ``GET /status`` reply."""
    rows = []
    if not doc["deckies"]:
        rows.append((host, "-", "-", "-", "(nothing deployed)", "", "", "", ""))
    for decky, info in sorted(doc["deckies"].items()):
        for name, s in sorted(info["services"].items()):
            rows.append(
                (
                    host,
                    decky,
                    name,
                    s["type"],
                    s["state"],
                    s.get("address") or f"{s['bind']}:{s['port']}",
                    s["connections"],
                    s["events"],
                    s.get("reason") or "",
                )
            )
    return rows


CHECK_HEADERS = ("NAME", "ADDRESS", "HEALTH", "RELEASE", "VERSION", "UPTIME", "DETAIL")


def cmd_check(args: argparse.Namespace) -> int:
    ctx = _Context(args)
    hosts = [h for h in ctx.registry.list() if not h.decommissioned]
    if not hosts:
        output.line("No hosts enrolled yet (use `decnet-admin enroll`).")
        return 0

    async def main(reactor):
        from decnet.master.agent_client import check_hosts

        arrived = lambda result: None  # noqa: E731
        if not args.json:
            widths = (max(len(h.name) for h in hosts), max(len(h.address) for h in hosts))
            table = output.StreamTable(CHECK_HEADERS, (*widths, 9, 16, 8, 8))
            arrived = lambda result: table.row(_check_row(result))  # noqa: E731
        results = await check_hosts(
            reactor,
            ctx.identity,
            ctx.registry,
            hosts,
            revocations=ctx.revocations,
            timeout=budget(args.timeout),
            arrived=arrived,
        )
        now = time.time()
        by_name = {h.name: h for h in hosts}
        if args.json:
            output.print_json(
                [{**r.as_dict(), **expiry_fields(by_name[r.name], now)} for r in results]
            )
        else:
            _warn_expiring(hosts, now)
        return 0 if all(r.ok for r in results) else 1

    return run_async(main)


def _warn_expiring(hosts: list[Host], now: float) -> None:
    """One warning line per host whose certificate has fewer than 30 days left."""
    for host in hosts:
        warning = expiry_warning(host, now)
        if warning is not None:
            output.line(f"warning: {warning}", sys.stderr)


def _check_row(r) -> tuple:
    health = "up" if r.ok else ("BAD REPLY" if r.bad_reply else "DOWN")
    return (
        r.name,
        r.address,
        health,
        r.health.get("release") or "-",
        r.health.get("version") or "-",
        _uptime(r.health.get("uptime")),
        r.detail,
    )


def _uptime(seconds) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{days}d{hours:02d}h" if days else f"{hours:02d}:{minutes:02d}:{secs:02d}"


def _load_spec(path: str) -> dict:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ValidationError(f"spec file not found: {path}") from None
    except OSError as exc:
        raise ValidationError(f"cannot read spec file {path}: {exc.strerror}") from None
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ValidationError(f"{path} is not valid JSON: {exc}") from None
    parse_spec(doc)  # the agent validates again; this catches mistakes offline
    return doc


def cmd_deploy(args: argparse.Namespace) -> int:
    doc = _load_spec(args.spec)
    ctx = _Context(args)
    host = ctx.registry.get(args.name)

    async def main(reactor):
        client = ctx.client(reactor, host)
        try:
            result = await client.deploy(doc, timeout=budget(args.timeout))
        finally:
            await client.close()
        _show_apply(args, host.name, result)
        return 0 if result["ok"] else 1

    return run_async(main)


def _show_apply(args, host: str, result: dict) -> None:
    """The validated answer of a deploy or a teardown, as JSON or a table and a verdict."""
    if args.json:
        output.print_json(result)
        return
    rows = [
        (
            decky,
            name,
            r["action"],
            r["state"],
            r.get("address") or "-",
            r.get("reason") or "",
        )
        for decky, services in sorted(result["deckies"].items())
        for name, r in sorted(services.items())
    ]
    rows += [(r["decky"], r["service"], "removed", "stopped", "-", "") for r in result["removed"]]
    if rows:
        headers = ("DECKY", "SERVICE", "ACTION", "STATE", "ADDRESS", "REASON")
        output.print_table(headers, rows)
    changed = "changed" if result["changed"] else "unchanged"
    verdict = "all services listening" if result["ok"] else f"{len(result['failed'])} failed"
    output.line(f"{host}: spec {result['spec_hash'][:12]} ({changed}); {verdict}")


def cmd_teardown(args: argparse.Namespace) -> int:
    ctx = _Context(args)
    host = ctx.registry.get(args.name)

    async def main(reactor):
        client = ctx.client(reactor, host)
        try:
            result = await client.teardown(args.decky, timeout=budget(args.timeout))
        finally:
            await client.close()
        _show_apply(args, host.name, result)
        return 0 if result["ok"] else 1

    return run_async(main)
