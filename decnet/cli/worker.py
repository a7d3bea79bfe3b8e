"""Entry point of the ``decnet-worker`` console script (run on a worker).

``decnet-worker join https://MASTER[:8443] --token T --ca-fingerprint FP [--dir DIR]``
makes this worker's keys here and enrolls it with a one-time token
(:mod:`decnet.worker.join`).  Output goes through :mod:`decnet.cli.output`:
text for a person, or with ``--json`` one JSON document on stdout, and errors
as JSON on stderr with exit code 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from decnet import __version__, pki
from decnet.cli import output
from decnet.cli.arguments import json_flag, timeout_option
from decnet.cli.runtime import INTERRUPTED, problems_of, run_async
from decnet.errors import DecnetError
from decnet.worker.join import JOIN_TIMEOUT, join, parse_master_url

PROG = "decnet-worker"
DEFAULT_DIR = "/etc/decnet/bundle"

JOIN_EPILOG = f"""\
examples:
  # on the master: decnet-admin enroll web-01 --address 10.0.0.5 --updater --token
  decnet-worker join https://10.0.0.1:8443 --token 'Zq3...' \\
      --ca-fingerprint 'AB:12:...:EF'
  decnet-worker join https://master.example:8443 --token "$TOKEN" \\
      --ca-fingerprint "$FP" --dir /etc/decnet/bundle --json

The keys are made on this host and never leave it. They wait in .bundle.pending next to
the bundle (default {DEFAULT_DIR}) until the master has answered; if a join is cut
short (kill, power cut, lost connection), run the same command again: it completes
with the same keys. An existing bundle is never overwritten. Then start the daemons
with --bundle pointing at it (docs/Operations.md).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Enroll this DECNET worker with its master."
    )
    parser.add_argument("--version", action="version", version=f"decnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = sub.add_parser(
        "join",
        help="enroll with a one-time token (keys made here)",
        description="Make this worker's keys, send their CSRs with the one-time token to the "
        "master's enrollment service (trusted by the CA fingerprint, never by the system's "
        "CAs) and write the bundle the worker daemons load.",
        epilog=JOIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("master", help="the master's enrollment service: https://MASTER[:8443]")
    p.add_argument("--token", required=True, help="the token `decnet-admin enroll --token` printed")
    p.add_argument(
        "--ca-fingerprint",
        required=True,
        metavar="FP",
        help="SHA-256 of the master's CA certificate (hex or AB:12:... as printed)",
    )
    p.add_argument(
        "--dir",
        default=DEFAULT_DIR,
        help="new bundle directory (default: %(default)s)",
    )
    p.add_argument(
        "--key-type",
        choices=pki.KEY_TYPES,
        default=pki.DEFAULT_KEY_TYPE,
        help="key type for the worker and updater keys (default: %(default)s)",
    )
    json_flag(p)
    timeout_option(
        p, JOIN_TIMEOUT, "seconds to wait for the master's answer (default: %(default)s)"
    )
    p.set_defaults(func=cmd_join)
    return parser


def cmd_join(args: argparse.Namespace) -> int:
    url = parse_master_url(args.master)
    fingerprint = pki.normalize_fingerprint(args.ca_fingerprint)

    async def main(reactor: Any) -> int:
        result = await join(
            reactor,
            url,
            args.token,
            fingerprint,
            Path(args.dir),
            key_type=args.key_type,
            timeout=args.timeout,
        )
        if args.json:
            output.print_json(result.as_dict())
            return 0
        resumed = " (completing an interrupted join)" if result.resumed else ""
        output.line(f"Joined as {result.name}; bundle written to {result.directory}{resumed}")
        for role, fp in sorted(result.fingerprints.items()):
            output.line(f"  {role:<8} fingerprint  {pki.colon_fingerprint(fp)}")
        output.line(f"Start the daemons with --bundle {result.directory} (docs/Operations.md).")
        return 0

    return run_async(main)


def report(error: DecnetError, *, as_json: bool) -> int:
    """One escaped line per problem on stderr, or ``{"problems": [...]}`` there with --json."""
    problems = problems_of(error)
    if as_json:  # ASCII-only JSON: nothing in it for output.line to escape
        output.line(json.dumps({"problems": problems}, ensure_ascii=True), sys.stderr)
    else:
        for problem in problems:
            output.line(f"{PROG}: error: {problem}", sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DecnetError as exc:
        return report(exc, as_json=args.json)
    except KeyboardInterrupt:
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
