"""How every ``decnet-admin`` command runs: the one reactor runner and the one error report.

* :func:`run_async` runs a command's asynchronous part under the reactor, once,
  and hands its exit code back, or re-raises its error once the reactor has
  stopped;
* :func:`report_failure` is how an expected failure (:class:`DecnetError`) reaches
  the operator, whichever command raised it: one escaped line per problem on
  stderr and, with ``--json``, ``{"problems": [...]}`` on stdout;
* :func:`budget` is what is left of a command's ``--timeout``, counted from when
  the command started (:data:`decnet.cli.STARTED`, the monotonic clock read once,
  before anything else of ``decnet-admin`` was imported).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from typing import Any

from twisted.internet import defer, task
from twisted.python.failure import Failure

from decnet import cli
from decnet.cli import output
from decnet.errors import DecnetError, ValidationError

MIN_BUDGET = 0.1  # seconds a request gets even when start-up used up the whole --timeout
INTERRUPTED = 130  # the exit code of a command stopped by SIGINT or SIGTERM (128 + SIGINT)

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

    try:
        task.react(main)
    except SystemExit:
        pass
    result = outcome[0] if outcome else INTERRUPTED
    if isinstance(result, Failure):
        result.raiseException()
    return int(result)


def problems_of(error: DecnetError) -> list[str]:
    """What the operator is told about an expected failure: every problem, not just the first."""
    return list(error.problems) if isinstance(error, ValidationError) else [str(error)]


def report_failure(error: DecnetError, *, as_json: bool = False) -> int:
    """One escaped line per problem on stderr; with ``--json``, stdout is still JSON.  Returns 1."""
    problems = problems_of(error)
    for problem in problems:
        output.error(problem)
    if as_json:
        output.print_json({"problems": problems})
    return 1
