"""Entry point of the ``decnet-admin`` console script."""

from __future__ import annotations

import argparse
import sys

from decnet import __version__, config
from decnet.cli import agents, events, hosts, sandbox, updates
from decnet.cli.runtime import INTERRUPTED, report_failure
from decnet.errors import DecnetError

# Each module adds its sub-commands with register(subparsers).
COMMAND_MODULES = [hosts, agents, updates, events, sandbox]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="decnet-admin",
        description="Operate a DECNET swarm: enroll workers, inspect, command and update them.",
    )
    parser.add_argument("--version", action="version", version=f"decnet {__version__}")
    home_help = f"master state directory (default: ${config.ENV_HOME} or {config.DEFAULT_HOME})"
    parser.add_argument("--home", default=None, help=home_help)
    # Every sub-command accepts --home too (after its name); SUPPRESS keeps a
    # value given before the sub-command from being reset to a default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", default=argparse.SUPPRESS, help=home_help)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMAND_MODULES:
        module.register(sub, [common])
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.paths = config.MasterPaths.resolve(args.home)
    try:
        return int(args.func(args) or 0)
    except DecnetError as exc:
        return report_failure(exc, as_json=getattr(args, "json", False))
    except KeyboardInterrupt:
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
