"""Running an asynchronous ``decnet-admin`` command under the reactor."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import defer, task


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
