"""``decnet-admin update / rollback / releases``: remote updates through the updaters."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from decnet import config
from decnet.cli import output
from decnet.cli.arguments import command, flag, json_flag, timeout_option
from decnet.cli.runtime import budget, run_async
from decnet.errors import DecnetError, RemoteError, ValidationError
from decnet.master import tar_tree
from decnet.master.registry import Host, Registry
from decnet.master.rollout import (
    FAILED,
    ROLLED_BACK,
    SKIPPED,
    HostResult,
    Rollout,
    RolloutPlan,
    plan_rollout,
)
from decnet.master.tar_tree import ReleaseArchive
from decnet.options import non_negative_int, positive_int
from decnet.revocation import RevocationSet
from decnet.tls import TLSIdentity

T = TypeVar("T")


def register(sub, parents) -> None:
    p = command(
        sub,
        parents,
        "update",
        cmd_update,
        summary="push a release of this source tree to workers' updaters",
        description="Build one release tarball from --root (an allow-list: the package, "
        "setup.cfg, pyproject.toml, README/LICENSE and an optional wheelhouse; never keys, "
        ".env, databases, logs, VCS data or caches), push it to each host's updater over "
        "mutual TLS, and report per host: updated, rolled_back (the new release failed its "
        "health check and the previous one is running again) or failed.",
        examples=[
            "decnet-admin update --all --dry-run",
            "decnet-admin update --host web-01 --host db-02",
            "decnet-admin update --all --canary 1 --include-self --json",
        ],
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--host", action="append", metavar="NAME", help="a host to update (repeatable)"
    )
    flag(which, "--all", "every enrolled host with an updater")
    flag(p, "--include-self", "also update each updater (only where the agent update succeeded)")
    flag(p, "--dry-run", "list the hosts and the tarball's files, size and sha256; contact nothing")
    p.add_argument("--root", metavar="DIR", help="source tree to release (default: this one)")
    p.add_argument(
        "--wheelhouse",
        metavar="DIR",
        help="ship these wheels for offline installs (pip wheel -w DIR . setuptools wheel)",
    )
    p.add_argument(
        "--concurrency",
        type=positive_int,
        default=config.DEFAULT_UPDATE_CONCURRENCY,
        help="hosts updated at once (default: %(default)s)",
    )
    p.add_argument(
        "--canary",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="update N hosts first; stop unless all of them end updated",
    )
    timeout_option(
        p,
        config.DEFAULT_UPDATE_TIMEOUT,
        "seconds one host gets for the whole push and its answer (default: %(default)s)",
    )
    json_flag(p, "machine-readable results")

    p = command(
        sub,
        parents,
        "rollback",
        cmd_rollback,
        summary="switch a host's agent back to a previous release",
        description="Ask NAME's updater to switch back to the previous release (or --to a "
        "named installed one), restart the agent and confirm it is healthy.",
        examples=[
            "decnet-admin rollback web-01",
            "decnet-admin rollback web-01 --to 20260101T120000Z-1a2b3c4d5e6f",
        ],
    )
    p.add_argument("name", help="the host whose agent to roll back")
    p.add_argument("--to", metavar="RELEASE", help="an installed release id (see `releases`)")
    json_flag(p, "machine-readable result")
    timeout_option(p, config.DEFAULT_UPDATE_TIMEOUT, DEADLINE_HELP)

    p = command(
        sub,
        parents,
        "releases",
        cmd_releases,
        summary="list the releases installed on a host",
        description="List the agent releases NAME's updater keeps: which one is current, the "
        "rollback target, releases that failed their health check (pruned first) and releases "
        "a running process uses (never pruned).",
        examples=["decnet-admin releases web-01", "decnet-admin releases web-01 --json"],
    )
    p.add_argument("name", help="the host whose releases to list")
    json_flag(p)
    timeout_option(p, config.RELEASES_TIMEOUT, DEADLINE_HELP)


DEADLINE_HELP = (
    "seconds, from the command's start, by which the host must have answered in "
    "full (default: %(default)s)"
)


def default_root() -> Path:
    """The source tree this ``decnet`` was imported from."""
    import decnet

    return Path(decnet.__file__).resolve().parent.parent


def _select(registry: Registry, args) -> list[Host]:
    if args.all:
        return registry.list()
    names = list(dict.fromkeys(args.host))
    problems, hosts = [], []
    for name in names:
        try:
            hosts.append(registry.get(name))
        except DecnetError as exc:
            problems.append(str(exc))
    if problems:
        raise ValidationError(problems)
    return hosts


def _registry(args) -> Registry:
    if not args.paths.registry.exists():
        raise ValidationError(f"no registry at {args.paths.registry} (run `decnet-admin init`)")
    return Registry(args.paths.registry)


def _progress(host: str, message: str) -> None:
    output.line(f"[{host}] {message}")


def cmd_update(args: argparse.Namespace) -> int:
    hosts = _select(_registry(args), args)
    plan = plan_rollout(hosts, args.canary)
    root = Path(args.root) if args.root else default_root()
    archive = tar_tree.build_release(root, wheelhouse=args.wheelhouse)
    try:
        if args.dry_run:
            return _dry_run(args, plan, archive)
        if not plan.canaries and not plan.rest:
            for skipped in plan.skipped:
                output.error(f"{skipped.host}: skipped, {skipped.detail}")
            output.error("no host to update")
            return 1
        results = _push(args, plan, archive)
    finally:
        _remove(archive)
    order = {h.name: i for i, h in enumerate(hosts)}
    results.sort(key=lambda r: order.get(r.host, len(order)))
    _show_results(args, archive, results)
    return 1 if any(_failed(r, explicit=bool(args.host)) for r in results) else 0


def _failed(result: HostResult, *, explicit: bool) -> bool:
    """A host that did not end updated, or was skipped though named or by a stopped rollout."""
    if result.result in (FAILED, ROLLED_BACK):
        return True
    return result.result == SKIPPED and (explicit or result.detail.startswith("rollout stopped"))


def _push(args: argparse.Namespace, plan: RolloutPlan, archive: ReleaseArchive) -> list[HostResult]:
    """Run the rollout of ``archive`` to the hosts of ``plan``; the per-host results."""
    identity = TLSIdentity.master(args.paths)
    revocations = RevocationSet(args.paths.revocations)
    git = f", git {archive.git_sha[:12]}" if archive.git_sha else ""
    if not args.json:  # --json prints one document, at the end
        output.line(
            f"Release {archive.release_id}: {len(archive.files)} files, {archive.size} "
            f"bytes, sha256 {archive.sha256}{git}"
        )

    async def go(reactor):
        from decnet.master.updater_client import UpdaterClient

        rollout = Rollout(
            reactor,
            lambda host: UpdaterClient(
                reactor, identity, host, timeout=args.timeout, revocations=revocations
            ),
            archive,
            concurrency=args.concurrency,
            include_self=args.include_self,
            progress=(lambda h, m: None) if args.json else _progress,
            timeout=args.timeout,
        )
        return await rollout.run(plan)

    return _result_of(go, [])


def _remove(archive: ReleaseArchive) -> None:
    """Delete the built tarball and its temporary directory (if nothing else is in it)."""
    archive.path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        archive.path.parent.rmdir()


def _show_results(
    args: argparse.Namespace, archive: ReleaseArchive, results: list[HostResult]
) -> None:
    if args.json:
        output.print_json(
            {
                "release": archive.release_id,
                "sha256": archive.sha256,
                "results": [r.as_dict() for r in results],
            }
        )
        return
    rows = [
        (
            r.host,
            r.result,
            r.release or "-",
            "-" if r.seconds is None else f"{r.seconds:.1f}",
            _detail(r),
        )
        for r in results
    ]
    output.line()
    output.print_table(("HOST", "RESULT", "RELEASE", "SECONDS", "DETAIL"), rows)
    for r in results:
        _show_agent_tail(r)


# How many of the agent's last output lines a failed host shows under the table.
AGENT_TAIL_LINES = 12


def _tail(text: str, count: int) -> list[str]:
    return [line for line in text.splitlines() if line.strip()][-count:]


def _detail(result: HostResult) -> str:
    """The DETAIL cell: the updater's reason, then the agent's last line (its error)."""
    last = _tail(result.output.get("agent", ""), 1)
    return f"{result.detail}; agent: {last[0].strip()}" if last else result.detail


def _show_agent_tail(result: HostResult) -> None:
    """The last lines the failed release's agent printed (all of them: --json)."""
    lines = _tail(result.output.get("agent", ""), AGENT_TAIL_LINES)
    if not lines:
        return
    output.line()
    output.line(
        f"Last output lines of the agent on {result.host} "
        "(all of it: --json, results[].output.agent):"
    )
    for text in lines:
        output.line(f"  {text}")


def _dry_run(args: argparse.Namespace, plan: RolloutPlan, archive: ReleaseArchive) -> int:
    if args.json:
        output.print_json(
            {
                "release": archive.release_id,
                "sha256": archive.sha256,
                "size": archive.size,
                "git_sha": archive.git_sha,
                "git_dirty": archive.git_dirty,
                "files": list(archive.files),
                "excluded": [{"path": s.path, "reason": s.reason} for s in archive.skipped],
                "canaries": [h.name for h in plan.canaries],
                "hosts": [h.name for h in plan.rest],
                "skipped": [{"host": s.host, "reason": s.detail} for s in plan.skipped],
                "include_self": args.include_self,
            }
        )
        return 0
    output.line("Dry run: nothing was contacted.")
    _show_release(archive)
    output.line("Hosts:")
    for host in plan.canaries:
        output.line(f"  {host.name}  (canary)")
    for host in plan.rest:
        output.line(f"  {host.name}")
    for s in plan.skipped:
        output.line(f"  {s.host}  skipped: {s.detail}")
    if args.include_self:
        output.line("Then /update-self on every host whose agent update succeeded.")
    return 0


def _show_release(archive: ReleaseArchive) -> None:
    """What a dry run would push: the tarball, its files and what was left out."""
    output.line(f"Release {archive.release_id}")
    output.line(f"  sha256   {archive.sha256}")
    output.line(f"  size     {archive.size} bytes, {len(archive.files)} files")
    if archive.git_sha:
        output.line(
            f"  git      {archive.git_sha}"
            + (" (uncommitted changes)" if archive.git_dirty else "")
        )
    output.line("Files:")
    for name in archive.files:
        output.line(f"  {name}")
    if archive.skipped:
        output.line("Left out:")
        for s in archive.skipped:
            output.line(f"  {s.path}  ({s.reason})")


def _result_of(fn: Callable[[Any], Awaitable[T]], stopped: T) -> T:
    """The value of ``await fn(reactor)``, run under the command's reactor (:func:`run_async`);
    ``stopped`` if the reactor stopped before ``fn`` ended (a signal)."""
    box: list[T] = []

    async def main(reactor) -> int:
        box.append(await fn(reactor))
        return 0

    run_async(main)
    return box[0] if box else stopped


def _client_for(args, reactor):
    from decnet.master.updater_client import UpdaterClient

    host = _registry(args).get(args.name)
    identity = TLSIdentity.master(args.paths)
    revocations = RevocationSet(args.paths.revocations)
    return UpdaterClient(reactor, identity, host, revocations=revocations)


def cmd_rollback(args: argparse.Namespace) -> int:
    async def go(reactor):
        client = _client_for(args, reactor)
        try:
            return await client.rollback(args.to, timeout=budget(args.timeout))
        except RemoteError as exc:
            return {"result": exc.body.get("result", "failed"), **exc.body, "status": exc.status}
        finally:
            await client.close()

    doc: dict = dict(_result_of(go, {}))
    ok = doc.get("result") == "rolled_back" and "problems" not in doc
    if args.json:
        output.print_json(doc)
    elif ok:
        output.line(
            f"{args.name}: back on release {doc.get('release')} (was {doc.get('previous')})"
            + (f"; {doc['detail']}" if doc.get("detail") else "")
        )
    else:
        for problem in doc.get("problems") or ["rollback failed"]:
            output.error(f"{args.name}: {problem}")
    return 0 if ok else 1


def cmd_releases(args: argparse.Namespace) -> int:
    async def go(reactor):
        client = _client_for(args, reactor)
        try:
            return await client.releases(timeout=budget(args.timeout))
        finally:
            await client.close()

    doc: dict = dict(_result_of(go, {}))
    if args.json:
        output.print_json(doc)
        return 0
    releases = doc.get("releases") or []
    if not releases:
        output.line(f"{args.name}: no release installed yet")
        return 0
    output.print_table(
        ("RELEASE", "CURRENT", "STATE", "INSTALLED", "GIT"), [_release_row(r) for r in releases]
    )
    if doc.get("updater_release"):
        output.line(f"updater itself: release {doc['updater_release']}")
    return 0


def _release_row(r: dict) -> tuple:
    """One row of ``releases``: a release the updater reported (validated by the client)."""
    return (
        r.get("id"),
        "*" if r.get("current") else ("<- rollback" if r.get("rollback_target") else ""),
        ", ".join(s for s in ("failed", "in use") if r.get(s.replace(" ", "_"))) or "-",
        r.get("installed_at") or "-",
        (r.get("git_sha") or "-")[:12],
    )
