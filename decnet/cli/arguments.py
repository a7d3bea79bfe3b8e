"""Declaring ``decnet-admin`` sub-commands: the parser, its handler and the shared options.

Every command module's ``register(sub, parents)`` adds its commands with
:func:`command`, which also binds the function that runs it and gives its
``--help`` an ``examples:`` epilog, and spells the options several commands take
(``--json``, ``--timeout``, on/off flags) with the helpers below, so each is
declared, and reads in ``--help``, the same everywhere.  ``tests/test_cli_help.py``
walks the parser: every command has examples and ``--json``, every option has help.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from decnet import pki
from decnet.errors import ValidationError

JSON_HELP = "machine-readable output"


EXAMPLES = "examples:"


class HelpFormatter(argparse.HelpFormatter):
    """argparse's wrapping, except for an ``examples:`` epilog, kept line by line."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith(EXAMPLES):
            return "\n".join(indent + line for line in text.splitlines())
        return super()._fill_text(text, width, indent)


def examples_epilog(examples: Sequence[str]) -> str:
    """The ``--help`` epilog listing ``examples`` (command lines, ``#`` comments allowed)."""
    return "\n".join([EXAMPLES, *("  " + example for example in examples)])


def command(
    sub: argparse._SubParsersAction,
    parents: Sequence[argparse.ArgumentParser],
    name: str,
    run: Callable[[argparse.Namespace], int],
    *,
    summary: str,
    description: str,
    examples: Sequence[str],
    needs_home: bool = True,
    streams: bool = False,
) -> argparse.ArgumentParser:
    """Add sub-command ``name`` (``summary`` in the command list, ``description`` and
    ``examples`` in its ``--help``), run by ``run(args)``; returns its parser for the
    command's own options.

    ``needs_home``: the command reads the master's ``--home`` (refused unless ``init``
    made it; :func:`decnet.cli.runtime.require_home`).  ``streams``: under ``--json``
    it prints NDJSON, one record per line, as things happen.
    """
    parser = sub.add_parser(
        name,
        parents=list(parents),
        help=summary,
        description=description,
        epilog=examples_epilog(examples),
        formatter_class=HelpFormatter,
    )
    parser.set_defaults(func=run, needs_home=needs_home, streams=streams)
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


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    """``--stale 5m``: seconds from ``90``, ``90s``, ``5m``, ``2h`` or ``1d`` (an argparse type)."""
    raw = text.strip().lower()
    unit = _UNITS.get(raw[-1:], None)
    number = raw[:-1] if unit is not None else raw
    try:
        value = float(number) * (unit or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration (use e.g. 90s, 5m, 2h, 1d)"
        ) from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: a duration must be positive")
    return value


def listener_address(value: str) -> str:
    """An argparse ``type``: ``HOST:PORT`` of a log listener, in its canonical spelling;
    a typo is a usage error that says what was expected."""
    try:
        return pki.format_listener(*pki.parse_listener(value))
    except ValidationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
