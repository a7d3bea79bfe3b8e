"""The listener's per-worker state: last seen, high-water marks, counters, STATUS, the file."""

import json
import os
import signal
import subprocess
import sys

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from decnet.listener import workers
from decnet.listener.workers import (
    StateFile,
    WorkerStates,
    _encode,
    log_health,
    read_state,
    state_path,
)
from decnet.syslog import ackproto
from decnet.syslog.ackproto import Ack, Error, Resume
from decnet.threads import inline_runner
from tests.logpipe_support import (
    ListenerHarness,
    LogCapture,
    enroll_worker,
    loopback_forwarder,
    loopback_listener,
    syslog_line,
)
from tests.support import eventually, write_identity

NOON = 1_795_000_000.0  # a fixed UTC moment (2026-11-18 10:13:20)


@pytest.fixture(scope="module")
def ids(ca, tmp_path_factory):
    d = tmp_path_factory.mktemp("stateids")
    return {
        "master": write_identity(d / "m", ca, "master"),
        "w1": write_identity(d / "w1", ca, "worker", "w1"),
    }


@pytest.fixture
def harness(tmp_path, ids):
    h = ListenerHarness(tmp_path / "ingest", ids["master"])
    h.clock.advance(NOON)
    h.ingest.commit_observers.append(h.factory.workers.on_commit)
    return h


def state(harness, worker="w1") -> dict:
    doc = harness.factory.workers.document(harness.clock.seconds())
    json.dumps(doc, allow_nan=False)  # always valid JSON
    return doc["workers"][worker]


def test_a_worker_is_recorded_connected_with_its_high_water_mark_lines_and_bytes(harness, ids):
    app, pump = harness.hello(ids["w1"])
    payload = b"one\ntwo\nthree\n"
    harness.clock.advance(5)
    app.send(ackproto.encode_data(0, len(payload), payload))
    pump.flush()
    w = state(harness)
    assert w["connected"] is True and w["connections"] == 1
    assert w["last_connected"] == NOON and w["last_data"] == NOON + 5
    assert (w["lines_today"], w["bytes_today"]) == (3, len(payload))
    assert w["streams"]["decnet"]["mode"] == "ack"
    assert w["streams"]["decnet"]["high_water"] == len(payload)
    assert w["lag"] is None  # no STATUS yet: unknown, not zero
    app.server.transport.loseConnection()
    pump.flush()
    w = state(harness)
    assert w["connected"] is False and w["last_disconnected"] == NOON + 5


def test_status_gives_the_exact_lag_and_is_never_acknowledged(harness, ids):
    app, pump = harness.hello(ids["w1"])
    app.send(ackproto.encode_data(0, 4, b"abc\n"))
    app.send(ackproto.encode_status(1004))
    pump.flush()
    assert app.messages == [Resume(0), Ack(4)]
    assert state(harness)["streams"]["decnet"]["lag"] == 1000
    assert state(harness)["lag"] == 1000
    app.send(ackproto.encode_data(4, 1004, b"x" * 999 + b"\n"))
    pump.flush()
    assert state(harness)["lag"] == 0


def test_plain_mode_has_no_status_so_its_lag_is_unknown(harness, ids):
    app, pump = harness.connect(ids["w1"], ack=False)
    app.send(syslog_line(1))
    pump.flush()
    w = state(harness)
    assert w["streams"]["syslog"]["mode"] == "plain" and w["lag"] is None
    assert w["lines_today"] == 1


def test_a_status_below_what_the_worker_sent_is_ignored_and_recorded_as_its_error(harness, ids):
    app, pump = harness.hello(ids["w1"])
    app.send(ackproto.encode_data(0, 10, b"123456789\n"))
    app.send(ackproto.encode_status(50))
    with LogCapture() as logs:
        for _ in range(3):
            app.send(ackproto.encode_status(3))
        pump.flush()
    w = state(harness)
    assert w["streams"]["decnet"]["reported_end"] == 50  # the last credible report stays
    assert "below what it sent (10)" in w["last_error"]
    assert len(logs.events) == 1  # once per connection, not once per lie
    app.send(ackproto.encode_data(10, 12, b"a\n"))  # the connection still serves
    pump.flush()
    assert app.messages[-1] == Ack(12) and app.lost_reason is None


def test_an_absurd_status_only_makes_that_workers_own_lag_absurd(harness, ids):
    app, pump = harness.hello(ids["w1"])
    app.send(ackproto.encode_status(ackproto.MAX_OFFSET))
    pump.flush()
    assert state(harness)["lag"] == ackproto.MAX_OFFSET
    assert app.lost_reason is None


@pytest.mark.parametrize("frame", [b"S -1", b"S 1 2", b"S", b"S 99999999999999999999"])
def test_a_malformed_status_closes_only_that_connection_and_keeps_earlier_data(harness, ids, frame):
    app, pump = harness.hello(ids["w1"])
    app.send(ackproto.encode_data(0, 4, b"abc\n"))
    with LogCapture():
        app.send(frame)
        pump.flush()
    assert isinstance(app.messages[-1], Error) and "protocol error" in app.messages[-1].reason
    assert harness.mirror("w1", "decnet") == b"abc\n"
    assert "protocol error" in state(harness)["last_error"]
    assert state(harness)["connected"] is False


def test_a_status_before_hello_is_refused(harness, ids):
    app, pump = harness.connect(ids["w1"])
    with LogCapture():
        app.send(ackproto.encode_status(5))
        pump.flush()
    assert isinstance(app.messages[-1], Error) and "unexpected STATUS" in app.messages[-1].reason


def test_a_refusal_after_the_handshake_is_the_workers_last_error(tmp_path, ids):
    harness = ListenerHarness(tmp_path / "ingest", ids["master"], max_per_worker=1)
    harness.hello(ids["w1"])
    with LogCapture():
        harness.hello(ids["w1"])
    w = harness.factory.workers.document(0)["workers"]["w1"]
    assert "--max-connections-per-worker" in w["last_error"]
    assert w["connections"] == 1


def test_the_counters_start_again_each_utc_day():
    states = WorkerStates()
    states.committed("w", "s", 10, 2, 10, now=NOON)
    states.committed("w", "s", 20, 3, 10, now=NOON + 86400)
    w = states.document(NOON + 86400)["workers"]["w"]
    assert (w["lines_today"], w["bytes_today"], w["day"]) == (3, 10, "2026-11-19")


def test_streams_in_the_state_are_only_those_the_ingest_admitted(tmp_path, ids):
    """A worker opening streams without limit is held to --max-streams-per-worker here too."""
    harness = ListenerHarness(tmp_path / "ingest", ids["master"])
    harness.ingest.max_streams_per_worker = 2
    with LogCapture():
        for i in range(6):
            app, pump = harness.hello(ids["w1"], f"s{i}")
            app.send(ackproto.encode_status(7))
            pump.flush()
    assert sorted(harness.factory.workers.workers["w1"].streams) == ["s0", "s1"]


# -- the file ---------------------------------------------------------------------------


def test_a_flood_of_changes_writes_the_file_at_most_once_a_second(tmp_path):
    clock = Clock()
    clock.advance(NOON)
    sf = StateFile(tmp_path / "workers.json", clock, inline_runner)
    sf.start()
    assert sf.writes == 0
    clock.advance(0)
    assert sf.writes == 1
    sf.states.stream("w1", "decnet", "ack", 0)
    for i in range(10_000):
        sf.states.status("w1", "decnet", i, 0, clock.seconds())
        if i % 2500 == 2499:
            clock.advance(0.25)
    assert sf.writes == 2  # one second went by: one more write, whatever the number of changes
    clock.advance(5.0)
    assert sf.writes == 2  # nothing changed since: nothing written (until the heartbeat)
    sf.states.status("w1", "decnet", 10_000, 0, clock.seconds())
    clock.advance(0)
    assert sf.writes == 3  # the first change after a quiet second is written at once
    doc = read_state(tmp_path / "workers.json")
    assert doc["workers"]["w1"]["streams"]["decnet"]["reported_end"] == 10_000


def test_the_file_is_rewritten_on_a_heartbeat_and_a_restart_keeps_the_history(tmp_path):
    clock = Clock()
    clock.advance(NOON)
    sf = StateFile(tmp_path / "workers.json", clock, inline_runner)
    sf.start()
    sf.states.connected("w1", NOON)
    sf.states.committed("w1", "decnet", 5, 1, 5, NOON)
    clock.advance(1)
    clock.advance(workers.HEARTBEAT)
    assert read_state(tmp_path / "workers.json")["written_at"] == NOON + 1 + workers.HEARTBEAT
    sf.stop()
    again = StateFile(tmp_path / "workers.json", clock, inline_runner)
    again.start()
    w = again.states.document(0)["workers"]["w1"]
    assert w["connections"] == 0 and w["last_connected"] == NOON and w["lines_today"] == 1


def test_a_state_file_that_is_not_ours_is_refused_by_readers(tmp_path):
    path = tmp_path / "workers.json"
    for junk in (b"[]", b'{"format": 9}', b"{", b'{"format": 1, "workers": [], "written_at": 1}'):
        path.write_bytes(junk)
        with pytest.raises(ValueError):
            read_state(path)
    assert read_state(tmp_path / "none.json") is None


def test_log_health_tells_connected_seen_stale_never_and_a_stopped_listener():
    states = WorkerStates()
    states.connected("up", NOON)
    states.connected("gone", NOON - 600)
    states.disconnected("gone", NOON - 590)
    doc = states.document(NOON)
    assert log_health(doc, "up", NOON + 10, 300).state == workers.CONNECTED
    gone = log_health(doc, "gone", NOON + 10, 300)
    assert (gone.state, gone.last_seen, gone.stale) == (workers.SEEN, NOON - 590, True)
    assert log_health(doc, "nobody", NOON, 300).state == workers.NEVER
    assert log_health(None, "up", NOON, 300).state == workers.NO_STATE
    late = log_health(doc, "up", NOON + 3600, 300)
    assert late.listener_silent and late.stale and late.state == workers.SEEN


WRITER = """
import sys, time
from decnet.fsutil import atomic_write
from decnet.listener.workers import WorkerStates, _encode
states = WorkerStates()
for w in range(2000):
    states.stream(f"w{w}", "decnet", "ack", w)
    states.error(f"w{w}", "x" * 300, 0)
print("ready", flush=True)
i = 0
while True:
    i += 1
    states.committed("w0", "decnet", i, 1, 1, 0)
    atomic_write(sys.argv[1], _encode(states.document(i)), 0o600)
"""


def test_the_state_file_survives_kill_9_in_the_middle_of_a_write(tmp_path):
    path = tmp_path / "workers.json"
    seen = set()
    for _ in range(5):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout.readline() == "ready\n"
        while not path.exists() or read_state(path)["written_at"] in seen:
            pass  # until this writer replaced the file at least once
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        doc = read_state(path)  # whole, and ours, after every kill
        assert len(doc["workers"]) == 2000
        seen.add(doc["written_at"])
    # A writer killed mid-write leaves its temporary file; the next start removes them all.
    (tmp_path / ".workers.json.tmp-1").write_bytes(b"{torn")
    StateFile(path, Clock(), inline_runner).start()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["workers.json"]


# -- over real sockets ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_listener_state_shows_the_exact_lag_of_a_partly_shipped_file(
    master_home, tmp_path
):
    name, bundle = enroll_worker(master_home, tmp_path / "b", "lag")
    lst = loopback_listener(master_home, tmp_path / "ingest", feed=False)
    lst.startService()
    log_file = tmp_path / "decnet.log"
    whole = b"".join(syslog_line(i) + b"\n" for i in range(50))
    log_file.write_bytes(whole + b"<14>1 an unfinished line")  # the forwarder ships whole lines
    port = lst.port_service.port.getHost().port
    fwd = loopback_forwarder(bundle, port, log_file, tmp_path / "f.sqlite")
    fwd.startService()
    path = state_path(tmp_path / "ingest")

    def lag():
        doc = read_state(path)
        return doc and doc["workers"].get(name, {}).get("lag")

    try:
        await eventually(lambda: lag() == len(b"<14>1 an unfinished line"), what="the lag")
        doc = read_state(path)["workers"][name]
        assert doc["connected"] is True and doc["lines_today"] == 50
        assert doc["streams"]["decnet"]["high_water"] == len(whole)
        with open(log_file, "ab") as f:
            f.write(b" now ended\n")
        await eventually(lambda: lag() == 0, what="the lag to go back to zero")
    finally:
        await fwd.stopService()
        await lst.stopService()
    doc = read_state(path)["workers"][name]
    assert doc["connected"] is False and doc["lines_today"] == 51


def test_what_this_run_recorded_before_the_old_file_was_read_wins_over_it():
    old = WorkerStates()
    old.connected("w1", NOON - 100)
    old.committed("w1", "decnet", 10, 1, 10, NOON - 100)
    old.error("w1", "old trouble", NOON - 100)
    fresh = WorkerStates()
    fresh.connected("w1", NOON)  # connected while the file was still being read
    fresh.load(old.document(NOON - 99))
    w = fresh.document(NOON)["workers"]["w1"]
    assert w["last_connected"] == NOON and w["connections"] == 1
    assert w["last_data"] == NOON - 100 and w["lines_today"] == 1
    assert w["last_error"] == "old trouble"


def test_a_state_file_that_cannot_be_written_is_logged_and_written_with_the_next_change(
    tmp_path,
):
    """A full disk (here: a missing directory) costs the file's freshness, never the listener."""
    clock = Clock()
    clock.advance(NOON)
    missing = tmp_path / "gone"
    sf = StateFile(missing / "workers.json", clock, inline_runner)
    sf.start()
    with LogCapture() as logs:
        clock.advance(0)
    assert sf.writes == 0 and "Cannot write the worker state" in logs.text()
    missing.mkdir()
    sf.states.connected("w1", NOON)
    clock.advance(1.0)
    assert sf.writes == 1 and read_state(missing / "workers.json")["workers"]["w1"]["connected"]


def test_the_writer_re_encodes_only_changed_workers_and_gives_the_same_bytes(tmp_path):
    from decnet.listener.workers import StateWriter, document_of

    states = WorkerStates()
    writer = StateWriter(tmp_path / "workers.json")
    for w in range(50):
        states.stream(f"w{w}", "decnet", "ack", w)
        states.error(f"w{w}", '"quoted" \x1b \u202e', NOON)
    for step in range(3):
        states.committed(f"w{step}", "decnet", 100 + step, 1, 1, NOON + step)
        snapshot = states.snapshot()
        assert writer.encode(snapshot, NOON + step) == _encode(document_of(snapshot, NOON + step))
    writer.write(states.snapshot(), NOON + 9)
    assert (
        read_state(tmp_path / "workers.json")["workers"]["w2"]["streams"]["decnet"]["high_water"]
        == 102
    )
