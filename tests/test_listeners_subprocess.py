"""Real twistd processes: a forwarder whose bundle lists two listeners, and the preferred
listener killed with SIGKILL mid-stream.  Nothing is lost; the only bytes both mirrors hold
are the ones the dead listener made durable but could not acknowledge, at the same stream
offsets, byte for byte (a reader merging by (worker, stream, offset) sees each once)."""

from __future__ import annotations

import os
import random

import pytest

from decnet import pki
from decnet.forwarder.core import DEFAULT_WINDOW
from decnet.forwarder.rendezvous import rendezvous_order
from decnet.master import enrollment
from tests.logpipe_support import run_twistd, start_listener, syslog_line
from tests.support import wait_for
from tests.test_listeners_failover import segments
from tests.test_logpipe_subprocess import stop


def _lines(first: int, count: int) -> bytes:
    return b"".join(syslog_line(i) + b"\n" for i in range(first, first + count))


def _covered(expected: bytes, mirrors) -> int:
    """How far from 0 the segments of ``mirrors`` cover the stream without a hole; every
    segment must match ``expected`` at its offset."""
    at = 0
    for start, data in sorted(s for m in mirrors for s in segments(m)):
        assert data == expected[start : start + len(data)], f"segment at {start} differs"
        assert start <= at, f"hole between {at} and {start}"
        at = max(at, start + len(data))
    return at


@pytest.mark.slow
def test_kill_9_of_the_preferred_listener_moves_the_worker_and_loses_nothing(master_home, tmp_path):
    ingests = [tmp_path / "ingest-a", tmp_path / "ingest-b"]
    procs = []
    ports = []
    for i, ingest in enumerate(ingests):
        ingest.mkdir()
        proc, port = start_listener(master_home.home, ingest, tmp_path / f"listener-{i}.log")
        procs.append(proc)
        ports.append(port)
    name = f"k9-{os.getpid()}-{random.randrange(10**6)}"
    listed = [f"127.0.0.1:{p}" for p in ports]
    master = enrollment.load_master(master_home)
    enrollment.enroll(master, name, "127.0.0.1", tmp_path / "b", listeners=listed)
    preferred = rendezvous_order(name, pki.WorkerBundle.load(tmp_path / "b").listeners)[0]
    first = ports.index(preferred[1])
    mirrors = [ingest / name / "decnet.log" for ingest in ingests]
    log_file = tmp_path / "decnet.log"
    log_file.write_bytes(_lines(0, 8000))
    fwd_log = tmp_path / "forwarder.log"
    fwd = run_twistd(
        "decnet-forwarder",
        [
            "--bundle",
            tmp_path / "b",
            "--log-file",
            log_file,
            "--state",
            tmp_path / "f.sqlite",
            "--poll-interval",
            "0.2",
            "--max-retry-delay",
            "1",
        ],
        fwd_log,
    )
    try:
        wait_for(
            lambda: mirrors[first].exists() and mirrors[first].stat().st_size > 0,
            timeout=60,
            what="the preferred listener's first lines",
        )
        procs[first].kill()  # SIGKILL: no goodbye, no final ACK
        procs[first].wait()
        with open(log_file, "ab") as f:
            f.write(_lines(8000, 2000))
        expected = log_file.read_bytes()
        wait_for(
            lambda: _covered(expected, mirrors) == len(expected),
            timeout=120,
            what="the second listener to hold the rest",
        )
        ends = [(s, s + len(d)) for s, d in segments(mirrors[first])]
        starts = [s for s, _ in segments(mirrors[1 - first])]
        overlap = max(0, ends[-1][1] - starts[0])
        assert overlap <= DEFAULT_WINDOW  # at most what was in flight, never lost
        text = fwd_log.read_text(errors="replace")
        assert f"Moving from 127.0.0.1:{ports[first]} to 127.0.0.1:{ports[1 - first]}" in text
    finally:
        stop(fwd)
        for proc in procs:
            stop(proc)
