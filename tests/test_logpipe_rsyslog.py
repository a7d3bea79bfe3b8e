"""Interop with stock rsyslog (gtls, octet-counted RFC 5425), in both directions."""

import os
import random

import pytest

from decnet.listener.feed import read_feed
from decnet.master import enrollment
from tests import rsyslog_support as rs
from tests.logpipe_support import start_forwarder, start_listener, syslog_line
from tests.support import free_port, wait_for

pytestmark = pytest.mark.skipif(not rs.available(), reason="rsyslog + rsyslog-gnutls not installed")


@pytest.fixture
def worker(master_home, tmp_path):
    name = f"rs-{os.getpid()}-{random.randrange(10**6)}"
    enrollment.enroll(enrollment.load_master(master_home), name, "127.0.0.1", tmp_path / "bundle")
    return name, tmp_path / "bundle"


def worker_lines(n):
    # Odd but legal content: a CR inside a line, UTF-8, a long line.
    out = [syslog_line(i) for i in range(n)]
    out[3] = syslog_line(3) + b" with\rcarriage return"
    out[4] = syslog_line(4) + " ünïcödé".encode()
    out[5] = syslog_line(5, pad=6000)
    return b"".join(line + b"\n" for line in out)


def test_a_stock_rsyslog_sender_ships_to_our_listener_with_certificate_provenance(
    master_home, worker, tmp_path
):
    name, bundle = worker
    listener, port = start_listener(master_home.home, tmp_path / "ingest", tmp_path / "l.log")
    source = tmp_path / "source.log"
    data = worker_lines(300)
    source.write_bytes(data)
    sender = rs.Rsyslogd(
        tmp_path / "rsyslog-sender",
        rs.sender_config(
            tmp_path / "rsyslog-sender",
            source,
            port,
            bundle / "ca.crt",
            bundle / "worker.crt",
            bundle / "worker.key",
            "decnet-master",
        ),
    )
    sender.start()
    try:
        mirror = tmp_path / "ingest" / name / "syslog.log"

        def arrived():
            return mirror.exists() and mirror.stat().st_size >= len(data)

        wait_for(arrived, timeout=60, what="rsyslog's lines in the mirror " + sender.internal_log())
        assert mirror.read_bytes() == data
        feed_path = tmp_path / "ingest" / name / "syslog.jsonl"
        wait_for(lambda: feed_path.exists() and len(read_feed(feed_path)) == 300, timeout=30)
        feed = read_feed(feed_path)
        # Provenance is the certificate's CN; the HOSTNAME is only what the line claims.
        assert {e["source_worker"] for e in feed} == {name}
        assert {e["hostname"] for e in feed} == {"decoy-7"}
    finally:
        sender.stop()
        listener.terminate()
        listener.wait(10)


def test_our_forwarder_ships_to_a_stock_rsyslog_receiver(master_home, worker, tmp_path):
    name, bundle = worker
    port = free_port()
    out = tmp_path / "received.log"
    receiver = rs.Rsyslogd(
        tmp_path / "rsyslog-receiver",
        rs.receiver_config(
            tmp_path / "rsyslog-receiver",
            port,
            out,
            master_home.ca_cert,
            master_home.listener_cert,
            master_home.listener_key,
            [name],
        ),
    )
    receiver.start()
    wait_for(lambda: rs.port_open(port), timeout=30, what="rsyslog to listen")
    log_file = tmp_path / "decnet.log"
    data = worker_lines(300)
    log_file.write_bytes(data)
    # --mode auto: rsyslog offers no ALPN, so this is plain RFC 5425.
    forwarder = start_forwarder(
        bundle, log_file, tmp_path / "f.sqlite", port, tmp_path / "f.log", ["--mode", "auto"]
    )
    try:
        wait_for(
            lambda: out.exists() and out.stat().st_size >= len(data),
            timeout=60,
            what="our lines at rsyslog " + receiver.internal_log(),
        )
        assert out.read_bytes() == data
        assert "plain RFC 5425" in (tmp_path / "f.log").read_text()
    finally:
        forwarder.terminate()
        forwarder.wait(10)
        receiver.stop()


def test_rsyslog_refuses_a_worker_it_does_not_permit(master_home, worker, tmp_path):
    """The receiver side of the interop really authorizes (gtls x509/name)."""
    _name, bundle = worker
    port = free_port()
    out = tmp_path / "received.log"
    receiver = rs.Rsyslogd(
        tmp_path / "rsyslog-receiver",
        rs.receiver_config(
            tmp_path / "rsyslog-receiver",
            port,
            out,
            master_home.ca_cert,
            master_home.listener_cert,
            master_home.listener_key,
            ["someone-else"],
        ),
    )
    receiver.start()
    wait_for(lambda: rs.port_open(port), timeout=30, what="rsyslog to listen")
    log_file = tmp_path / "decnet.log"
    log_file.write_bytes(worker_lines(10))
    forwarder = start_forwarder(bundle, log_file, tmp_path / "f.sqlite", port, tmp_path / "f.log")
    try:
        wait_for(
            lambda: (
                "not permitted" in receiver.internal_log() or "permitted" in receiver.internal_log()
            ),
            timeout=30,
            what="rsyslog to refuse the peer",
        )
        assert not out.exists() or out.read_bytes() == b""
    finally:
        forwarder.terminate()
        forwarder.wait(10)
        receiver.stop()
