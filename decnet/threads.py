"""Blocking calls off the reactor: the one way to run them in a thread.

SQLite, fsync, hashing, tar and file reads block; daemons never run them on
the reactor thread.  Code that needs it takes a *runner*: a callable
``run(f, *args, **kwargs)`` that returns a Deferred firing with ``f``'s
result (or its failure).  There are three:

* :func:`pool_runner`: the reactor's thread pool (calls may overlap);
* :func:`serial_runner`: a lane over that pool, one call at a time, in the
  order they were asked for (a tailer, a journal, an append-only file);
* :func:`inline_runner`: the call, now, on the calling thread (tests with a
  ``Clock`` or ``MemoryReactorClock``, which have no threads).

:func:`run_in_pool` is the one-shot form of :func:`pool_runner`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from twisted.internet import defer
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool

T = TypeVar("T")


class Runner(Protocol):
    """Runs ``f(*args, **kwargs)`` somewhere; the Deferred fires with its result."""

    def __call__(self, f: Callable[..., Any], /, *args: Any, **kwargs: Any) -> defer.Deferred: ...


def run_in_pool(
    reactor: IReactorThreads, f: Callable[..., T], /, *args: Any, **kwargs: Any
) -> defer.Deferred[T]:
    """``f(*args, **kwargs)`` in the reactor's thread pool."""
    return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args, **kwargs)


def pool_runner(reactor: IReactorThreads) -> Runner:
    """A runner for the reactor's thread pool (calls may run at the same time)."""

    def run(f: Callable[..., Any], /, *args: Any, **kwargs: Any) -> defer.Deferred:
        return run_in_pool(reactor, f, *args, **kwargs)

    return run


def serial_runner(reactor: IReactorThreads | None = None, *, run: Runner | None = None) -> Runner:
    """A lane: calls run one at a time, each after the previous one finished, in order.

    Over the reactor's thread pool, or over ``run`` (``inline_runner`` in tests).
    A call that fails does not stop the lane; its Deferred carries the failure.
    """
    if run is None:
        if reactor is None:
            raise TypeError("serial_runner needs a reactor or a runner")
        run = pool_runner(reactor)
    lock = defer.DeferredLock()
    base = run

    def serial(f: Callable[..., Any], /, *args: Any, **kwargs: Any) -> defer.Deferred:
        return lock.run(base, f, *args, **kwargs)

    return serial


def inline_runner(f: Callable[..., Any], /, *args: Any, **kwargs: Any) -> defer.Deferred:
    """``f(*args, **kwargs)`` now, on this thread: for tests without a real reactor."""
    return defer.maybeDeferred(f, *args, **kwargs)
