"""``decnet-admin decommission NAME``: confirm, tear down through the agent, then revoke.

The teardown is best effort and reported: a worker that is gone, unreachable or
lying must not keep its certificates valid, so whatever the agent does, the
revocation follows.  It runs before the revocation because afterwards the
master no longer talks to the host.  The forwarder is not stopped (the agent
has no say over it); from the revocation on, the listener refuses it and it
says so in its log.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import attrs

from decnet.cli import output
from decnet.cli.runtime import budget, run_async
from decnet.errors import DecnetError, UnknownHost, ValidationError
from decnet.master import enrollment
from decnet.master.agent_client import AgentClient
from decnet.master.registry import Host, Registry, Tokens
from decnet.revocation import RevocationSet
from decnet.tls import TLSIdentity

TEARDOWN_TIMEOUT = 15.0

DECOMMISSION_EXAMPLES = [
    "decnet-admin decommission web-01   # asks first, on a terminal",
    "decnet-admin decommission web-01 --yes --json   # scripts: no question, JSON out",
    "decnet-admin decommission dead-03 --yes --no-teardown   # the machine is gone",
]


@attrs.frozen
class Teardown:
    """What the best-effort teardown did: ``state`` is done, failed or skipped."""

    state: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        return attrs.asdict(self)


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


def teardown(args: argparse.Namespace, host: Host | None) -> Teardown:
    if host is None:
        return Teardown("skipped", "never joined")
    if host.decommissioned:
        return Teardown("skipped", "already decommissioned")
    if args.no_teardown:
        return Teardown("skipped", "--no-teardown")
    identity = TLSIdentity.master(args.paths)
    revocations = RevocationSet(args.paths.revocations)

    async def main(reactor: Any) -> int:
        client = AgentClient(reactor, identity, host, revocations=revocations)
        try:
            result = await client.teardown(None, timeout=budget(args.timeout))
        except DecnetError as exc:
            outcome.append(Teardown("failed", str(exc)))
            return 0
        finally:
            await client.close()
        removed = len(result.get("removed") or [])
        state = "done" if result.get("ok") else "failed"
        outcome.append(Teardown(state, f"{removed} services stopped"))
        return 0

    outcome: list[Teardown] = []
    run_async(main)
    return outcome[0] if outcome else Teardown("failed", "interrupted")


def cmd_decommission(args: argparse.Namespace) -> int:
    master = enrollment.load_master(args.paths)
    host = _lookup(Registry(args.paths.registry), args.name)
    confirm(args, host)
    cleanup = teardown(args, host)
    done = enrollment.decommission(master, args.name)
    if args.json:
        output.print_json(
            {
                "host": done.host.as_dict() if done.host else None,
                "already": done.already,
                "teardown": cleanup.as_dict(),
                "revoked": list(done.entries),
                "restored": list(done.restored),
                "cancelled_tokens": done.cancelled_tokens,
                "revocation_list": str(args.paths.revocations),
            }
        )
        return 0
    _show(args, done, cleanup)
    return 0


def _show(args: argparse.Namespace, done: enrollment.Decommission, cleanup: Teardown) -> None:
    if done.cancelled_tokens:
        output.line(f"Cancelled {done.cancelled_tokens} unused enrollment token(s) for {args.name}")
    host = done.host
    if host is None:
        output.line(f"{args.name} never joined; nothing to revoke")
        return
    output.line(f"  teardown         {cleanup.state}: {cleanup.detail}")
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
