"""The index kept by real feed and index processes: kill -9 at any moment, ``--follow``."""

import json
import os
import signal
import subprocess
import sys
import threading

import pytest

from decnet.events.index import index_path
from decnet.listener import storage
from decnet.listener.feedworker import encode_message
from tests.events_support import commit, event_line, feed_entries, ingest_with, reader
from tests.support import BIN, ends_on_ctrl_c, wait_for


def feed_process(ingest):
    """``python -m decnet.listener.feedworker`` and its index process, in a process group."""
    return subprocess.Popen(
        [sys.executable, "-m", "decnet.listener.feedworker", str(ingest), "--encoders", "1"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )


def tell(proc, worker, end, stream="decnet"):
    proc.stdin.write(encode_message({"worker": worker, "stream": stream, "end": end}))
    proc.stdin.flush()


def indexed(ingest) -> int:
    if not index_path(ingest).exists():
        return 0
    index = reader(ingest)
    try:
        return index.count()
    finally:
        index.close()


def stop(proc) -> None:
    proc.stdin.close()
    proc.wait(timeout=30)


@pytest.mark.slow
def test_every_feed_line_is_indexed_exactly_once_across_kill_9_of_the_feed_and_index_processes(
    tmp_path,
):
    lines = 0
    cut_short = []
    for round_ in range(3):
        batch = [event_line(lines + i, user="u" * 200) for i in range(20_000)]  # ~10 MB of feed
        end = commit(tmp_path, "w1", batch)
        lines += len(batch)
        proc = feed_process(tmp_path)
        tell(proc, "w1", end)
        already = indexed(tmp_path)
        # Power cut in the middle: both processes at once, while rows are being added.
        wait_for(lambda a=already: indexed(tmp_path) > a, what=f"indexing in round {round_}")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        cut_short.append(indexed(tmp_path) < lines)
    assert any(cut_short)  # (4 MiB per transaction: killed in the middle, not after)
    proc = feed_process(tmp_path)
    tell(proc, "w1", end)
    try:
        wait_for(lambda: indexed(tmp_path) == lines, timeout=120, what="the whole index")
    finally:
        stop(proc)
    index = reader(tmp_path)
    offsets = [r[0] for r in index.db.execute("SELECT mirror_offset FROM events ORDER BY id")]
    assert offsets == [e["mirror_offset"] for e in feed_entries(tmp_path, "w1")]
    feed = storage.StreamFiles(tmp_path / "w1", "decnet").feed_path
    assert index.positions() == {("w1", "decnet"): (feed.stat().st_size, lines)}


def test_a_deleted_index_is_rebuilt_by_the_next_feed_process(tmp_path):
    ingest_with(tmp_path, {"w1": [event_line(i) for i in range(50)]})
    index_path(tmp_path).unlink()
    for extra in ("-wal", "-shm"):
        index_path(tmp_path).with_name("events.sqlite" + extra).unlink(missing_ok=True)
    proc = feed_process(tmp_path)  # told nothing: it finds the feeds on disk
    try:
        wait_for(lambda: indexed(tmp_path) == 50, what="the rebuilt index")
    finally:
        stop(proc)


class Lines:
    """Collects a subprocess's stdout lines in a thread (reads block)."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line.decode("utf-8"))


def test_follow_prints_the_latest_then_new_events_of_a_newly_enrolled_worker(tmp_path):
    ingest_with(tmp_path, {"w1": [event_line(i) for i in range(30)]})
    feeds = feed_process(tmp_path)
    follow = subprocess.Popen(
        [
            str(BIN / "decnet-admin"),
            "events",
            "--ingest",
            str(tmp_path),
            "--follow",
            "--json",
            "--event",
            "login",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out = Lines(follow.stdout)
        wait_for(lambda: len(out.lines) >= 10, what="the backlog")
        backlog = [json.loads(line)["structured_data"][0]["params"][0][1] for line in out.lines]
        assert backlog == [str(i) for i in range(20, 30)]
        # A worker the follow has never seen: its first commit after the command started.
        end = commit(tmp_path, "w2", [event_line(100), event_line(101, kind="connect")])
        tell(feeds, "w2", end)
        wait_for(lambda: any('"w2"' in line for line in out.lines), what="w2's event")
        new = [json.loads(line) for line in out.lines[10:]]
        assert [(e["source_worker"], e["msgid"]) for e in new] == [("w2", "login")]
        ends_on_ctrl_c(follow)
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()
        stop(feeds)


def test_an_index_file_that_is_not_a_database_is_one_error_line_not_a_traceback(tmp_path):
    ingest_with(tmp_path, {"w1": [event_line(0)]})
    for extra in ("-wal", "-shm"):
        index_path(tmp_path).with_name("events.sqlite" + extra).unlink(missing_ok=True)
    index_path(tmp_path).write_bytes(b"\x1b[2J" + b"garbage" * 1000)
    proc = subprocess.run(
        [sys.executable, "-m", "decnet.events.indexer", str(tmp_path)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert "is not a usable index" in err and "delete it to rebuild" in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_follow_stops_with_a_clear_error_when_the_index_is_deleted(tmp_path):
    ingest_with(tmp_path, {"w1": [event_line(0)]})
    follow = subprocess.Popen(
        [str(BIN / "decnet-admin"), "events", "--ingest", str(tmp_path), "--follow", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert b'"w1"' in follow.stdout.readline()  # following now
        index_path(tmp_path).unlink()
        _out, err = follow.communicate(timeout=60)
        assert follow.returncode == 1
        assert json.loads(err)["error"].endswith("while following: run the command again")
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()


def test_an_index_process_that_dies_is_started_again_after_a_backoff_and_catches_up(
    tmp_path, capsys
):
    from decnet.events.indexer import IndexChild
    from tests.events_support import build_feeds

    commit(tmp_path, "w1", [event_line(i) for i in range(40)])
    build_feeds(tmp_path)
    length = storage.StreamFiles(tmp_path / "w1", "decnet").feed_path.stat().st_size
    now = [0.0]
    child = IndexChild(tmp_path, clock=lambda: now[0])
    try:
        child.start()
        first = child.proc
        first.kill()
        first.wait()
        child.tell("w1", "decnet", length)  # finds it dead: a restart in 0.5 s
        assert child.proc is None and "index process exited (-9); restarting it" in (
            capsys.readouterr().err
        )
        now[0] += 0.4
        child.tell("w1", "decnet", length)
        assert child.proc is None
        now[0] += 0.1
        child.tell("w1", "decnet", length)
        assert child.proc is not None and child.proc.pid != first.pid
        wait_for(lambda: indexed(tmp_path) == 40, what="the restarted index process")
    finally:
        child.close()
    assert child.proc is None


def test_the_index_process_runs_only_on_cpu_time_nothing_else_wants(tmp_path):
    """SCHED_IDLE: the derived index never takes the feed's CPU (it lags instead)."""
    from decnet.events.indexer import IndexChild
    from tests.events_support import build_feeds

    commit(tmp_path, "w1", [event_line(i) for i in range(10)])
    build_feeds(tmp_path)
    child = IndexChild(tmp_path)
    try:
        child.start()
        wait_for(lambda: indexed(tmp_path) == 10, what="the index process")
        assert child.proc is not None
        assert os.sched_getscheduler(child.proc.pid) == os.SCHED_IDLE
        assert os.getpriority(os.PRIO_PROCESS, child.proc.pid) > os.getpriority(os.PRIO_PROCESS, 0)
    finally:
        child.close()
