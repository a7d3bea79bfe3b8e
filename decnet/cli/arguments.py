"""Declaring ``decnet-admin`` sub-commands: the parser, its handler and the shared options.

Every command module's ``register(sub, parents)`` adds its commands with
:func:`command`, which also binds the function that runs it, and spells the
options several commands take (``--json``, ``--timeout``, on/off flags) with
the helpers below, so each is declared, and reads in ``--help``, the same
everywhere.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from decnet import pki
from decnet.errors import ValidationError

JSON_HELP = "machine-readable output"


def command(
    sub: argparse._SubParsersAction,
    parents: Sequence[argparse.ArgumentParser],
    name: str,
    run: Callable[[argparse.Namespace], int],
    *,
    summary: str,
    description: str,
) -> argparse.ArgumentParser:
    """Add sub-command ``name`` (``summary`` in the command list, ``description`` in its
    ``--help``), run by ``run(args)``; returns its parser for the command's own options."""
    parser = sub.add_parser(name, parents=list(parents), help=summary, description=description)
    parser.set_defaults(func=run)
    return parser


def flag(parser: argparse._ActionsContainer, name: str, text: str) -> None:
    """An on/off option (``store_true``), explained by ``text``; ``parser`` may be a group."""
    parser.add_argument(name, action="store_true", help=text)


def json_flag(parser: argparse.ArgumentParser, text: str = JSON_HELP) -> None:
    """``--json``: the command prints one JSON document instead of text."""
    flag(parser, "--json", text)


def timeout_option(parser: argparse.ArgumentParser, default: float, text: str) -> None:
    """``--timeout SECONDS`` (a float), explained by ``text``."""
    parser.add_argument("--timeout", type=float, default=default, help=text)


def listener_address(value: str) -> str:
    """An argparse ``type``: ``HOST:PORT`` of a log listener, in its canonical spelling;
    a typo is a usage error that says what was expected."""
    try:
        return pki.format_listener(*pki.parse_listener(value))
    except ValidationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def examples(parser: argparse.ArgumentParser, *lines: str) -> None:
    """Show ``lines`` as an "examples:" epilog of ``parser``'s ``--help``, as written."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "examples:\n" + "\n".join("  " + line for line in lines)
