"""``decnet-admin events --postgres``: follow, and what an operator sees when the store is wrong."""

from __future__ import annotations

import json
import subprocess

from decnet.sink.store import SinkStore
from tests.events_support import event_line
from tests.sink_support import messages_for
from tests.support import BIN, ends_on_ctrl_c, wait_for
from tests.test_events_subprocess import Lines


def _admin(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "decnet-admin"), "events", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_follow_on_postgres_prints_the_backlog_then_rows_the_sink_commits_later(tmp_path, pg_dsn):
    lines = [event_line(i, when=f"2026-05-01T12:00:00.{i:06d}Z") for i in range(15)]
    messages = messages_for(tmp_path, {"w1": lines[:12], "w2": lines[12:]})
    store = SinkStore(pg_dsn)
    store.write(messages[:12])
    follow = subprocess.Popen(
        [str(BIN / "decnet-admin"), "events", "--postgres", pg_dsn, "--follow", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out = Lines(follow.stdout)
        wait_for(lambda: len(out.lines) >= 10, what="the backlog")
        store.write(messages[12:])
        wait_for(lambda: len(out.lines) >= 13, what="the new rows")
        printed = [json.loads(line) for line in out.lines]
        assert [e["source_worker"] for e in printed[10:]] == ["w2"] * 3
        assert [line.rstrip("\n").encode() for line in out.lines] == [m.data for m in messages[2:]]
        ends_on_ctrl_c(follow)
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()
        store.close()


def test_an_unreachable_postgres_is_one_json_error_line(pg_cluster):
    dsn = f"host=127.0.0.1 port={pg_cluster.port + 1} user=postgres dbname=x connect_timeout=2"
    done = _admin("--postgres", dsn, "--json")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert json.loads(done.stderr)["error"].startswith("cannot connect to PostgreSQL")


def test_postgres_and_ingest_together_is_a_usage_error(tmp_path):
    done = _admin("--postgres", "dbname=x", "--ingest", str(tmp_path))
    assert done.returncode == 2 and "give one" in done.stderr
