"""``decnet-admin update / rollback / releases``: remote updates through the updaters."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO, TypeVar

from twisted.internet import defer

from decnet import config
from decnet.cli import output
from decnet.cli.arguments import command, flag, json_flag, timeout_option
from decnet.cli.runtime import budget, run_async
from decnet.errors import DecnetError, RemoteError, ValidationError
from decnet.master import tar_tree, wheel_release, wheelhouse
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
from decnet.master.wheel_release import WheelRelease
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
        summary="push a release of DECNET to workers' updaters",
        description="Build one wheel of DECNET (from --root, a checkout: an allow-list of the "
        "package, setup.cfg, pyproject.toml, README/LICENSE, never keys, .env, databases, logs, "
        "VCS data or caches; without --root on a master installed from a wheel, from the "
        "installed distribution), ask each host's updater which dependency wheels it already "
        "has, send it the release manifest, the wheel and only the wheels it lacks over mutual "
        "TLS, and report per host: updated, rolled_back (the new release failed its health "
        "check and the previous one is running again) or failed.",
        examples=[
            "decnet-admin update --all --dry-run",
            "decnet-admin update --host web-01 --host db-02",
            "decnet-admin update --all --canary 1 --include-self --json",
        ],
    )
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = UPDATE_EXAMPLES
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--host", action="append", metavar="NAME", help="a host to update (repeatable)"
    )
    flag(which, "--all", "every enrolled host with an updater")
    flag(p, "--include-self", "also update each updater (only where the agent update succeeded)")
    flag(
        p,
        "--dry-run",
        "build the release and show, per host, which wheels would be sent and how many "
        "bytes (asks each updater GET /wheels; changes nothing)",
    )
    p.add_argument(
        "--root",
        metavar="DIR",
        help="checkout to release (default: the checkout this decnet-admin runs from, or the "
        "installed distribution when it was installed from a wheel)",
    )
    p.add_argument(
        "--wheelhouse",
        metavar="DIR",
        help="the dependency wheels of the release (default: built once with pip wheel from "
        "this environment's pins, cached under HOME/cache)",
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


UPDATE_EXAMPLES = """examples:
  decnet-admin update --all --dry-run          what each host would be sent, and how much
  decnet-admin update --host web-01            one host, from this checkout or installation
  decnet-admin update --all --canary 1         one host first; the rest only if it ends updated
  decnet-admin update --all --root ~/decnet --wheelhouse ~/wheels --json
"""

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


def release_root(args: argparse.Namespace) -> Path | None:
    """The checkout to release: ``--root``, this checkout, or ``None`` (installed from a wheel)."""
    if args.root:
        return Path(args.root)
    root = default_root()
    return root if (root / "setup.cfg").is_file() else None


def _wheels_dir(args: argparse.Namespace, root: Path | None) -> Path:
    if args.wheelhouse:
        return Path(args.wheelhouse)
    cache = args.paths.home / "cache"
    cache.mkdir(mode=0o700, exist_ok=True)
    return wheelhouse.build(root, cache)


def cmd_update(args: argparse.Namespace) -> int:
    hosts = _select(_registry(args), args)
    plan = plan_rollout(hosts, args.canary)
    if not args.dry_run and not plan.canaries and not plan.rest:
        for skipped in plan.skipped:
            output.error(f"{skipped.host}: skipped, {skipped.detail}")
        output.error("no host to update")
        return 1
    root = release_root(args)
    if root is not None:
        tar_tree.collect(root)  # not a source tree: say so before building anything
    cache = args.paths.home / "cache"
    cache.mkdir(mode=0o700, exist_ok=True)
    release = wheel_release.prepare(root, _wheels_dir(args, root), cache_dir=cache)
    try:
        if args.dry_run:
            return _dry_run(args, plan, release)
        results = _push(args, plan, release)
    finally:
        release.remove()
    order = {h.name: i for i, h in enumerate(hosts)}
    results.sort(key=lambda r: order.get(r.host, len(order)))
    _show_results(args, release, results)
    return 1 if any(_failed(r, explicit=bool(args.host)) for r in results) else 0


def _failed(result: HostResult, *, explicit: bool) -> bool:
    """A host that did not end updated, or was skipped though named or by a stopped rollout."""
    if result.result in (FAILED, ROLLED_BACK):
        return True
    return result.result == SKIPPED and (explicit or result.detail.startswith("rollout stopped"))


def _push(args: argparse.Namespace, plan: RolloutPlan, release: WheelRelease) -> list[HostResult]:
    """Run the rollout of ``release`` to the hosts of ``plan``; the per-host results."""
    identity = TLSIdentity.master(args.paths)
    revocations = RevocationSet(args.paths.revocations)
    manifest = release.manifest
    if not args.json:  # --json prints one document, at the end
        git = f", git {manifest.build['git_sha']!s:.12}" if manifest.build.get("git_sha") else ""
        output.line(
            f"Release {release.release_id}: {manifest.decnet.file} "
            f"({release.size_of([manifest.decnet])} bytes), {len(manifest.deps)} dependency "
            f"wheels (set {manifest.deps_id[:16]}){git}"
        )
    progress = Progress.for_terminal(sys.stdout) if not args.json else None

    async def go(reactor):
        from decnet.master.updater_client import UpdaterClient

        tarballs = wheel_release.Tarballs(reactor, release)
        rollout = Rollout(
            reactor,
            lambda host: UpdaterClient(
                reactor, identity, host, timeout=args.timeout, revocations=revocations
            ),
            release.tarball_for([]),
            concurrency=args.concurrency,
            include_self=args.include_self,
            progress=progress.show if progress else (lambda h, m: None),
            timeout=args.timeout,
            archive_for=tarballs.for_client,  # type: ignore[arg-type]
        )
        return await rollout.run(plan)

    try:
        return _result_of(go, [])
    finally:
        if progress:
            progress.close()


class Progress:
    """Per-host progress of a rollout: a live line per host on a terminal, else a plain
    line per phase.  Messages carry worker text: :func:`output.printable` escapes it."""

    def __init__(self, stream: TextIO, live: bool):
        self.stream = stream
        self.live = live
        self.lines: dict[str, str] = {}

    @classmethod
    def for_terminal(cls, stream: TextIO) -> Progress:
        return cls(stream, live=stream.isatty())

    def show(self, host: str, message: str) -> None:
        text = output.printable(f"[{host}] {message}", output.CELL_MAX)
        if not self.live or host == "-":
            self.close()
            self.stream.write(text + "\n")
        else:
            if self.lines:
                self.stream.write(f"\x1b[{len(self.lines)}F")  # up to the first live line
            self.lines[host] = text
            self.stream.write("".join(f"\x1b[2K{line}\n" for line in self.lines.values()))
        self.stream.flush()

    def close(self) -> None:
        """Leave the live lines as they are; later lines go below them."""
        self.lines = {}


def _show_results(
    args: argparse.Namespace, release: WheelRelease, results: list[HostResult]
) -> None:
    if args.json:
        output.print_json(
            {
                "release": release.release_id,
                "wheel": release.manifest.decnet.as_dict(),
                "deps": release.manifest.deps_id,
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


def _dry_run(args: argparse.Namespace, plan: RolloutPlan, release: WheelRelease) -> int:
    """What each host would be sent: its inventory asked (``GET /wheels``), nothing changed."""
    identity = TLSIdentity.master(args.paths)
    revocations = RevocationSet(args.paths.revocations)
    hosts = [*plan.canaries, *plan.rest]

    async def go(reactor):
        from decnet.master.updater_client import UpdaterClient

        tarballs = wheel_release.Tarballs(reactor, release)

        async def one(host: Host) -> dict:
            try:
                client = UpdaterClient(
                    reactor, identity, host, timeout=args.timeout, revocations=revocations
                )
            except DecnetError as exc:
                wheels, why = list(release.manifest.deps), f"{exc}: every wheel is sent"
            else:
                try:
                    wheels, why = await tarballs.lacking(client)
                finally:
                    await client.close()
            sent = [release.manifest.decnet, *wheels]
            return {
                "host": host.name,
                "canary": host in plan.canaries,
                "wheels": [w.file for w in sent],
                "bytes": release.size_of(sent),
                "note": why,
            }

        runs = [defer.ensureDeferred(one(h)) for h in hosts]
        return list(await defer.gatherResults(runs, consumeErrors=True))

    per_host: list[dict] = _result_of(go, []) if hosts else []
    manifest = release.manifest
    if args.json:
        output.print_json(
            {
                "release": release.release_id,
                "wheel": manifest.decnet.as_dict(),
                "deps": manifest.deps_id,
                "dependencies": [w.as_dict() for w in manifest.deps],
                "build": dict(manifest.build),
                "hosts": per_host,
                "skipped": [{"host": s.host, "reason": s.detail} for s in plan.skipped],
                "include_self": args.include_self,
            }
        )
        return 0
    output.line("Dry run: each updater was asked what it has; nothing was changed.")
    output.line(f"Release {release.release_id}")
    output.line(f"  wheel    {manifest.decnet.file}  sha256 {manifest.decnet.sha256}")
    output.line(f"  deps     {len(manifest.deps)} wheels, set {manifest.deps_id}")
    if manifest.build.get("git_sha"):
        dirty = " (uncommitted changes)" if manifest.build.get("git_dirty") else ""
        output.line(f"  git      {manifest.build['git_sha']}{dirty}")
    rows: list[tuple[str, object, str, str]] = [
        (
            h["host"] + ("  (canary)" if h["canary"] else ""),
            len(h["wheels"]),
            _size(h["bytes"]),
            h["note"] or "",
        )
        for h in per_host
    ]
    rows += [(s.host, "-", "-", f"skipped: {s.detail}") for s in plan.skipped]
    output.print_table(("HOST", "WHEELS", "SIZE", "NOTE"), rows)
    if args.include_self:
        output.line("Then /update-self on every host whose agent update succeeded.")
    return 0


def _size(count: int) -> str:
    return f"{count / 1024 / 1024:.1f} MiB" if count >= 1024 * 1024 else f"{count / 1024:.0f} KiB"


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
