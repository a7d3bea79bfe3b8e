"""``decnet-admin listeners add|remove|list``: the listener list new bundles get."""

from __future__ import annotations

import argparse

from decnet import config
from decnet.cli import output
from decnet.cli.arguments import (
    command,
    flag,
    json_flag,
    listener_address,
    timeout_option,
)
from decnet.cli.runtime import run_async
from decnet.errors import ValidationError
from decnet.master import enrollment
from decnet.master.listeners import ListenerEdit, add_listener, read_listeners, remove_listener
from decnet.master.refresh import RefreshResult, refresh_listeners
from decnet.master.registry import Host, Registry
from decnet.options import positive_int
from decnet.revocation import RevocationSet
from decnet.tls import TLSIdentity

REFRESH_TIMEOUT = 20.0


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "listeners",
        parents=parents,
        help="the log listeners new bundles name (add, remove, list)",
        description="Several log listeners can share the fleet: each worker ships to one "
        "of them, chosen by rendezvous hashing of its name, and fails over to the next. "
        "This list is what `decnet-admin enroll` writes into new bundles; `decnet-admin "
        "bundle refresh` pushes it to enrolled workers. See docs/SWARM-Mode.md.",
    )
    actions = p.add_subparsers(dest="listeners_command", metavar="ACTION", required=True)

    add = command(
        actions,
        parents,
        "add",
        cmd_add,
        summary="add a listener to the list",
        description="Add HOST:PORT to the list (at the end, or at --position). Adding one "
        "that is listed already changes nothing.",
        examples=[
            "decnet-admin listeners add 10.0.0.5:6514",
            "decnet-admin listeners add '[2001:db8::5]:6514' --position 0 --json",
        ],
    )
    add.add_argument(
        "listener", type=listener_address, metavar="HOST:PORT", help="the listener to add"
    )
    add.add_argument(
        "--position", type=int, default=None, help="0-based place in the list (default: last)"
    )
    json_flag(add)

    rm = command(
        actions,
        parents,
        "remove",
        cmd_remove,
        summary="remove a listener from the list",
        description="Remove HOST:PORT from the list. Enrolled workers keep their bundle's "
        "list until `decnet-admin bundle refresh`.",
        examples=["decnet-admin listeners remove 10.0.0.5:6514"],
    )
    rm.add_argument(
        "listener", type=listener_address, metavar="HOST:PORT", help="the listener to remove"
    )
    json_flag(rm)

    ls = command(
        actions,
        parents,
        "list",
        cmd_list,
        summary="show the list",
        description="Show the listener list new bundles get. Empty: bundles name the "
        "master's own listener (--master-host of init, the syslog port).",
        examples=["decnet-admin listeners list", "decnet-admin listeners list --json"],
    )
    json_flag(ls)

    b = sub.add_parser(
        "bundle",
        parents=parents,
        help="change enrolled workers' bundles (refresh)",
        description="Change what enrolled workers' bundles say, through their updaters.",
    )
    bundle = b.add_subparsers(dest="bundle_command", metavar="ACTION", required=True)
    refresh = command(
        bundle,
        parents,
        "refresh",
        cmd_refresh,
        summary="push the listener list to workers",
        description="Send the listener list (`decnet-admin listeners list`) to NAME's "
        "updater, or every enrolled host's with --all, over mutual TLS. The updater "
        "replaces only the list in the worker's bundle.json, and the forwarder picks it up "
        "within its bundle check interval without a restart. One line per host as it "
        "answers (NDJSON with --json), then a table; the exit status is 1 if any named "
        "host was not refreshed.",
        examples=[
            "decnet-admin listeners add 10.0.0.6:6514 && decnet-admin bundle refresh --all",
            "decnet-admin bundle refresh web-01 --json",
        ],
        streams=True,
    )
    which = refresh.add_mutually_exclusive_group(required=True)
    which.add_argument("name", nargs="?", help="the host to refresh")
    flag(which, "--all", "every enrolled host with an updater")
    refresh.add_argument(
        "--concurrency",
        type=positive_int,
        default=config.DEFAULT_UPDATE_CONCURRENCY,
        help="hosts contacted at once (default: %(default)s)",
    )
    timeout_option(
        refresh, REFRESH_TIMEOUT, "seconds one host gets to answer (default: %(default)s)"
    )
    json_flag(refresh, "one JSON object per host as it answers (NDJSON), then a summary")


def _show(edit: ListenerEdit, what: str, as_json: bool) -> int:
    if as_json:
        output.print_json({"changed": edit.changed, "listeners": list(edit.listeners)})
        return 0
    output.line(what if edit.changed else "Nothing to change.")
    _print_list(list(edit.listeners))
    return 0


def _print_list(listeners: list[str]) -> None:
    if not listeners:
        output.line("No listener list: new bundles name the master's own listener.")
        return
    output.print_table(("ORDER", "LISTENER"), [(i, x) for i, x in enumerate(listeners)])


def cmd_add(args: argparse.Namespace) -> int:
    enrollment.load_master(args.paths)  # an initialised master, or a message saying so
    edit = add_listener(args.paths, args.listener, position=args.position)
    return _show(edit, f"Added {args.listener}.", args.json)


def cmd_remove(args: argparse.Namespace) -> int:
    enrollment.load_master(args.paths)
    edit = remove_listener(args.paths, args.listener)
    return _show(edit, f"Removed {args.listener}.", args.json)


def cmd_list(args: argparse.Namespace) -> int:
    listeners = read_listeners(args.paths)
    if args.json:
        output.print_json({"listeners": listeners})
        return 0
    _print_list(listeners)
    return 0


def _hosts(args: argparse.Namespace) -> list[Host]:
    if not args.paths.registry.exists():
        raise ValidationError(f"no registry at {args.paths.registry} (run `decnet-admin init`)")
    registry = Registry(args.paths.registry)
    if args.all:
        return registry.list()
    return [registry.get(args.name)]


def cmd_refresh(args: argparse.Namespace) -> int:
    listeners = read_listeners(args.paths)
    if not listeners:
        raise ValidationError(
            "the listener list is empty: add listeners first (`decnet-admin listeners add "
            "HOST:PORT`); a bundle without a list keeps shipping to the master alone"
        )
    hosts = _hosts(args)
    identity = TLSIdentity.master(args.paths)
    revocations = RevocationSet(args.paths.revocations)
    if not args.json:
        output.line(
            f"Pushing {len(listeners)} listener(s) to {len(hosts)} host(s): " + ", ".join(listeners)
        )

    def progress(result: RefreshResult) -> None:
        if args.json:
            output.print_ndjson(result.as_dict())
        else:
            output.line(
                f"[{result.host}] {result.result}" + (f": {result.detail}" if result.detail else "")
            )

    async def go(reactor) -> int:
        from decnet.master.updater_client import UpdaterClient

        def client_for(host: Host) -> UpdaterClient:
            return UpdaterClient(
                reactor, identity, host, timeout=args.timeout, revocations=revocations
            )

        results = await refresh_listeners(
            hosts, listeners, client_for, concurrency=args.concurrency, progress=progress
        )
        return _summary(args, results)

    return run_async(go)


def _summary(args: argparse.Namespace, results: list[RefreshResult]) -> int:
    failed = [r for r in results if not r.ok and (r.result != "skipped" or not args.all)]
    if args.json:
        output.print_ndjson({"summary": True, "hosts": len(results), "failed": len(failed)})
    else:
        output.line()
        output.print_table(
            ("HOST", "RESULT", "DETAIL"), [(r.host, r.result, r.detail) for r in results]
        )
    return 1 if failed else 0
