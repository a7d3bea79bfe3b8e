"""The stream sinks' group commit (decnet.listener.ingest), with commits that finish
when the test says so: one commit in flight per stream, the rest merged, a
failed commit breaks only its own stream."""

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from decnet.listener import storage
from decnet.listener.ingest import Ingest


class ManualRun:
    """A runner whose blocking calls run when :meth:`finish` says so, in order."""

    def __init__(self):
        self.jobs: list[tuple] = []

    def __call__(self, f, *args):
        d = defer.Deferred()
        self.jobs.append((f, args, d))
        return d

    def names(self) -> list[str]:
        return [f.__name__ for f, _, _ in self.jobs]

    def finish(self, name: str, error: Exception | None = None):
        i = self.names().index(name)
        f, args, d = self.jobs.pop(i)
        if error is not None:
            d.errback(error)
        else:
            d.callback(f(*args))
        return args

    def settle(self) -> None:
        while self.jobs:
            self.finish(self.names()[0])


@pytest.fixture
def rig(tmp_path):
    run = ManualRun()
    ingest = Ingest(tmp_path, Clock(), run)
    ingest.prepare()
    sinks = {}
    for stream in ("a", "b"):
        d = ingest.sink_for("w1", stream)
        run.settle()
        sinks[stream] = d.result
    return run, ingest, sinks


def test_one_commit_in_flight_and_what_arrives_meanwhile_is_one_more(rig):
    run, _, sinks = rig
    sink = sinks["a"]
    acks: list[int] = []
    sink.commit_listeners.append(acks.append)
    sink.accept(0, 4, b"one\n")
    sink.accept(4, 8, b"two\n")
    sink.accept_gap(8, 20)
    sink.accept(20, 26, b"three\n")
    assert run.names() == ["commit"]
    assert sink.pending_bytes == 10
    data, records = run.finish("commit")
    assert data == b"one\n" and [(r.mirror_end, r.stream_end) for r in records] == [(4, 4)]
    assert acks == [4] and run.names() == ["commit"]
    data, records = run.finish("commit")
    # The gap is recorded where it stands: after "two", before "three".
    assert data == b"two\nthree\n"
    assert [(r.mirror_end, r.stream_end) for r in records] == [(8, 20), (14, 26)]
    assert acks == [4, 26] and sink.pending_bytes == 0


def test_a_failed_commit_breaks_its_stream_fails_every_waiter_and_spares_the_others(rig):
    run, ingest, sinks = rig
    sink, other = sinks["a"], sinks["b"]
    broke: list[str] = []
    sink.failure_listeners.append(broke.append)
    sink.accept(0, 4, b"one\n")
    first = sink.when_flushed()
    sink.accept(4, 8, b"two\n")
    second = sink.when_flushed()
    other.accept(0, 4, b"xyz\n")
    run.finish("commit", OSError("EIO"))
    assert broke == ["commit failed: EIO"]
    errors: list = []
    for d in (first, second, sink.when_flushed()):
        d.addErrback(lambda f: errors.append(f.trap(storage.IngestCorrupt)))
    assert errors == [storage.IngestCorrupt] * 3
    assert sink not in ingest.sinks()
    sink.accept(8, 12, b"new\n")  # nothing more is committed for a broken stream
    assert run.names().count("commit") == 1
    run.settle()
    flushed = other.when_flushed()
    assert flushed.result == 4
