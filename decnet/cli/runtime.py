"""Running an asynchronous ``decnet-admin`` command under the reactor."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from twisted.internet import defer, task

from decnet import cli

MIN_BUDGET = 0.1  # seconds a request gets even when start-up used up the whole --timeout


def age() -> float:
    """Seconds since this process was started (``/proc``), interpreter start-up included.

    Without procfs: since ``decnet.cli`` was imported.
    """
    from decnet.sandbox.state import PROC, start_time

    ticks = start_time(os.getpid())
    try:
        uptime = float((PROC / "uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        uptime = None
    if ticks is None or uptime is None:
        return time.monotonic() - cli.STARTED
    return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))


def budget(timeout: float) -> float:
    """What is left of ``timeout`` seconds counted from the command's start (``--timeout``).

    Every request of the command gets this as its one deadline, so the command
    ends within ``timeout`` of being started, whatever the hosts do.
    """
    return max(MIN_BUDGET, timeout - age())


def run_async(fn: Callable) -> int:
    """Run ``await fn(reactor)`` under ``task.react``; return its int, re-raise its error."""
    outcome: dict = {}

    def main(reactor):
        d = defer.ensureDeferred(fn(reactor))
        d.addCallbacks(
            lambda code: outcome.__setitem__("code", code),
            lambda failure: outcome.__setitem__("failure", failure),
        )
        return d

    try:
        task.react(main)
    except SystemExit:
        pass
    if "failure" in outcome:
        outcome["failure"].raiseException()
    return int(outcome.get("code") or 0)
