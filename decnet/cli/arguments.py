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

JSON_HELP = "machine-readable output"


def command(
    sub: argparse._SubParsersAction,
    parents: Sequence[argparse.ArgumentParser],
    name: str,
    run: Callable[[argparse.Namespace], int],
    *,
    summary: str,
    description: str,
    epilog: str | None = None,
) -> argparse.ArgumentParser:
    """Add sub-command ``name`` (``summary`` in the command list, ``description`` in its
    ``--help``, then ``epilog``: examples, kept as written), run by ``run(args)``; returns
    its parser for the command's own options."""
    parser = sub.add_parser(
        name,
        parents=list(parents),
        help=summary,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter if epilog else argparse.HelpFormatter,
    )
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
