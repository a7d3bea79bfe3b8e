"""How every ``decnet-admin`` command runs: the one reactor runner and the one error report.

* :func:`run_async` runs a command's asynchronous part under the reactor, once,
  and hands its exit code back, or re-raises its error once the reactor has
  stopped;
* :func:`report_failure` is how an expected failure (:class:`DecnetError`) reaches
  the operator, whichever command raised it: one escaped line per problem on
  stderr or, with ``--json``, one JSON object on stderr and (unless the command
  already printed its document) ``{"problems": [...]}`` on stdout;
* :func:`require_home` refuses a ``--home`` that ``init`` never set up;
* :func:`quiet_broken_pipe` ends a command whose reader went away (``| head``)
  without a traceback;
* :func:`budget` is what is left of a command's ``--timeout``, counted from when
  the command started (:data:`decnet.cli.STARTED`, the monotonic clock read once,
  before anything else of ``decnet-admin`` was imported).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

from twisted.internet import defer, task
from twisted.python.failure import Failure

from decnet import cli, config
from decnet.cli import output
from decnet.errors import ConfigError, DecnetError, ValidationError

MIN_BUDGET = 0.1  # seconds a request gets even when start-up used up the whole --timeout
INTERRUPTED = 130  # the exit code of a command stopped by SIGINT or SIGTERM (128 + SIGINT)
BROKEN_PIPE = 141  # the exit code of a command whose reader went away (128 + SIGPIPE)

Command = Callable[[Any], Coroutine[Any, Any, int | None]]


def budget(timeout: float, now: float | None = None) -> float:
    """What is left of ``timeout`` seconds counted from the command's start (``--timeout``).

    Every request of the command gets this as its one deadline, so the command
    ends within ``timeout`` of being started, whatever the hosts do.  ``now`` is
    a reading of ``time.monotonic()`` (the current one by default).
    """
    elapsed = (time.monotonic() if now is None else now) - cli.STARTED
    return max(MIN_BUDGET, timeout - elapsed)


def run_async(fn: Command) -> int:
    """Run ``await fn(reactor)`` under ``task.react``; return its int, re-raise its error.

    A command whose reactor is stopped before it ends (SIGINT, SIGTERM) returns
    :data:`INTERRUPTED`, so a script never takes an interrupted update for a done one.
    Its errors surface here, after the reactor stopped, for :func:`report_failure`
    (:func:`decnet.cli.main.main` does that for every command).
    """
    outcome: list[int | Failure] = []

    def main(reactor: Any) -> defer.Deferred[None]:
        d = defer.ensureDeferred(fn(reactor))
        return d.addBoth(lambda result: outcome.append(result or 0))

    # Ctrl-C (or kill -INT) stops every command, even one started from a shell that
    # ignores SIGINT for its background jobs: Twisted only handles a default SIGINT.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        task.react(main)
    except SystemExit:
        pass
    result = outcome[0] if outcome else INTERRUPTED
    if isinstance(result, Failure):
        failure = result
        while failure.check(defer.FirstError):
            # gatherResults wraps the first error of several hosts: the error is that one.
            failure = failure.value.subFailure
        failure.raiseException()
    return int(result)


def problems_of(error: DecnetError) -> list[str]:
    """What the operator is told about an expected failure: every problem, not just the first."""
    return list(error.problems) if isinstance(error, ValidationError) else [str(error)]


def report_failure(error: DecnetError, *, as_json: bool = False) -> int:
    """One escaped line per problem on stderr; with ``--json``, a JSON object on stderr and
    ``{"problems": [...]}`` on stdout (unless the command printed its document).  Returns 1."""
    problems = problems_of(error)
    if not as_json:
        for problem in problems:
            output.error(problem)
        return 1
    output.json_error(problems)
    if not output.printed_json():
        output.print_json({"problems": problems})
    return 1


def require_home(paths: config.MasterPaths) -> None:
    """Refuse a ``--home`` (or ``$DECNET_HOME``) that ``decnet-admin init`` never set up.

    Without this a typo in ``--home`` reads as an empty fleet ("No hosts enrolled
    yet", exit 0).  Every command but ``init`` (and the sandbox's, which use
    ``--dir``) calls it before it reads anything.
    """
    home = paths.home
    fix = (
        f"give the right --home (or ${config.ENV_HOME}), or create a master there with "
        f"`decnet-admin --home {home} init`"
    )
    try:
        if not home.is_dir():
            raise ConfigError(f"{home} does not exist or is not a directory; {fix}")
        missing = [p for p in (paths.ca_cert, paths.master_cert) if not p.is_file()]
    except PermissionError:
        raise ConfigError(
            f"cannot read {home}: permission denied (run decnet-admin as the user that owns it)"
        ) from None
    if missing:
        names = ", ".join(str(p.relative_to(home)) for p in missing)
        raise ConfigError(f"{home} is not an initialised DECNET master home (no {names}); {fix}")


def quiet_broken_pipe() -> int:
    """The reader of stdout went away (``decnet-admin status | head``): stop quietly.

    Later writes, and the interpreter's flush at exit, go to ``/dev/null`` instead of
    raising again.  Returns :data:`BROKEN_PIPE`, as a process killed by SIGPIPE would.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is not a file descriptor (tests capture it)
        pass
    return BROKEN_PIPE
