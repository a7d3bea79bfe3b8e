"""``decnet-admin decommission NAME``: confirm, clean the worker up, then revoke.

The clean-up (:mod:`decnet.master.retire`: teardown through the agent, the
forwarder stopped through the updater once it has shipped what it read) is
best effort and reported step by step: a worker that is gone, unreachable or
lying must not keep its certificates valid, so whatever it answers, the
revocation follows.  It runs before the revocation because afterwards the
master no longer talks to the host.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from decnet.cli import output
from decnet.cli.fleet import ingest_dir
from decnet.cli.runtime import run_async
from decnet.errors import UnknownHost, ValidationError
from decnet.master import enrollment, retire
from decnet.master.registry import Host, Registry, Tokens
from decnet.revocation import RevocationSet
from decnet.tls import TLSIdentity

TEARDOWN_TIMEOUT = 15.0  # seconds per request to the worker (teardown, forwarder stop)

DECOMMISSION_EXAMPLES = [
    "decnet-admin decommission web-01   # asks first, on a terminal",
    "decnet-admin decommission web-01 --yes --json   # scripts: no question, JSON out",
    "decnet-admin decommission dead-03 --yes --no-teardown   # the machine is gone",
]


def confirm(args: argparse.Namespace, host: Host | None) -> None:
    """Ask on the terminal unless ``--yes``; a non-terminal stdin without ``--yes`` is refused."""
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise ValidationError(
            f"refusing to decommission {args.name!r} without confirmation: stdin is not a "
            "terminal; pass --yes"
        )
    what = f"{args.name} ({host.address})" if host is not None else args.name
    output.line(
        f"Decommission {what}? Its deckies are torn down and its certificates revoked; "
        "this cannot be undone. Type the host name to confirm:",
        sys.stderr,
    )
    if sys.stdin.readline().strip() != args.name:
        raise ValidationError(f"not confirmed; {args.name!r} is unchanged")


def _lookup(registry: Registry, name: str) -> Host | None:
    """The host, or ``None`` when only unused tokens exist for ``name`` (else UnknownHost)."""
    try:
        return registry.get(name)
    except UnknownHost:
        if Tokens(registry).pending(name):
            return None
        raise


def clean_up(args: argparse.Namespace, host: Host | None) -> retire.Cleanup:
    """The best-effort steps on the worker (progress lines unless ``--json``)."""
    why = retire.skipped(host, args.no_teardown)
    if host is None or why is not None:
        step = retire.Step(retire.SKIPPED, why or "")
        return retire.Cleanup(step, step)
    identity = TLSIdentity.master(args.paths)
    revocations = RevocationSet(args.paths.revocations)
    outcome: list[retire.Cleanup] = []

    def progress(step: str) -> None:
        if not args.json:
            output.line(f"{host.name}: {PROGRESS[step]}")

    async def main(reactor: Any) -> int:
        retirement = retire.Retirement(
            reactor,
            identity,
            host,
            revocations,
            ingest_dir(args),
            timeout=lambda: args.timeout,
            drain_timeout=args.drain_timeout,
            progress=progress,
            now=time.time,
        )
        outcome.append(await retire.clean_up(retirement))
        return 0

    run_async(main)
    if outcome:
        return outcome[0]
    interrupted = retire.Step(retire.FAILED, "interrupted")
    return retire.Cleanup(interrupted, interrupted)


PROGRESS = {
    "teardown": "tearing down the deckies through the agent",
    "drain": "waiting for the forwarder to ship what it read",
    "forwarder": "stopping the forwarder through the updater",
}


def cmd_decommission(args: argparse.Namespace) -> int:
    master = enrollment.load_master(args.paths)
    host = _lookup(Registry(args.paths.registry), args.name)
    confirm(args, host)
    cleanup = clean_up(args, host)
    done = enrollment.decommission(master, args.name)
    if args.json:
        output.print_json(
            {
                "host": done.host.as_dict() if done.host else None,
                "already": done.already,
                "teardown": cleanup.teardown.as_dict(),
                "forwarder": {
                    **cleanup.forwarder.as_dict(),
                    "unshipped_bytes": cleanup.forwarder.unshipped,
                },
                "revoked": list(done.entries),
                "restored": list(done.restored),
                "cancelled_tokens": done.cancelled_tokens,
                "revocation_list": str(args.paths.revocations),
            }
        )
        return 0
    _show(args, done, cleanup)
    return 0


def _show(args: argparse.Namespace, done: enrollment.Decommission, cleanup: retire.Cleanup) -> None:
    if done.cancelled_tokens:
        output.line(f"Cancelled {done.cancelled_tokens} unused enrollment token(s) for {args.name}")
    host = done.host
    if host is None:
        output.line(f"{args.name} never joined; nothing to revoke")
        return
    output.line(f"  teardown         {cleanup.teardown.state}: {cleanup.teardown.detail}")
    output.line(f"  forwarder        {cleanup.forwarder.state}: {cleanup.forwarder.detail}")
    if not done.already:
        output.line(
            f"Decommissioned {host.name} at {host.revoked_at}; its certificates are revoked"
        )
    elif done.restored:
        output.line(
            f"{host.name} was already decommissioned at {host.revoked_at}; "
            f"restored {len(done.restored)} missing revocation "
            f"{'entry' if len(done.restored) == 1 else 'entries'}:"
        )
        for entry in done.restored:
            output.line(
                f"  {entry['role']:<8} {entry['cn']}  {output.short_fp(entry['fingerprint'])}"
            )
    else:
        output.line(
            f"{host.name} was already decommissioned at {host.revoked_at}; "
            f"its {len(done.entries)} revocation "
            f"{'entry is' if len(done.entries) == 1 else 'entries are'} in place"
        )
    output.line(f"  revocation list  {args.paths.revocations}")
