"""The group commit (decnet.groupcommit): the pure bookkeeping under random schedules,
and the Deferred driver with writes that finish when the test says so."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from twisted.internet import defer

from decnet.groupcommit import Batch, Committer, GroupCommit


class GroupCommitSchedules(RuleBasedStateMachine):
    """Random adds, waits, takes, successes, retried and dropped failures, and give-ups.

    The model: item ``i`` is the integer ``i`` (its ticket); a waiter is the
    ticket it must see finished.
    """

    def __init__(self):
        super().__init__()
        self.queue: GroupCommit[int, int] = GroupCommit()
        self.sizes: dict[int, int] = {}
        self.waiting: list[int] = []  # items not in a batch, in the order they must be written
        self.flight: Batch[int] | None = None
        self.finished: list[int] = []  # items written or dropped, in that order
        self.waiters: dict[int, int] = {}  # waiter id -> the newest ticket when it waited
        self.told: list[int] = []
        self.next_waiter = 0

    @rule(size=st.integers(0, 100))
    def add(self, size):
        ticket = self.queue.add(len(self.sizes) + 1, size)
        assert ticket == len(self.sizes) + 1
        self.sizes[ticket] = size
        self.waiting.append(ticket)

    @rule()
    def wait(self):
        waiter = self.next_waiter
        self.next_waiter += 1
        stored = self.queue.wait(waiter)
        everything_finished = len(self.finished) == len(self.sizes)
        assert stored == (not everything_finished)
        if stored:
            self.waiters[waiter] = len(self.sizes)

    @rule()
    def take(self):
        batch = self.queue.take()
        if self.flight is not None or not self.waiting:
            assert batch is None
            return
        # Everything that waits, in order, in one batch.
        assert batch is not None and list(batch.items) == self.waiting
        assert batch.last == max(self.waiting)
        self.flight, self.waiting = batch, []

    def _told(self, told):
        for waiter in told:
            assert waiter in self.waiters, "told twice, or never waited"
            assert self.waiters.pop(waiter) <= len(self.finished)
        self.told += told
        # Nobody still waiting could have been told.
        assert all(target > len(self.finished) for target in self.waiters.values())

    @precondition(lambda self: self.flight is not None)
    @rule()
    def done(self):
        self.finished += self.flight.items
        self.flight = None
        self._told(self.queue.done())

    @precondition(lambda self: self.flight is not None)
    @rule(retry=st.booleans())
    def fail(self, retry):
        told = self.queue.failed(retry=retry)
        if retry:
            assert told == []
            self.waiting = list(self.flight.items) + self.waiting
        else:
            self.finished += self.flight.items
        self.flight = None
        self._told(told)

    @rule()
    def abandon(self):
        told = self.queue.abandon()
        assert sorted(told) == sorted(self.waiters)
        assert told == sorted(told)  # oldest first
        self.finished += sorted((self.flight.items if self.flight else ()) + tuple(self.waiting))
        self.finished.sort()
        self.waiters, self.waiting, self.flight = {}, [], None

    @invariant()
    def bookkeeping_matches(self):
        queue = self.queue
        assert (queue.in_flight is None) == (self.flight is None)
        assert queue.pending == len(self.waiting)
        assert queue.pending_size == sum(self.sizes[t] for t in self.waiting)
        # Each item finishes exactly once, in the order it was added.
        assert self.finished == list(range(1, len(self.finished) + 1))
        assert queue.finished == len(self.finished)
        assert queue.settled == (len(self.finished) == len(self.sizes))


TestGroupCommitSchedules = GroupCommitSchedules.TestCase
TestGroupCommitSchedules.settings = settings(max_examples=150, stateful_step_count=40)


def test_done_without_a_batch_in_flight_is_a_programming_error():
    queue: GroupCommit[str, None] = GroupCommit()
    queue.add("a")
    with pytest.raises(RuntimeError):
        queue.done()


# -- the Deferred driver -------------------------------------------------------


class Writes:
    """A ``write`` whose Deferreds the test fires, one per batch."""

    def __init__(self):
        self.batches: list[Batch] = []
        self.results: list[defer.Deferred] = []

    def __call__(self, batch):
        self.batches.append(batch)
        d = defer.Deferred()
        self.results.append(d)
        return d


def committer(writes, *, on_failure=None, running=True):
    committed, failures = [], []

    def failed(batch, failure):
        failures.append((batch.items, failure.getErrorMessage()))
        return on_failure

    c = Committer(writes, committed=committed.append, failed=failed, running=running)
    return c, committed, failures


def test_one_write_in_flight_and_everything_that_arrives_meanwhile_goes_in_the_next():
    writes = Writes()
    c, committed, _ = committer(writes)
    c.add("a", 1)
    c.add("b", 2)
    c.add("c", 3)
    assert [b.items for b in writes.batches] == [("a",)]
    assert c.queue.pending_size == 5
    writes.results[0].callback(None)
    assert [b.items for b in writes.batches] == [("a",), ("b", "c")]
    assert [b.items for b in committed] == [("a",)]
    writes.results[1].callback(None)
    assert [b.items for b in committed] == [("a",), ("b", "c")]
    assert c.queue.settled


def test_a_flush_fires_once_everything_added_before_it_is_written_and_not_before():
    writes = Writes()
    c, _, _ = committer(writes)
    c.add("a")
    early = c.flush()
    c.add("b")
    late = c.flush()
    writes.results[0].callback(None)
    assert early.called and not late.called
    writes.results[1].callback(None)
    assert late.called
    assert c.flush().called  # nothing left: fires at once


def test_a_dropped_batch_tells_its_waiters_and_the_next_batch_goes_on():
    writes = Writes()
    c, committed, failures = committer(writes, on_failure=None)
    c.add("a")
    waiter = c.flush()
    c.add("b")
    writes.results[0].errback(OSError("disk full"))
    assert failures == [(("a",), "disk full")]
    assert waiter.called
    assert [b.items for b in writes.batches] == [("a",), ("b",)]
    writes.results[1].callback(None)
    assert [b.items for b in committed] == [("b",)]


def test_a_failure_that_stops_the_committer_fails_every_waiter_now_and_later():
    writes = Writes()
    stop = OSError("the disk is gone")
    c, _, _ = committer(writes, on_failure=stop)
    c.add("a")
    first = c.flush()
    c.add("b")
    second = c.flush()
    writes.results[0].errback(OSError("EIO"))
    errors: list = []
    for d in (first, second, c.flush()):
        d.addErrback(lambda f: errors.append(f.value))
    assert errors == [stop, stop, stop]
    c.add("c")  # ignored: nothing more is written
    assert len(writes.batches) == 1


def test_a_paused_committer_queues_until_it_starts():
    writes = Writes()
    c, _, _ = committer(writes, running=False)
    c.add("a")
    c.add("b")
    waiter = c.flush()
    assert writes.batches == []
    c.start()
    assert [b.items for b in writes.batches] == [("a", "b")]
    writes.results[0].callback(None)
    assert waiter.called


def test_a_write_that_raises_at_once_is_a_failed_batch():
    c, committed, failures = committer(lambda batch: 1 / 0)
    c.add("a")
    assert failures and failures[0][0] == ("a",)
    assert committed == []
    assert c.queue.settled


def _open(writes):
    return [d for d in writes.results if not d.called]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(["add", "flush", "ok", "fail"]), max_size=60))
def test_the_committer_writes_each_item_once_in_order_and_fires_each_flush_on_time(steps):
    writes = Writes()
    c, committed, failures = committer(writes)  # a failed batch is dropped
    added = 0
    flushes: list[tuple[defer.Deferred, int]] = []
    for step in steps:
        if step == "add":
            added += 1
            c.add(added)
        elif step == "flush":
            flushes.append((c.flush(), added))
        elif _open(writes):
            d = _open(writes)[0]
            d.callback(None) if step == "ok" else d.errback(OSError("EIO"))
        assert len(_open(writes)) <= 1
        done = [b for b, d in zip(writes.batches, writes.results, strict=True) if d.called]
        finished = done[-1].last if done else 0
        for d, target in flushes:
            assert d.called == (target <= finished)
    while _open(writes):
        _open(writes)[0].callback(None)
    assert [i for b in writes.batches for i in b.items] == list(range(1, added + 1))
    assert len(committed) + len(failures) == len(writes.batches)
    assert all(d.called for d, _ in flushes)
