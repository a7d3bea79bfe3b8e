"""The listener's metrics, read from a listener driven over in-memory TLS (real certificates)."""

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from decnet import config
from decnet.listener.admission import DEFAULT_HANDSHAKE_TIMEOUT
from decnet.listener.metrics import listener_registry, publisher_lag
from decnet.listener.protocol import Refused
from decnet.syslog import ackproto
from decnet.syslog.framing import encode_frame
from tests.logpipe_support import ListenerHarness, LogCapture, syslog_line
from tests.metrics_support import render
from tests.test_listener_protocol import ids

__all__ = ["ids"]  # (the identities fixture, shared with the protocol's tests)


def harness_with_metrics(tmp_path, ids, **limits):
    harness = ListenerHarness(tmp_path / "ingest", ids["master"], **limits)
    registry = listener_registry(harness.factory, harness.ingest, harness.clock, ids["master"])
    return harness, registry


def refusals(registry) -> dict[str, float]:
    scrape = render(registry)
    return {
        s.labels["reason"]: s.value
        for s in scrape.samples
        if s.name == "decnet_listener_refusals_total"
    }


def test_each_kind_of_unwanted_connection_is_counted_under_its_own_reason(tmp_path, ids):
    harness, registry = harness_with_metrics(tmp_path, ids, max_per_worker=1)
    assert set(refusals(registry).values()) == {0}
    harness.connect(ids["impostor"])  # another CA
    harness.connect(ids["upd"])  # our CA, the wrong role
    harness.connect(ids["w1"], ack=False)
    harness.connect(ids["w1"], ack=False)  # one more than --max-connections-per-worker
    garbage, pump = harness.connect(ids["w2"], ack=False)
    garbage.transport.write(b"GET / HTTP/1.1\r\n\r\n")
    pump.flush()
    silent = harness.tls_factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 9))
    silent.makeConnection(StringTransport())
    harness.clock.advance(DEFAULT_HANDSHAKE_TIMEOUT)
    plaintext = harness.tls_factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 10))
    plaintext.makeConnection(StringTransport())
    plaintext.dataReceived(encode_frame(syslog_line(1)))
    plaintext.connectionLost(Failure(ConnectionLost()))
    counted = refusals(registry)
    assert counted == {
        **{r.value: 0 for r in Refused},
        "tls_untrusted": 1,
        "tls_policy": 1,
        "worker_connection_limit": 1,
        "framing": 1,
        "handshake_timeout": 1,
        "tls_failed": 1,
    }


def test_a_flood_from_one_address_is_counted_without_a_label_per_address(tmp_path, ids):
    harness, registry = harness_with_metrics(
        tmp_path, ids, max_unauthenticated=8, max_unauthenticated_per_address=2
    )
    gate = harness.factory.outside_tls(harness.tls_factory)
    for port in range(50):
        proto = gate.buildProtocol(IPv4Address("TCP", "198.51.100.7", 1000 + port))
        if proto is not None:
            proto.makeConnection(StringTransport())
    scrape = render(registry)
    assert scrape.value("decnet_listener_refusals_total", reason="pre_tls_limit") == 48
    assert scrape.value("decnet_listener_connections", state="handshaking") == 2
    assert "198.51.100.7" not in scrape.text


def test_lines_and_bytes_are_counted_per_worker_once_durable(tmp_path, ids):
    harness, registry = harness_with_metrics(tmp_path, ids)
    app, pump = harness.hello(ids["w1"], stream="attacker-chosen-stream")
    payload = b"".join(syslog_line(i) + b"\n" for i in range(3))
    app.send(ackproto.encode_data(0, len(payload), payload))
    pump.flush()
    plain, plain_pump = harness.connect(ids["w2"], ack=False)
    plain.send(syslog_line(7))
    plain_pump.flush()
    harness.clock.advance(0)
    pump.flush()
    scrape = render(registry)
    assert scrape.value("decnet_listener_ingested_lines_total", worker="w1") == 3
    assert scrape.value("decnet_listener_ingested_bytes_total", worker="w1") == len(payload)
    assert scrape.value("decnet_listener_ingested_lines_total", worker="w2") == 1
    assert scrape.value("decnet_listener_commit_seconds_count") >= 2
    assert scrape.value("decnet_listener_connections", state="streaming") == 1
    assert scrape.value("decnet_listener_connections", state="plain") == 1
    assert scrape.value("decnet_listener_worker_connections", worker="w1") == 1
    assert scrape.value("decnet_listener_worker_last_seen_timestamp_seconds", worker="w2") == (
        harness.clock.seconds()
    )
    # The syslog HOSTNAME a decoy wrote and the stream a worker named never become labels.
    assert "decoy-7" not in scrape.text and "attacker-chosen-stream" not in scrape.text


def test_the_certificate_expiry_is_the_listener_certificates_not_after(tmp_path, ids):
    _harness, registry = harness_with_metrics(tmp_path, ids)
    scrape = render(registry)
    expiry = ids["master"].cert.not_valid_after_utc.timestamp()
    assert (
        scrape.value("decnet_certificate_expiry_timestamp_seconds", role=config.ROLE_MASTER)
        == expiry
    )


def test_a_broken_commit_observer_is_logged_and_the_data_is_still_acknowledged(tmp_path, ids):
    harness, _registry = harness_with_metrics(tmp_path, ids)

    def broken(_done):
        raise RuntimeError("observer bug")

    harness.ingest.commit_observers.insert(0, broken)
    app, pump = harness.hello(ids["w1"])
    with LogCapture() as logs:
        app.send(ackproto.encode_data(0, 4, b"one\n"))
        pump.flush()
        harness.clock.advance(0)
        pump.flush()
    assert ackproto.Ack(4) in app.messages
    assert harness.mirror("w1", "decnet") == b"one\n"
    assert "A commit observer failed on w1" in logs.text()
    harness.ingest.commit_observers.remove(broken)


def test_publisher_lag_counts_each_workers_durable_bytes_above_the_brokers_mark():
    durable = {("w1", "auth"): 500, ("w1", "web"): 300, ("w2", "auth"): 100}
    confirmed = {("w1", "auth"): 200, ("w1", "web"): 300, ("w2", "auth"): 150}
    assert publisher_lag(durable, confirmed) == {"w1": 300, "w2": 0}
    assert publisher_lag({("w3", "x"): 40}, {}) == {"w3": 40}  # (nothing confirmed yet)


def test_a_listener_that_does_not_publish_exports_no_publisher_metrics(tmp_path, ids):
    _, registry = harness_with_metrics(tmp_path, ids)
    assert "decnet_listener_publisher" not in render(registry).text
