"""``decnet-admin sandbox up / status / down / poke``: a whole swarm on this machine.

The logic lives in :mod:`decnet.sandbox`, which returns report objects; this
module parses arguments, checks what can be checked before the reactor runs
(the directory lock, leftovers of an earlier run), runs the async part with the
CLI's one reactor runner (:func:`decnet.cli.runtime.run_async`), and prints what
:mod:`decnet.cli.sandbox_view` makes of the reports.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import signal
import sys
from pathlib import Path
from typing import IO, cast

from twisted.internet import defer
from twisted.logger import ILogFilterPredicate, ILogObserver

from decnet import config
from decnet.cli import output, sandbox_view
from decnet.cli.arguments import HelpFormatter, command, examples_epilog, json_flag
from decnet.cli.runtime import run_async
from decnet.cli.sandbox_view import SandboxConsole
from decnet.errors import DecnetError, SandboxError, ValidationError
from decnet.fsutil import ensure_private_dir, write_new_file
from decnet.sandbox import ISandboxReactor, state
from decnet.sandbox import layout as sandbox_layout
from decnet.sandbox.layout import SandboxLayout
from decnet.sandbox.report import ignore

DIR_HELP = f"the sandbox directory (default: ./{config.SANDBOX_DEFAULT_DIR})"


def _workers(value: str) -> int:
    number = int(value)
    if not 1 <= number <= config.SANDBOX_MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"must be 1-{config.SANDBOX_MAX_WORKERS}, got {value}")
    return number


def _net(value: str) -> int:
    number = int(value)
    if not 1 <= number <= 254:
        raise argparse.ArgumentTypeError(f"must be 1-254, got {value}")
    return number


def _dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", default=config.SANDBOX_DEFAULT_DIR, help=DIR_HELP)


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "sandbox",
        help="run a complete local swarm on loopback (up, status, down, poke)",
        description="A master and N workers on this machine, every daemon a real twistd "
        "process on loopback: the fastest way to see DECNET work. See docs/Sandbox.md.",
        epilog=examples_epilog(
            ["decnet-admin sandbox up --workers 2", "decnet-admin sandbox down"]
        ),
        formatter_class=HelpFormatter,
    )
    sandbox = p.add_subparsers(dest="sandbox_command", metavar="ACTION", required=True)

    up = command(
        sandbox,
        (),
        "up",
        cmd_up,
        summary="start the sandbox and watch events arrive (Ctrl-C stops it)",
        description="Initialise a CA (or reuse DIR's), enroll workers w1..wN with updater "
        "certificates, start the master's log listener and, per worker, the updater (which "
        "runs the agent from its installed release) and the log forwarder, push a release of "
        "this checkout to every worker (offline, from a wheelhouse cached in DIR), deploy "
        "the default deckies, then print a host table and every event reaching the master. "
        "Worker i answers on 127.0.NET.i, its deckies on 127.NET.i.j. Ctrl-C (or SIGTERM, "
        "SIGHUP) stops every process it started and exits 0. Running it again on the same "
        "DIR reuses the CA, the registry, the bundles and the installed release.",
        examples=[
            "decnet-admin sandbox up",
            "decnet-admin sandbox up --workers 3 --dir state2 --net 43   # a second sandbox",
            "decnet-admin sandbox up --json     # NDJSON, one record per line",
        ],
        needs_home=False,
        streams=True,
    )
    up.add_argument(
        "--workers",
        type=_workers,
        default=config.SANDBOX_DEFAULT_WORKERS,
        metavar="N",
        help="number of workers (default: %(default)s)",
    )
    _dir_option(up)
    up.add_argument(
        "--net",
        type=_net,
        default=None,
        help="loopback network number NET (default: the one DIR was made with, else "
        f"{config.SANDBOX_DEFAULT_NET}); change it to run two sandboxes at once",
    )
    up.add_argument(
        "--wheelhouse",
        metavar="DIR",
        default=None,
        help="use these wheels for the release instead of building a wheelhouse in DIR/cache",
    )
    json_flag(up, "NDJSON: one JSON object per line, as things happen")

    st = command(
        sandbox,
        (),
        "status",
        cmd_status,
        summary="show whether the sandbox and each of its processes and agents are up",
        description="Read DIR/sandbox.json, check that `sandbox up` and every process it "
        "started are still alive (by recorded PID and start time), and ask each agent for "
        "its health and deckies. Exits 1 if anything is down.",
        examples=["decnet-admin sandbox status", "decnet-admin sandbox status --dir state2 --json"],
        needs_home=False,
    )
    _dir_option(st)
    json_flag(st)

    dn = command(
        sandbox,
        (),
        "down",
        cmd_down,
        summary="stop a running sandbox (from another terminal)",
        description="Ask `sandbox up` to stop and wait for it; if it is gone but processes it "
        "started survive (it was killed), stop those by their recorded PIDs. Safe to run "
        "again; exits 0 once nothing of the sandbox runs.",
        examples=["decnet-admin sandbox down", "decnet-admin sandbox down --dir state2"],
        needs_home=False,
    )
    _dir_option(dn)
    json_flag(dn)

    pk = command(
        sandbox,
        (),
        "poke",
        cmd_poke,
        summary="play the attacker against every decky service",
        description="Connect to every service of every decky with a real client (an SSH "
        "password login, an HTTP login form POST, telnet, FTP, SMTP AUTH, Redis AUTH and a "
        "command, raw bytes to the TCP banner), print what was done, then wait until each "
        "conversation has reached the master's feed under the right worker. Exits 1 if a "
        "conversation failed, did not arrive within --wait, or arrived as another worker.",
        examples=["decnet-admin sandbox poke", "decnet-admin sandbox poke --worker w1 --json"],
        needs_home=False,
    )
    _dir_option(pk)
    pk.add_argument(
        "--worker",
        action="append",
        metavar="NAME",
        help="poke only this worker's deckies (repeatable)",
    )
    pk.add_argument(
        "--wait",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long to wait for the events at the master (0: do not check; "
        "default: %(default)s)",
    )
    json_flag(pk)


def _print(blocks: list[str]) -> None:
    for block in blocks:
        output.text(block)


async def status_command(reactor: ISandboxReactor, layout: SandboxLayout, as_json: bool) -> int:
    """``sandbox status``: print what runs; 0 only when everything is up."""
    from decnet.sandbox.control import status

    report = await status(reactor, layout)
    if as_json:
        output.print_json(sandbox_view.status_json(report))
    else:
        _print(sandbox_view.status_lines(report))
    return 0 if report.healthy else 1


async def down_command(reactor: ISandboxReactor, layout: SandboxLayout) -> int:
    """``sandbox down``: stop it, saying what it does; 0 once nothing of it runs."""
    from decnet.sandbox.control import down

    report = await down(reactor, layout, SandboxConsole().show)
    _print(sandbox_view.down_lines(report))
    return 1 if report.still_running else 0


async def poke_command(
    reactor: ISandboxReactor,
    layout: SandboxLayout,
    *,
    only: list[str] | None,
    wait: float,
    as_json: bool,
) -> int:
    """``sandbox poke``: each outcome as it ends, then the summary; 0 when all arrived right."""
    from decnet.sandbox.poke import poke

    progress = ignore if as_json else SandboxConsole().show
    report = await poke(reactor, layout, progress, only=only, wait=wait)
    if as_json:
        output.print_json(sandbox_view.poke_json(report))
    else:
        _print(sandbox_view.poke_lines(report))
    return 0 if report.ok else 1


def cmd_status(args: argparse.Namespace) -> int:
    layout = SandboxLayout.at(args.dir)
    return run_async(lambda reactor: status_command(reactor, layout, args.json))


def cmd_down(args: argparse.Namespace) -> int:
    layout = SandboxLayout.at(args.dir)
    return run_async(lambda reactor: down_command(reactor, layout))


def cmd_poke(args: argparse.Namespace) -> int:
    layout = SandboxLayout.at(args.dir)
    return run_async(
        lambda reactor: poke_command(
            reactor, layout, only=args.worker, wait=args.wait, as_json=args.json
        )
    )


def _lock(layout: SandboxLayout, doc: dict | None) -> int:
    """Hold DIR's lock for the life of this process; refuse when another ``up`` holds it."""
    fd = os.open(layout.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        up = state.up_record(doc) if doc else None
        who = f" (pid {up.pid})" if up else ""
        raise SandboxError(
            f"a `sandbox up` already runs in {layout.root}{who}; "
            "see `decnet-admin sandbox status` or stop it with `decnet-admin sandbox down`"
        ) from None
    return fd


def _net_of(layout: SandboxLayout, doc: dict | None, asked: int | None) -> int:
    """``--net``, else the one DIR was made with, else the default; never a second one."""
    recorded = doc.get("net") if doc else None
    if recorded is not None and asked is not None and asked != recorded:
        raise ValidationError(
            f"{layout.root} was set up with --net {recorded}; use it again or a new --dir"
        )
    return asked or recorded or config.SANDBOX_DEFAULT_NET


def _source_tree() -> Path:
    """The checkout DECNET runs from: ``up`` releases it to its workers."""
    from decnet.cli.updates import default_root

    root = default_root()
    if not (root / "setup.cfg").is_file():
        raise SandboxError(
            f"sandbox up releases the source tree DECNET runs from, but {root} is not one "
            "(install DECNET from a checkout: pip install -e .)"
        )
    return root


def _wheelhouse(given: str | None) -> Path | None:
    wheels = Path(given).absolute() if given else None
    if wheels is not None and not wheels.is_dir():
        raise ValidationError(f"--wheelhouse {given} is not a directory")
    return wheels


def _refuse_leftovers(doc: dict | None, directory: str) -> None:
    """Processes of an earlier ``up`` that still run must be stopped first."""
    leftovers = [n for n, r in state.processes(doc).items() if state.is_running(r)] if doc else []
    if leftovers:
        raise SandboxError(
            f"processes of an earlier `sandbox up` still run ({', '.join(sorted(leftovers))}); "
            f"stop them with `decnet-admin sandbox down --dir {directory}` first"
        )


# Written into every sandbox directory: it holds a CA key, worker keys and live state,
# which git must never pick up, whatever the directory is called (``--dir state3``).
SELF_IGNORE = b"# made by `decnet-admin sandbox up`: keys and state, never to be committed\n*\n"


def _ignore_in_git(root: Path) -> None:
    """``DIR/.gitignore`` with ``*``: the directory ignores itself (as venvs and caches do)."""
    try:
        write_new_file(root / ".gitignore", SELF_IGNORE)
    except FileExistsError:
        pass


def cmd_up(args: argparse.Namespace) -> int:
    layout = SandboxLayout.at(args.dir)
    ensure_private_dir(layout.root)
    _ignore_in_git(layout.root)
    doc = state.load(layout.state_file)
    net = _net_of(layout, doc, args.net)
    sandbox_layout.validate(args.workers, net)
    root = _source_tree()
    wheels = _wheelhouse(args.wheelhouse)
    lock = _lock(layout, doc)
    try:
        _refuse_leftovers(doc, args.dir)
        return _run_up(layout, args.workers, net, root, wheels)
    finally:
        os.close(lock)


def _stop(reactor: ISandboxReactor) -> None:
    from twisted.internet.error import ReactorNotRunning

    try:
        reactor.stop()
    except ReactorNotRunning:
        pass  # already stopping (a second signal)


def _log_to(log_file: IO[str]) -> None:
    """Twisted's log to ``log_file`` (``DIR/logs/sandbox.log``), minus the chatter."""
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        PredicateResult,
        globalLogBeginner,
        textFileLogObserver,
    )

    def quiet(event: dict) -> PredicateResult:
        # Every short-lived HTTP connection logs "Starting/Stopping factory".
        chatty = event.get("log_namespace", "").startswith("twisted.web.client")
        if chatty and event.get("log_level") == LogLevel.info:
            return PredicateResult.no
        return PredicateResult.maybe

    predicate = cast(ILogFilterPredicate, quiet)  # a function provides it (Twisted's docs)
    observer: ILogObserver = FilteringLogObserver(textFileLogObserver(log_file), [predicate])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def _run_up(layout: SandboxLayout, workers: int, net: int, root: Path, wheels: Path | None) -> int:
    from decnet.sandbox.up import Sandbox

    ensure_private_dir(layout.logs_dir)
    with open(layout.log("sandbox"), "a") as log_file:  # open for the life of the run
        _log_to(log_file)
        console = SandboxConsole(sys.stdout)

        async def start(reactor: ISandboxReactor) -> int:
            sandbox = Sandbox(
                reactor,
                layout,
                workers=workers,
                net=net,
                root=root,
                wheelhouse_dir=wheels,
                report=console.show,
            )
            return await _up(reactor, sandbox, console)

        return run_async(start)


def _failed(sandbox, message: str) -> int:
    """``up`` failed: say why at once (before it stops its children), exit 1."""
    if sandbox.stopping:  # Ctrl-C while starting: not a failure
        return 0
    output.error(message)
    sys.stderr.flush()
    return 1


async def _up(reactor: ISandboxReactor, sandbox, console: SandboxConsole) -> int:
    """Start everything, then watch until SIGINT / SIGTERM / SIGHUP stops the reactor."""
    from decnet.sandbox.live import LiveView

    reactor.addSystemEventTrigger(
        "before", "shutdown", lambda: defer.ensureDeferred(sandbox.shutdown())
    )
    # SIGINT and SIGTERM already stop the reactor; a closed terminal (SIGHUP) too.
    signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(_stop, reactor))
    try:
        await sandbox.run()
    except DecnetError as exc:
        return _failed(sandbox, str(exc))
    except Exception:
        if not sandbox.stopping:
            sandbox.log.failure("sandbox up failed")
        return _failed(sandbox, f"internal error; see {sandbox.layout.log('sandbox')}")
    live = LiveView(
        reactor, console.show, sandbox.layout, sandbox.prepared.identity, sandbox.doc["workers"]
    )
    sandbox.live = live
    await live.start()
    stopped: defer.Deferred[None] = defer.Deferred()
    reactor.addSystemEventTrigger("before", "shutdown", stopped.callback, None)
    await stopped  # SIGINT / SIGTERM / SIGHUP: the normal way to end `up`, not an interruption
    return 0
