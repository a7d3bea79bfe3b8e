"""A real nats-server, a real PostgreSQL, the real publisher and a real ``twistd decnet-sink``.

Events published by the listener's publisher land in PostgreSQL exactly once,
whatever is killed: the sink (``kill -9`` while it holds a batch PostgreSQL
did not take) and PostgreSQL (``pg_ctl stop -m immediate``, then started
again).  A poison message is kept aside and never blocks the consumer.  And
``decnet-admin events --postgres`` prints what ``--ingest`` prints.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from decnet.listener import publishing
from decnet.sink import rows
from tests.events_support import build_feeds, commit, event_line, index_all
from tests.logpipe_support import TWISTD, run_twistd
from tests.nats_support import PublisherRun
from tests.support import wait_for

WORKERS = ("w1", "web-02.dmz")
SUBJECTS = publishing.EVENTS_PREFIX + ".>"


def _lines(start: int, n: int, k: int) -> list[bytes]:
    """Events each at its own time (the stores would order a tie differently)."""
    return [
        event_line(i, src=f"203.0.113.{i % 250}", when=f"2026-05-01T12:00:00.{2 * i + k:06d}Z")
        for i in range(start, start + n)
    ]


def _add_events(ingest: Path, start: int, n: int) -> None:
    for k, worker in enumerate(WORKERS):
        commit(ingest, worker, _lines(start, n, k))
    build_feeds(ingest)
    index_all(ingest)


def _published_events(url: str) -> int:
    """How many messages the stream holds on ``decnet.events.>``."""
    import nats
    import nats.js.errors

    async def count() -> int:
        nc = await nats.connect(url)
        try:
            info = await nc.jetstream().stream_info("DECNET", subjects_filter=SUBJECTS)
        except nats.js.errors.NotFoundError:
            return 0  # (the publisher has not made the stream yet)
        finally:
            await nc.close()
        return sum((info.state.subjects or {}).values())

    return asyncio.run(count())


def _publish_poison(url: str) -> None:
    import nats

    async def send() -> None:
        nc = await nats.connect(url)
        try:
            subject = publishing.events_subject("evil", "decnet")
            headers = {publishing.H_WORKER: "evil", publishing.H_STREAM: "decnet"}
            await nc.jetstream().publish(subject, b"\x1b]0;pwn\x07\xff{not json", headers=headers)
        finally:
            await nc.close()

    asyncio.run(send())


def _stored(dsn: str) -> list[tuple[str, str, int]]:
    with psycopg.connect(dsn, connect_timeout=2) as conn:
        return conn.execute(
            f"SELECT worker, stream, stream_offset FROM {rows.EVENTS_TABLE}"  # noqa: S608
        ).fetchall()


def _count(dsn: str) -> int:
    try:
        return len(_stored(dsn))
    except psycopg.Error:
        return -1  # (down, or the sink has not made its table yet)


def _consumers(url: str) -> list[int]:
    """Pids of sink consumer processes started for ``url`` (PDEATHSIG must end them)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"decnet.sink.consumer" in argv and url.encode() in argv:
            found.append(int(entry.name))
    return found


def _log_has(log: Path, text: str) -> bool:
    return log.exists() and text in log.read_text()


def _start_sink(url: str, dsn: str, log: Path) -> subprocess.Popen:
    args = ["--nats", url, "--postgres", dsn, "--batch", "7", "--ack-wait", "1"]
    return run_twistd("decnet-sink", args, log)


_SINK_ARGS = ("--nats", "nats://127.0.0.1:4222", "--postgres")


def _admin_json(*args: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-m", "decnet.cli.main", "events", "--json", "--limit", "0", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


@pytest.mark.slow
def test_every_event_lands_once_through_sink_and_postgres_kills_and_poison(
    tmp_path, nats_server, pg_cluster, pg_dsn
):
    ingest = tmp_path / "ingest"
    ingest.mkdir()
    _add_events(ingest, 0, 40)
    publisher = PublisherRun(ingest, nats_server.url)
    try:
        wait_for(lambda: _published_events(nats_server.url) == 80, what="80 events published")
        _publish_poison(nats_server.url)
        log = tmp_path / "sink.log"
        sink = _start_sink(nats_server.url, pg_dsn, log)
        wait_for(lambda: _count(pg_dsn) == 80, timeout=60, what="the first 80 events stored")

        # PostgreSQL dies; more events arrive; the sink holds a batch it cannot write.
        pg_cluster.stop("immediate")
        _add_events(ingest, 40, 30)
        for worker in WORKERS:
            publisher.notify(worker, "decnet")
        wait_for(lambda: _published_events(nats_server.url) == 141, what="140 events published")
        wait_for(lambda: _log_has(log, "PostgreSQL unavailable"), what="the outage logged")
        assert _consumers(nats_server.url)
        sink.kill()  # kill -9 with a batch in hand, never committed nor acknowledged
        sink.wait(timeout=10)
        wait_for(lambda: not _consumers(nats_server.url), what="its consumer process to die too")
        pg_cluster.start()

        sink = _start_sink(nats_server.url, pg_dsn, log)
        try:
            wait_for(lambda: _count(pg_dsn) == 140, timeout=60, what="all 140 events stored")
        finally:
            sink.terminate()
            sink.wait(timeout=20)
    finally:
        publisher.kill9()

    stored = _stored(pg_dsn)
    assert len(stored) == len(set(stored)) == 140
    text = log.read_text()
    assert text.count("PostgreSQL unavailable") == 1, text
    with psycopg.connect(pg_dsn) as conn:
        (reason,) = conn.execute(f"SELECT reason FROM {rows.REJECTED_TABLE}").fetchone()  # noqa: S608
    assert "UTF-8" in reason or "Decnet-Offset" in reason
    assert "Rejected event" in text and "\x1b" not in text

    # The same entries, byte for byte, from either store.
    assert _admin_json("--postgres", pg_dsn) == _admin_json("--ingest", str(ingest))
    # (Filter by filter, in process: tests/test_sink_store.py.)


def test_a_sink_against_a_wrong_schema_stops_with_one_line(tmp_path, pg_dsn):
    with psycopg.connect(pg_dsn) as conn:
        conn.execute(f"CREATE TABLE {rows.EVENTS_TABLE} (worker text, entry jsonb)")
    done = subprocess.run(
        [TWISTD, "--nodaemon", "--pidfile=", "decnet-sink", *_SINK_ARGS, pg_dsn],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert "decnet_events.entry is jsonb, not text" in line


@pytest.mark.slow
def test_a_broker_down_at_start_and_killed_mid_run_loses_nothing(tmp_path, pg_dsn):
    from tests.nats_support import NatsServer

    nats = NatsServer(tmp_path / "nats")  # not started yet
    ingest = tmp_path / "ingest"
    ingest.mkdir()
    _add_events(ingest, 0, 10)
    log = tmp_path / "sink.log"
    sink = _start_sink(nats.url, pg_dsn, log)
    publisher = None
    try:
        wait_for(lambda: _log_has(log, "JetStream broker down"), what="the outage logged")
        assert sink.poll() is None
        nats.start()
        publisher = PublisherRun(ingest, nats.url)
        wait_for(lambda: _count(pg_dsn) == 20, timeout=60, what="20 events stored")
        nats.kill9()
        _add_events(ingest, 10, 10)
        nats.start()
        for worker in WORKERS:
            publisher.notify(worker, "decnet")
        wait_for(lambda: _count(pg_dsn) == 40, timeout=60, what="40 events stored")
    finally:
        sink.terminate()
        sink.wait(timeout=20)
        if publisher is not None:
            publisher.kill9()
        nats.stop()
    stored = _stored(pg_dsn)
    assert len(stored) == len(set(stored)) == 40
    assert "Traceback" not in log.read_text()
