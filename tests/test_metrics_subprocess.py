"""``--metrics`` on the real ``twistd`` daemons, scraped over loopback and parsed."""

from __future__ import annotations

import os
import random
import subprocess

import pytest

from decnet.listener.protocol import Refused
from decnet.master import enrollment
from tests.logpipe_support import TWISTD, start_forwarder, start_listener, syslog_line
from tests.metrics_support import metrics_args, port_from, scrape_url
from tests.support import wait_for
from tests.test_logpipe_subprocess import stop


@pytest.fixture
def worker(master_home, tmp_path):
    """A freshly enrolled worker bundle (unique name) on the shared master."""
    name = f"mx-{os.getpid()}-{random.randrange(10**6)}"
    enrollment.enroll(enrollment.load_master(master_home), name, "127.0.0.1", tmp_path / "bundle")
    return name, tmp_path / "bundle"


def append(path, first: int, count: int) -> None:
    with open(path, "ab") as f:
        f.write(b"".join(syslog_line(i) + b"\n" for i in range(first, first + count)))


@pytest.mark.slow
def test_lines_appended_on_the_worker_move_the_forwarder_and_listener_metrics(
    master_home, worker, tmp_path
):
    name, bundle = worker
    log_file = tmp_path / "decnet.log"
    append(log_file, 0, 5)
    ingest = tmp_path / "ingest"
    l_args, l_port_file = metrics_args(tmp_path, "listener")
    f_args, f_port_file = metrics_args(tmp_path, "forwarder")
    listener, port = start_listener(
        master_home.home, ingest, tmp_path / "listener.log", extra=l_args
    )
    forwarder = start_forwarder(
        bundle, log_file, tmp_path / "fw.sqlite", port, tmp_path / "fw.log", extra=f_args
    )
    try:
        l_url = f"http://127.0.0.1:{port_from(l_port_file, listener)}/metrics"
        f_url = f"http://127.0.0.1:{port_from(f_port_file, forwarder)}/metrics"

        def shipped(n: int):
            def check():
                scrape = scrape_url(f_url)
                sent = scrape.get("decnet_forwarder_shipped_lines_total", stream="decnet")
                lag = scrape.get("decnet_forwarder_file_lag_bytes", stream="decnet")
                return sent is not None and sent >= n and lag == 0 and scrape

            return wait_for(check, timeout=60, what=f"{n} lines shipped and acknowledged")

        first = shipped(5)
        assert first.value("decnet_forwarder_connection_state", state="connected") == 1
        assert first.value("decnet_forwarder_connects_total", stream="decnet") == 1
        assert first.value("decnet_forwarder_unacknowledged_bytes", stream="decnet") == 0
        assert first.value("decnet_certificate_expiry_timestamp_seconds", role="worker") > 0
        append(log_file, 5, 7)
        later = shipped(12)
        assert later.value("decnet_forwarder_shipped_lines_total", stream="decnet") == 12
        assert (
            later.value("decnet_forwarder_shipped_bytes_total", stream="decnet")
            == log_file.stat().st_size
        )
        assert later.value("decnet_forwarder_gaps_total", stream="decnet") == 0

        at_listener = scrape_url(l_url)
        assert at_listener.value("decnet_listener_ingested_lines_total", worker=name) == 12
        assert (
            at_listener.value("decnet_listener_ingested_bytes_total", worker=name)
            == log_file.stat().st_size
        )
        assert at_listener.value("decnet_listener_worker_connections", worker=name) == 1
        assert at_listener.value("decnet_listener_connections", state="streaming") == 1
        assert at_listener.value("decnet_listener_commit_seconds_count") >= 1
        assert at_listener.value("decnet_build_info", daemon="listener") == 1
        # Every reason is exported (at 0 until it happens): alerts never see "no data".
        assert at_listener.labels_of("decnet_listener_refusals_total", "reason") == {
            r.value for r in Refused
        }
        wait_for(
            lambda: scrape_url(l_url).value("decnet_listener_feed_lag_bytes", worker=name) == 0,
            what="the feed to catch up",
        )
    finally:
        stop(forwarder)
        stop(listener)


def test_a_bad_metrics_endpoint_is_a_one_line_usage_error(master_home, tmp_path):
    result = subprocess.run(
        [
            TWISTD,
            "--nodaemon",
            "--pidfile=",
            "decnet-listener",
            "--home",
            str(master_home.home),
            "--metrics",
            "tpc:9465",
        ],
        capture_output=True,
        timeout=60,
    )
    assert result.returncode != 0
    out = (result.stdout + result.stderr).decode()
    assert "--metrics 'tpc:9465' is not an endpoint" in out
    assert "Traceback" not in out
