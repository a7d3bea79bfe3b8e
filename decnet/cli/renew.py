"""``decnet-admin renew``: new certificates for workers without re-enrolling them.

The steps and their crash safety are :mod:`decnet.master.renewal`; this module
selects the hosts, shows progress, and renders the outcome.
"""

from __future__ import annotations

import argparse
import time

from twisted.internet import defer

from decnet import config
from decnet.cli import output
from decnet.cli.arguments import command, flag, json_flag, timeout_option
from decnet.cli.expiry import expires_cell
from decnet.cli.runtime import run_async
from decnet.errors import DecnetError, ValidationError
from decnet.master.registry import Host, Registry

RENEW_EXAMPLES = [
    "decnet-admin renew web-01                  # renew web-01's certificates now",
    "decnet-admin renew --all                   # every host within 30 days of expiry",
    "decnet-admin renew --all --before 90d --dry-run",
    "decnet-admin renew --all --json",
]

RENEW_HEADERS = ("NAME", "RESULT", "EXPIRES", "DETAIL")
CONCURRENCY = 4


def register(sub, parents) -> None:
    p = command(
        sub,
        parents,
        "renew",
        cmd_renew,
        summary="renew workers' certificates (new keys made on the worker)",
        description="Ask each worker's updater for CSRs over the current mTLS identity, "
        "sign them, push the certificates, wait until the agent and updater present them, "
        "then revoke the old ones. With NAME, renews now; with --all, the hosts whose "
        "certificate expires within --before (and hosts whose expiry is unknown or whose "
        "renewal was interrupted). The worker makes the new keys; they never leave it. Until "
        "the worker presents its new certificates, the master accepts the old and the new "
        "ones; then the old ones are revoked. An interrupted renewal (Ctrl-C, a worker "
        "restarting) is completed by running the same command again (docs/Operations.md).",
        examples=RENEW_EXAMPLES,
    )
    p.add_argument("names", nargs="*", metavar="NAME", help="the hosts to renew")
    flag(p, "--all", "every enrolled host that is due (see --before)")
    p.add_argument(
        "--before",
        default=None,
        help=f"only hosts expiring within this many days, e.g. 30d (default with --all: "
        f"{config.RENEW_BEFORE_DAYS}d; with NAME: renew regardless)",
    )
    flag(p, "--dry-run", "show which hosts would be renewed; contact nobody, change nothing")
    json_flag(p)
    timeout_option(p, config.HTTP_TIMEOUT, "seconds each request may take (default: %(default)s)")


def _named(args: argparse.Namespace, hosts: list[Host]) -> list[Host]:
    """The hosts NAME... or --all designate, before any expiry filter; typos refused."""
    if bool(args.names) == bool(args.all):
        raise ValidationError("name the hosts to renew, or give --all (not both)")
    if args.all:
        return hosts
    known = {h.name: h for h in hosts}
    unknown = [n for n in args.names if n not in known]
    if unknown:
        raise ValidationError(
            f"no host named {', '.join(map(repr, unknown))} is enrolled (see `decnet-admin hosts`)"
        )
    chosen = [known[n] for n in dict.fromkeys(args.names)]
    retired = [h.name for h in chosen if h.decommissioned]
    if retired:
        raise ValidationError(f"{', '.join(retired)}: decommissioned; there is nothing to renew")
    return chosen


def select(args: argparse.Namespace, hosts: list[Host], now: float) -> list[Host]:
    """The hosts this invocation renews (pure)."""
    from decnet.master.renewal import is_due, parse_days

    chosen = _named(args, hosts)
    before = args.before
    if before is None and args.all:
        before = f"{config.RENEW_BEFORE_DAYS}d"
    if before is None:
        return chosen
    days = parse_days(before)
    return [h for h in chosen if is_due(h, now, days)]


def cmd_renew(args: argparse.Namespace) -> int:
    from decnet.master import enrollment
    from decnet.tls import TLSIdentity

    identity = TLSIdentity.master(args.paths)
    master = enrollment.load_master(args.paths)
    registry = Registry(args.paths.registry)
    now = time.time()
    chosen = select(args, registry.list(), now)
    if args.dry_run:
        return _dry_run(args, chosen, now)
    if not chosen:
        _empty(args)
        return 0

    async def main(reactor) -> int:
        from decnet.master.renewal import Outcome, Renewal

        def progress(name: str, step) -> None:
            if not args.json:
                output.line(f"{name}: {step.value}")

        renewal = Renewal(
            reactor, master, identity, registry, timeout=args.timeout, progress=progress
        )
        limit = defer.DeferredSemaphore(CONCURRENCY)

        async def one(host: Host) -> Outcome:
            try:
                return await renewal.renew(host.name)
            except DecnetError as exc:
                return Outcome(host.name, "failed", host.expires_at, detail=str(exc))

        outcomes = await defer.gatherResults(
            [limit.run(one, h) for h in chosen], consumeErrors=True
        )
        _show(args, outcomes, registry, now)
        return 0 if all(o.result == "renewed" for o in outcomes) else 1

    return run_async(main)


def _empty(args: argparse.Namespace) -> None:
    if args.json:
        output.print_json({"hosts": []})
    else:
        output.line("No host is due for renewal (see `decnet-admin hosts`, or --before).")


def _dry_run(args: argparse.Namespace, chosen: list[Host], now: float) -> int:
    if args.json:
        output.print_json(
            {
                "dry_run": True,
                "hosts": [
                    {"name": h.name, "result": "would-renew", "expires_at": h.expires_at}
                    for h in chosen
                ],
            }
        )
        return 0
    if not chosen:
        _empty(args)
        return 0
    rows = [(h.name, "would renew", expires_cell(h, now), "") for h in chosen]
    output.print_table(RENEW_HEADERS, rows)
    return 0


def _show(args: argparse.Namespace, outcomes: list, registry: Registry, now: float) -> None:
    if args.json:
        output.print_json({"hosts": [o.as_dict() for o in outcomes]})
        return
    current = {h.name: h for h in registry.list()}
    rows = [
        (o.name, o.result, expires_cell(current[o.name], now), o.detail)
        for o in outcomes
        if o.name in current
    ]
    output.print_table(RENEW_HEADERS, rows)
