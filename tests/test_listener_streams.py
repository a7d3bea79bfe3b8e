"""A worker's streams are bounded, and so are the descriptors they hold.

``--max-streams-per-worker`` counts the streams on disk plus new ones (a HELLO
for one more gets ERROR); ``--max-open-streams`` bounds the stream files kept
open, in the listener and in the feed process: the least recently used are
closed and reopened transparently by their next use.
"""

import os
import random
import sys
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.python.failure import Failure

from decnet import config, pki
from decnet.listener import ingest, storage
from decnet.listener.feed import FeedBuilder, read_feed
from decnet.listener.feedproc import FeedProcess
from decnet.listener.service import ListenerService
from decnet.master import enrollment
from decnet.revocation import RevocationSet
from decnet.syslog import ackproto
from decnet.syslog.ackproto import Ack, Error, Resume
from decnet.tls import PolicyOptions, TLSIdentity
from tests.logpipe_support import MASTER_ONLY, ClientApp, ListenerHarness, LogCapture, syslog_line
from tests.support import eventually, write_identity


@pytest.fixture(scope="module")
def ids(ca, tmp_path_factory):
    d = tmp_path_factory.mktemp("stream-ids")
    return {
        "master": write_identity(d / "m", ca, "master"),
        "w1": write_identity(d / "w1", ca, "worker", "w1"),
        "w2": write_identity(d / "w2", ca, "worker", "w2"),
    }


def open_fds_under(directory: Path, pid: int | str = "self") -> int:
    """Descriptors of process ``pid`` open on files under ``directory``."""
    fd_dir = Path(f"/proc/{pid}/fd")
    count = 0
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(fd_dir / fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith(str(directory) + os.sep):
            count += 1
    return count


def body(stream: str, first: int, n: int) -> bytes:
    return b"".join(syslog_line(i, host=stream) + b"\n" for i in range(first, first + n))


def send(app, pump, start: int, data: bytes) -> int:
    app.send(ackproto.encode_data(start, start + len(data), data))
    pump.flush()
    return start + len(data)


# -- the cap ----------------------------------------------------------------------


def test_a_hello_for_one_stream_over_the_cap_gets_error_and_the_others_stay_usable(tmp_path, ids):
    harness = ListenerHarness(tmp_path / "ingest", ids["master"])
    harness.ingest.max_streams_per_worker = 3
    for n in range(3):
        app, _ = harness.hello(ids["w1"], f"s{n}")
        assert app.messages == [Resume(0)]
    with LogCapture() as logs:
        extra, _ = harness.hello(ids["w1"], "s3")
    assert isinstance(extra.messages[-1], Error)
    assert "--max-streams-per-worker" in extra.messages[-1].reason
    assert extra.lost_reason is not None
    assert len(logs.events) == 1 and "already has 3 streams" in logs.text()
    assert not (tmp_path / "ingest" / "w1" / "s3.log").exists()
    # The worker's existing streams and another worker's new ones are unaffected.
    again, pump = harness.hello(ids["w1"], "s1")
    assert again.messages == [Resume(0)]
    assert again.messages[-1] == Resume(0) and send(again, pump, 0, b"x\n") == 2
    assert again.messages[-1] == Ack(2)
    other, _ = harness.hello(ids["w2"], "s3")
    assert other.messages == [Resume(0)]


def test_streams_on_disk_count_after_a_restart_and_all_stay_usable_above_a_lowered_cap(
    tmp_path, ids
):
    first = ListenerHarness(tmp_path / "ingest", ids["master"])
    ends = {}
    for n in range(5):
        app, pump = first.hello(ids["w1"], f"s{n}")
        ends[n] = send(app, pump, 0, body(f"s{n}", 0, 3))
        assert app.messages[-1] == Ack(ends[n])
    # A new listener on the same directory, with the cap lowered below what exists.
    second = ListenerHarness(tmp_path / "ingest", ids["master"])
    second.ingest.max_streams_per_worker = 2
    for n in range(5):
        app, pump = second.hello(ids["w1"], f"s{n}")
        assert app.messages == [Resume(ends[n])]
        end = send(app, pump, ends[n], body(f"s{n}", 3, 2))
        assert app.messages[-1] == Ack(end)
        assert second.mirror("w1", f"s{n}") == body(f"s{n}", 0, 5)
    refused, _ = second.hello(ids["w1"], "s5")
    assert isinstance(refused.messages[-1], Error)
    assert "already has 5 streams" in refused.messages[-1].reason


def test_two_hellos_racing_for_the_last_stream_place_cannot_both_get_it(tmp_path, ids):
    harness = ListenerHarness(tmp_path / "ingest", ids["master"])
    harness.ingest.max_streams_per_worker = 1
    a = harness.ingest.sink_for("w1", "a")
    b = harness.ingest.sink_for("w1", "b")
    got = []
    a.addBoth(got.append)
    b.addBoth(got.append)
    assert len(got) == 2
    assert isinstance(got[0], ingest.StreamSink) and got[0].stream == "a"
    assert isinstance(got[1], Failure) and got[1].check(ingest.TooManyStreams)


# -- bounded descriptors: the listener ---------------------------------------------


def test_idle_stream_files_are_closed_least_recently_used_first_and_reopened_on_use(tmp_path, ids):
    ingest_dir = tmp_path / "ingest"
    harness = ListenerHarness(ingest_dir, ids["master"])
    harness.ingest.max_streams_per_worker = 100
    harness.ingest.max_open_streams = 3
    harness.ingest.feeds.builder.max_open = 3
    before = open_fds_under(ingest_dir)
    conns, ends = {}, {}
    for n in range(12):
        app, pump = harness.hello(ids["w1"], f"s{n}")
        conns[n] = (app, pump)
        ends[n] = send(app, pump, 0, body(f"s{n}", 0, 4))
        assert app.messages[-1] == Ack(ends[n])
        # Listener files (mirror, index) and feed files (feed, position), 3 streams each.
        assert open_fds_under(ingest_dir) - before <= 2 * 3 + 2 * 3
    assert harness.ingest.open_streams() == 3
    assert sum(s.files.is_open for s in harness.ingest.sinks()) == 3
    # s0 was closed long ago: its next batch reopens it, in place, exactly once.
    app, pump = conns[0]
    end = send(app, pump, ends[0], body("s0", 4, 6))
    assert app.messages[-1] == Ack(end)
    sink = next(s for s in harness.ingest.sinks() if s.stream == "s0")
    assert sink.files.reopens == 1 and sink.files.is_open
    assert harness.mirror("w1", "s0") == body("s0", 0, 10)
    feed = read_feed(ingest_dir / "w1" / "s0.jsonl")
    assert [e["msg"] for e in feed] == [f"attempt {i}" for i in range(10)]
    assert [e["mirror_offset"] for e in feed] == [len(body("s0", 0, i)) for i in range(10)]
    assert open_fds_under(ingest_dir) - before <= 2 * 3 + 2 * 3


def test_a_closed_stream_whose_mirror_changed_meanwhile_is_refused_not_appended(tmp_path, ids):
    ingest_dir = tmp_path / "ingest"
    harness = ListenerHarness(ingest_dir, ids["master"])
    harness.ingest.max_open_streams = 1
    a, pa = harness.hello(ids["w1"], "a")
    end = send(a, pa, 0, b"one\ntwo\n")
    b, pb = harness.hello(ids["w1"], "b")
    send(b, pb, 0, b"other\n")  # closes a's files
    mirror = ingest_dir / "w1" / "a.log"
    mirror.write_bytes(b"one\n")  # cut by hand while closed
    with LogCapture() as logs:
        send(a, pa, end, b"three\n")
    assert not any(isinstance(m, Ack) and m.offset > end for m in a.messages)
    assert a.lost_reason is not None
    assert "changed while the listener had them closed" in logs.text()
    assert mirror.read_bytes() == b"one\n"


# -- bounded descriptors: the feed process -----------------------------------------


def _write_streams(ingest_dir: Path, worker: str, count: int, lines: int) -> dict[str, int]:
    ends = {}
    for n in range(count):
        files = storage.StreamFiles(ingest_dir / worker, f"s{n}")
        files.open()
        data = body(f"s{n}", 0, lines)
        files.commit(data, [storage.IndexRecord(len(data), len(data), 1_700_000_000_000_000)])
        files.close()
        ends[f"s{n}"] = len(data)
    return ends


def test_the_feed_builder_keeps_at_most_max_open_feeds_open_and_reopens_them_when_behind(
    tmp_path,
):
    ingest_dir = tmp_path / "ingest"
    ends = _write_streams(ingest_dir, "w1", 10, 5)
    reports = []
    builder = FeedBuilder(ingest_dir, reports.append)
    builder.max_open = 3
    for stream, end in ends.items():
        builder.target("w1", stream, end)
    while builder.step():
        assert open_fds_under(ingest_dir) <= 2 * 3
    assert builder.open_feeds() == 3 and builder.closed_idle == 7
    assert not builder.has_work(), "a caught-up feed is not reopened"
    for stream in ends:
        assert len(read_feed(ingest_dir / "w1" / f"{stream}.jsonl")) == 5
    # More mirror for a closed feed: reopened at its durable position, nothing twice.
    files = storage.StreamFiles(ingest_dir / "w1", "s0")
    files.open()
    more = body("s0", 5, 3)
    end = ends["s0"] + len(more)
    files.commit(more, [storage.IndexRecord(end, end, 1_700_000_000_000_000)])
    files.close()
    builder.target("w1", "s0", end)
    while builder.step():
        pass
    feed = read_feed(ingest_dir / "w1" / "s0.jsonl")
    assert [e["msg"] for e in feed] == [f"attempt {i}" for i in range(8)]
    assert not [r for r in reports if "warn" in r or "error" in r]
    builder.close()


@pytest_twisted.ensureDeferred
async def test_the_feed_process_holds_at_most_max_open_feeds_whatever_the_stream_count(
    tmp_path,
):
    """The real child process (``--max-open`` on its command line), 12 streams, 2 open."""
    ingest_dir = tmp_path / "ingest"
    ends = _write_streams(ingest_dir, "w1", 12, 4)
    feeds = FeedProcess(reactor, ingest_dir, encoders=1, executable=sys.executable)
    feeds.max_open = 2
    feeds.start()
    peak = 0
    try:
        for stream, end in ends.items():
            feeds.notify("w1", stream, end)

        def done():
            nonlocal peak
            pid = feeds.supervisor.pid
            if pid:
                peak = max(peak, open_fds_under(ingest_dir, pid))
            return all(feeds.positions.get(("w1", s)) == e for s, e in ends.items())

        await eventually(done, 30, what="every feed to catch up")
        # Two open feeds (feed, position), plus the mirror and index a step reads.
        assert peak <= 2 * 2 + 2
        for stream in ends:
            assert len(read_feed(ingest_dir / "w1" / f"{stream}.jsonl")) == 4
    finally:
        await feeds.close()


class _HelloClient(ClientApp):
    def __init__(self):
        super().__init__()
        self.answered: defer.Deferred = defer.Deferred()
        self.gone: defer.Deferred = defer.Deferred()

    def dataReceived(self, data):
        super().dataReceived(data)
        if self.messages and not self.answered.called:
            self.answered.callback(self.messages[0])

    def connectionLost(self, reason):
        super().connectionLost(reason)
        if not self.answered.called:
            self.answered.callback(None)
        self.gone.callback(None)


@pytest_twisted.ensureDeferred
async def test_a_refused_hellos_connection_is_released_when_the_worker_closes_not_after_a_grace(
    master_home, tmp_path
):
    """Over real sockets: a paused connection would not see the worker's close for 5 s,
    and 16 refused HELLOs would then lock the worker out of its own connection cap."""
    name = f"streams-{os.getpid()}-{random.randrange(10**6)}"
    enrollment.enroll(enrollment.load_master(master_home), name, "127.0.0.1", tmp_path / "b")
    identity = TLSIdentity.from_bundle(pki.WorkerBundle.load(tmp_path / "b"), "worker")
    listener = ListenerService(
        reactor,
        identity=TLSIdentity.master(master_home),
        revocations=RevocationSet(master_home.revocations),
        ingest_dir=tmp_path / "ingest",
        listen="tcp:0:interface=127.0.0.1",
        max_streams_per_worker=1,
        feed=False,
    )
    listener.startService()
    port = listener.port_service.port.getHost().port
    options = PolicyOptions(identity, MASTER_ONLY, acceptable_protocols=[config.ACK_ALPN])
    answers = []
    try:
        for n in range(40):  # far more than --max-connections-per-worker (16)
            app = _HelloClient()
            endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", port))
            await connectProtocol(endpoint, app)
            app.send(ackproto.encode_hello(f"s{n}"))
            answers.append(await app.answered.addTimeout(30, reactor))
            app.transport.loseConnection()
            await app.gone.addTimeout(30, reactor)
    finally:
        await listener.stopService()
    assert answers[0] == Resume(0)
    refusals = answers[1:]
    assert all(isinstance(a, Error) for a in refusals), refusals
    assert all("--max-streams-per-worker" in a.reason for a in refusals)
