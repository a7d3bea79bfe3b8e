"""``decnet-admin listeners add|remove|list``: the listener list new bundles get."""

from __future__ import annotations

import argparse

from decnet.cli import output
from decnet.cli.arguments import command, examples, json_flag, listener_address
from decnet.master import enrollment
from decnet.master.listeners import ListenerEdit, add_listener, read_listeners, remove_listener


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
    )
    add.add_argument("listener", type=listener_address, metavar="HOST:PORT")
    add.add_argument(
        "--position", type=int, default=None, help="0-based place in the list (default: last)"
    )
    json_flag(add)
    examples(
        add,
        "decnet-admin listeners add 10.0.0.5:6514",
        "decnet-admin listeners add '[2001:db8::5]:6514' --position 0 --json",
    )

    rm = command(
        actions,
        parents,
        "remove",
        cmd_remove,
        summary="remove a listener from the list",
        description="Remove HOST:PORT from the list. Enrolled workers keep their bundle's "
        "list until `decnet-admin bundle refresh`.",
    )
    rm.add_argument("listener", type=listener_address, metavar="HOST:PORT")
    json_flag(rm)
    examples(rm, "decnet-admin listeners remove 10.0.0.5:6514")

    ls = command(
        actions,
        parents,
        "list",
        cmd_list,
        summary="show the list",
        description="Show the listener list new bundles get. Empty: bundles name the "
        "master's own listener (--master-host of init, the syslog port).",
    )
    json_flag(ls)
    examples(ls, "decnet-admin listeners list", "decnet-admin listeners list --json")


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
