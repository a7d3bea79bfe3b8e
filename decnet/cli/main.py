"""Entry point of the ``decnet-admin`` console script.

Everything every command shares happens here, once: parsing, the ``--json``
output mode (:func:`decnet.cli.output.begin`), the ``--home`` check
(:func:`decnet.cli.runtime.require_home`), the report of an expected failure and
a quiet end when the reader of stdout goes away (``decnet-admin status | head``).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence
from typing import NoReturn

from decnet import __version__, config
from decnet.cli import agents, events, fleet, hosts, listeners, output, renew, sandbox, updates
from decnet.cli.arguments import HelpFormatter
from decnet.cli.runtime import (
    INTERRUPTED,
    quiet_broken_pipe,
    report_failure,
    require_home,
)
from decnet.errors import DecnetError

# Each module adds its sub-commands with register(subparsers).
COMMAND_MODULES = [hosts, agents, fleet, events, updates, renew, listeners, sandbox]

USAGE_ERROR = 2  # argparse's exit code for a bad command line

EPILOG = """examples:
  decnet-admin init --master-host 10.0.0.1
  decnet-admin enroll web-01 --address 10.0.0.21 --updater --out /tmp/web-01
  decnet-admin check
  decnet-admin status --json | jq .
  decnet-admin <command> --help        (every command lists its own examples)"""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error under ``--json`` is a JSON object on stderr."""

    def error(self, message: str) -> NoReturn:
        if not output.json_mode():
            super().error(message)
        output.begin(as_json=True, streaming=bool(self.get_default("streams")))
        output.json_error([f"{self.prog}: {message}"], usage=self.format_usage().strip())
        output.print_json({"problems": [f"{self.prog}: {message}"]})
        sys.exit(USAGE_ERROR)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="decnet-admin",
        description="Operate a DECNET swarm: enroll workers, inspect, command and update them.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
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


def _run(args: argparse.Namespace, as_json: bool) -> int:
    try:
        args.paths = config.MasterPaths.resolve(args.home)
        if getattr(args, "needs_home", True):
            require_home(args.paths)
        return int(args.func(args) or 0)
    except DecnetError as exc:
        return report_failure(exc, as_json=as_json)
    except KeyboardInterrupt:
        return INTERRUPTED
    except (BrokenPipeError, SystemExit):
        raise
    except Exception as exc:
        if not as_json:
            raise  # a bug: its traceback is what to report
        output.json_error(
            [f"internal error: {type(exc).__name__}: {exc}"], traceback=traceback.format_exc()
        )
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Before parsing, so that a usage error under --json is JSON too.
    output.begin(as_json="--json" in argv)
    try:
        args = build_parser().parse_args(argv)
        as_json = bool(getattr(args, "json", False))
        output.begin(as_json=as_json, streaming=getattr(args, "streams", False))
        code = _run(args, as_json)
        output.finish(code)
        sys.stdout.flush()
    except BrokenPipeError:
        return quiet_broken_pipe()
    except SystemExit:  # --help, --version, a usage error: what they printed must reach the pipe
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            quiet_broken_pipe()
        raise
    finally:
        output.begin(as_json=False)  # the mode is this command's, not a later caller's
    return code


if __name__ == "__main__":
    sys.exit(main())
