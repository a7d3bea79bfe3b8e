"""Group commit: one write in flight, later work merged into the next, waiters told.

Every durable sink in DECNET works this way: the event log's appends, the
listener's per-stream commits, the forwarder's journal.  While one batch is
being made durable (an fsync, a SQLite transaction), whatever arrives waits;
when the batch is done, everything that waited goes into the next one, so the
rate of fsyncs follows the load instead of the number of items.

:class:`GroupCommit` is the bookkeeping, sans-IO: it never writes, it says
what to write.  Each item added gets a *ticket* (1, 2, 3, ... in the order of
:meth:`~GroupCommit.add`); a batch is every waiting item, in order; a waiter
registered with :meth:`~GroupCommit.wait` is told once every item added before
it is finished::

    queue.add(item)            # work arrives
    batch = queue.take()       # "start a batch now?": a Batch, or None
    ...                        # the caller makes batch.items durable
    told = queue.done()        # the waiters now satisfied; then take() again
    told = queue.failed(retry=True)   # or: the items wait again, at the front

:class:`Committer` drives one with Deferreds for the Twisted users: it hands
each batch to a ``write`` function (usually a thread lane) and fires the
Deferreds of :meth:`~Committer.flush`.  The forwarder's delivery core, which is
sans-IO itself, uses :class:`GroupCommit` directly.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Generic, TypeVar

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

W = TypeVar("W")  # one item of work
T = TypeVar("T")  # a waiter (opaque here: a Deferred, a callback, ...)


@attrs.frozen
class Batch(Generic[W]):
    """The items of one write, in the order they were added; ``last`` is the newest ticket."""

    items: tuple[W, ...]
    last: int


class GroupCommit(Generic[W, T]):
    """The bookkeeping of a group commit; see the module docstring.  Pure."""

    def __init__(self) -> None:
        self._waiting: list[tuple[int, W, int]] = []  # (ticket, item, size), oldest first
        self._flight: list[tuple[int, W, int]] = []
        self._waiters: collections.deque[tuple[int, T]] = collections.deque()
        self.in_flight: Batch[W] | None = None
        self.added = 0  # the newest ticket handed out
        self.finished = 0  # every ticket up to this one is finished (written, or dropped)
        self.pending_size = 0  # the sizes of the items not yet in a batch, summed

    @property
    def pending(self) -> int:
        """How many items wait for a batch."""
        return len(self._waiting)

    @property
    def settled(self) -> bool:
        """Nothing waits and nothing is in flight."""
        return self.finished >= self.added

    def add(self, item: W, size: int = 0) -> int:
        """Queue ``item`` (``size`` counts towards :attr:`pending_size`); its ticket."""
        self.added += 1
        self._waiting.append((self.added, item, size))
        self.pending_size += size
        return self.added

    def take(self) -> Batch[W] | None:
        """The batch to write now: every waiting item, unless a batch is in flight."""
        if self.in_flight is not None or not self._waiting:
            return None
        self._flight, self._waiting = self._waiting, []
        self.pending_size = 0
        self.in_flight = Batch(tuple(item for _, item, _ in self._flight), self._flight[-1][0])
        return self.in_flight

    def wait(self, waiter: T) -> bool:
        """Tell ``waiter`` (returned by a later call) once everything added so far is finished.

        Returns ``False``, and keeps nothing, when that is already so.
        """
        if self.settled:
            return False
        self._waiters.append((self.added, waiter))
        return True

    def done(self) -> list[T]:
        """The batch in flight is durable: the waiters this satisfies, oldest first."""
        return self._finish(self._land())

    def failed(self, *, retry: bool) -> list[T]:
        """The batch in flight failed.

        ``retry``: its items wait again, ahead of newer ones (a later batch
        writes them; their waiters keep waiting).  Otherwise they are dropped,
        and the waiters this finishes are returned, as for :meth:`done`.
        """
        batch = self._land()
        if not retry:
            return self._finish(batch)
        self._waiting[:0] = self._flight
        self.pending_size += sum(size for _, _, size in self._flight)
        self._flight = []
        return []

    def abandon(self) -> list[T]:
        """Give up: drop all work, waiting or in flight; every waiter, oldest first."""
        self._waiting, self._flight, self.in_flight = [], [], None
        self.pending_size = 0
        self.finished = self.added
        told = [waiter for _, waiter in self._waiters]
        self._waiters.clear()
        return told

    def _land(self) -> Batch[W]:
        batch = self.in_flight
        if batch is None:
            raise RuntimeError("no batch is in flight")
        self.in_flight = None
        return batch

    def _finish(self, batch: Batch[W]) -> list[T]:
        self._flight = []
        self.finished = batch.last
        told = []
        while self._waiters and self._waiters[0][0] <= self.finished:
            told.append(self._waiters.popleft()[1])
        return told


class Committer(Generic[W]):
    """A :class:`GroupCommit` run with Deferreds: one ``write(batch)`` at a time.

    * ``write(batch)`` makes the batch durable and returns a Deferred (it
      usually runs a blocking call through :mod:`decnet.threads`);
    * ``committed(batch)`` is called after each successful write, before the
      :meth:`flush` waiters it satisfies fire;
    * ``failed(batch, failure)`` after a failed one, and decides: ``None``
      drops the batch (its waiters fire, the next batch goes on); an
      exception stops the committer for good (every waiter, now and later,
      fails with it, and new work is ignored).

    A committer made with ``running=False`` queues work until :meth:`start`.
    """

    log = Logger()

    def __init__(
        self,
        write: Callable[[Batch[W]], defer.Deferred],
        *,
        committed: Callable[[Batch[W]], object],
        failed: Callable[[Batch[W], Failure], BaseException | None],
        running: bool = True,
    ) -> None:
        self.queue: GroupCommit[W, defer.Deferred] = GroupCommit()
        self._write = write
        self._committed = committed
        self._failed = failed
        self.running = running
        self.broken: BaseException | None = None

    def add(self, item: W, size: int = 0) -> None:
        """Queue ``item``; it is written in the next batch."""
        if self.broken is None:
            self.queue.add(item, size)
            self._kick()

    def start(self) -> None:
        """Begin (or resume) writing batches."""
        self.running = True
        self._kick()

    def pause(self) -> None:
        """Write no new batch until :meth:`start` (the one in flight finishes)."""
        self.running = False

    def flush(self) -> defer.Deferred[None]:
        """Fires once everything added so far is written (or dropped after a failure)."""
        if self.broken is not None:
            return defer.fail(self.broken)
        d: defer.Deferred[None] = defer.Deferred()
        return d if self.queue.wait(d) else defer.succeed(None)

    def _kick(self) -> None:
        if not self.running or self.broken is not None:
            return
        batch = self.queue.take()
        if batch is None:
            return
        d = defer.maybeDeferred(self._write, batch)
        d.addCallbacks(self._done, self._fail, callbackArgs=(batch,), errbackArgs=(batch,))
        d.addErrback(lambda f: self.log.failure("Group commit bookkeeping failed", f))

    def _done(self, _result: object, batch: Batch[W]) -> None:
        told = self.queue.done()
        self._committed(batch)
        for d in told:
            d.callback(None)
        self._kick()

    def _fail(self, failure: Failure, batch: Batch[W]) -> None:
        stop = self._failed(batch, failure)
        if stop is None:
            for d in self.queue.failed(retry=False):
                d.callback(None)
            self._kick()
            return
        self.broken = stop
        for d in self.queue.abandon():
            d.errback(stop)
