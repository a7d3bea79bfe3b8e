"""``decnet-admin status / check / deploy / teardown``: commanding worker agents.

Each command reads the registry and the master identity first (blocking, before
the reactor runs), then talks to the agents with :class:`AgentClient` inside
``react``.  Failures are printed as one line per problem; the exit code is
non-zero when any host or service failed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from twisted.internet import defer

from decnet import config
from decnet.agent.spec import parse_spec
from decnet.cli import output
from decnet.cli.runtime import run_async
from decnet.errors import DecnetError, ValidationError
from decnet.master.registry import Registry
from decnet.revocation import RevocationSet
from decnet.tls import TLSIdentity


def register(sub, parents) -> None:
    p = sub.add_parser(
        "status",
        parents=parents,
        help="show the deckies a worker runs (or every worker's)",
        description="Ask the agent of NAME (or, with --all or no NAME, of every enrolled "
        "host) for its deployed spec and the live state of each decky and service.",
    )
    p.add_argument("name", nargs="?", help="host name (default: every host)")
    p.add_argument("--all", action="store_true", help="every enrolled host (the default)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--timeout", type=float, default=config.HTTP_TIMEOUT, help="seconds per host")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "check",
        parents=parents,
        help="probe every agent's health and record it in the registry",
        description="Probe GET /health of every enrolled (not decommissioned) host "
        "concurrently, record active/unreachable in the registry, print a table. Exits 1 "
        "if any host is down.",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--timeout", type=float, default=config.HTTP_TIMEOUT, help="seconds per host")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser(
        "deploy",
        parents=parents,
        help="deploy a spec of deckies to a worker",
        description="Validate the spec locally, send it to NAME's agent and print the "
        "result of every service. Deploying the same spec again changes nothing; a changed "
        "spec starts and stops only what changed. Exits 1 if any service failed.",
    )
    p.add_argument("name", help="host name")
    p.add_argument("--spec", required=True, metavar="FILE", help="deployment spec (JSON)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser(
        "teardown",
        parents=parents,
        help="stop one decky, or every decky, on a worker",
        description="Stop decky --decky on NAME's agent, or every decky without it.",
    )
    p.add_argument("name", help="host name")
    p.add_argument("--decky", default=None, help="the decky to stop (default: all)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_teardown)


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


def cmd_status(args: argparse.Namespace) -> int:
    ctx = _Context(args)
    if args.name and args.all:
        raise ValidationError("give a host NAME or --all, not both")
    hosts = [ctx.registry.get(args.name)] if args.name else ctx.registry.list()
    if not args.name:
        hosts = [h for h in hosts if not h.decommissioned]

    async def one(reactor, host):
        client = ctx.client(reactor, host, args.timeout)
        try:
            return await client.status()
        finally:
            await client.close()

    async def main(reactor):
        calls = [defer.ensureDeferred(one(reactor, h)) for h in hosts]
        outcomes = await defer.DeferredList(calls, consumeErrors=True)
        docs, errors = {}, {}
        for host, (ok, value) in zip(hosts, outcomes, strict=True):
            if ok:
                docs[host.name] = value
            elif value.check(DecnetError):
                errors[host.name] = str(value.value)
            else:
                value.raiseException()
        if args.json:
            output.print_json({"hosts": docs, "errors": errors})
        else:
            _print_status(docs, errors)
        return 1 if errors else 0

    if not hosts:
        print("No hosts enrolled yet (use `decnet-admin enroll`).")
        return 0
    return run_async(main)


def _print_status(docs: dict, errors: dict) -> None:
    rows = []
    for host, doc in sorted(docs.items()):
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
    for host, problem in sorted(errors.items()):
        rows.append((host, "-", "-", "-", "UNREACHABLE", "", "", "", problem))
    headers = ("HOST", "DECKY", "SERVICE", "TYPE", "STATE", "ADDRESS", "CONNS", "EVENTS", "REASON")
    print(output.table(headers, rows))


def cmd_check(args: argparse.Namespace) -> int:
    ctx = _Context(args)
    hosts = [h for h in ctx.registry.list() if not h.decommissioned]
    if not hosts:
        print("No hosts enrolled yet (use `decnet-admin enroll`).")
        return 0

    async def main(reactor):
        from decnet.master.agent_client import check_hosts

        results = await check_hosts(
            reactor,
            ctx.identity,
            ctx.registry,
            hosts,
            revocations=ctx.revocations,
            timeout=args.timeout,
        )
        if args.json:
            output.print_json([r.as_dict() for r in results])
        else:
            rows = [
                (
                    r.name,
                    r.address,
                    "up" if r.ok else "DOWN",
                    r.health.get("release") or "-",
                    r.health.get("version") or "-",
                    _uptime(r.health.get("uptime")),
                    r.detail,
                )
                for r in results
            ]
            headers = ("NAME", "ADDRESS", "HEALTH", "RELEASE", "VERSION", "UPTIME", "DETAIL")
            print(output.table(headers, rows))
        return 0 if all(r.ok for r in results) else 1

    return run_async(main)


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
            result = await client.deploy(doc)
        finally:
            await client.close()
        if args.json:
            output.print_json(result)
        else:
            _print_apply(host.name, result)
        return 0 if result["ok"] else 1

    return run_async(main)


def _print_apply(host: str, result: dict) -> None:
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
        print(output.table(headers, rows))
    changed = "changed" if result["changed"] else "unchanged"
    verdict = "all services listening" if result["ok"] else f"{len(result['failed'])} failed"
    print(f"{host}: spec {result['spec_hash'][:12]} ({changed}); {verdict}")


def cmd_teardown(args: argparse.Namespace) -> int:
    ctx = _Context(args)
    host = ctx.registry.get(args.name)

    async def main(reactor):
        client = ctx.client(reactor, host)
        try:
            result = await client.teardown(args.decky)
        finally:
            await client.close()
        if args.json:
            output.print_json(result)
        else:
            _print_apply(host.name, result)
        return 0 if result["ok"] else 1

    return run_async(main)
