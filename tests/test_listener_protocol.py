"""The listener over in-memory TLS: provenance, both modes, exactly-once bookkeeping, bad input."""

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from decnet import config
from decnet.listener.admission import DEFAULT_HANDSHAKE_TIMEOUT
from decnet.listener.feed import read_feed
from decnet.revocation import RevocationSet
from decnet.syslog import ackproto
from decnet.syslog.ackproto import Ack, Error, Resume
from decnet.syslog.framing import encode_frame, encode_lines
from tests.logpipe_support import ListenerHarness, LogCapture, syslog_line
from tests.support import expired_kw, write_identity


@pytest.fixture(scope="module")
def ids(ca, foreign_ca, tmp_path_factory):
    d = tmp_path_factory.mktemp("logids")
    return {
        "master": write_identity(d / "m", ca, "master"),
        "w1": write_identity(d / "w1", ca, "worker", "w1"),
        "w2": write_identity(d / "w2", ca, "worker", "w2"),
        "upd": write_identity(d / "u1", ca, "updater", "w1"),
        "impostor": write_identity(d / "imp", foreign_ca, "worker", "w1", trust=ca),
        "expired": write_identity(d / "exp", ca, "worker", "w1", **expired_kw()),
    }


@pytest.fixture
def harness(tmp_path, ids):
    return ListenerHarness(tmp_path / "ingest", ids["master"])


def lines(n, start=0):
    return [syslog_line(i) for i in range(start, start + n)]


# -- plain RFC 5425 ---------------------------------------------------------


def test_plain_frames_land_in_the_mirror_attributed_to_the_certificate_not_hostname(harness, ids):
    app, pump = harness.connect(ids["w1"], ack=False)
    sent = lines(20)
    data = encode_lines(sent)
    for i in range(0, len(data), 7):  # fragmented
        app.transport.write(data[i : i + 7])
        pump.flush()
    assert harness.mirror("w1", config.PLAIN_STREAM) == b"".join(m + b"\n" for m in sent)
    feed = read_feed(harness.ingest.directory / "w1" / "syslog.jsonl")
    assert len(feed) == 20
    assert {e["source_worker"] for e in feed} == {"w1"}
    assert {e["hostname"] for e in feed} == {"decoy-7"}
    assert feed[3]["structured_data"] == [
        {"id": "decnet@55555", "params": [["n", "3"], ["src_ip", "203.0.113.9"]]}
    ]
    assert feed[0]["stream"] == "syslog" and feed[0]["received_at"].endswith("Z")


def test_plain_frames_with_an_lf_inside_are_escaped_and_unparsable_lines_flagged(harness, ids):
    app, pump = harness.connect(ids["w1"], ack=False)
    app.transport.write(encode_lines([b"not syslog at all", b"one\ntwo\r"]))
    pump.flush()
    assert harness.mirror("w1", "syslog") == b"not syslog at all\none#012two\r\n"
    feed = read_feed(harness.ingest.directory / "w1" / "syslog.jsonl")
    assert [e["parsed"] for e in feed] == [False, False]
    assert feed[0]["raw"] == "not syslog at all" and "PRI" in feed[0]["parse_error"]


# -- acknowledged mode ------------------------------------------------------


def test_ack_mode_resumes_at_zero_then_acknowledges_durable_data(harness, ids):
    app, pump = harness.hello(ids["w1"])
    assert app.messages == [Resume(0)]
    payload = b"".join(m + b"\n" for m in lines(5))
    app.send(ackproto.encode_data(0, len(payload), payload))
    pump.flush()
    assert app.messages[-1] == Ack(len(payload))
    assert harness.mirror("w1", "decnet") == payload


def test_a_new_connection_resumes_at_the_high_water_mark_and_duplicates_are_dropped(harness, ids):
    app, pump = harness.hello(ids["w1"])
    first = b"a\nb\n"
    app.send(ackproto.encode_data(0, 4, first))
    pump.flush()
    app2, pump2 = harness.hello(ids["w1"])
    assert app2.messages == [Resume(4)]
    # The older connection of the same stream was replaced.
    pump.flush()
    assert app.lost_reason is not None
    app2.send(ackproto.encode_data(0, 4, first))  # a re-send: dropped, still acknowledged
    app2.send(ackproto.encode_data(4, 6, b"c\n"))
    pump2.flush()
    assert harness.mirror("w1", "decnet") == b"a\nb\nc\n"
    assert app2.messages[-1] == Ack(6)


def test_streams_and_workers_are_kept_apart(harness, ids):
    a, pa = harness.hello(ids["w1"], "decnet")
    b, pb = harness.hello(ids["w2"], "decnet")
    c, pc = harness.hello(ids["w1"], "other")
    for app, pump, body in ((a, pa, b"w1\n"), (b, pb, b"w2\n"), (c, pc, b"other\n")):
        app.send(ackproto.encode_data(0, len(body), body))
        pump.flush()
    assert harness.mirror("w1", "decnet") == b"w1\n"
    assert harness.mirror("w2", "decnet") == b"w2\n"
    assert harness.mirror("w1", "other") == b"other\n"


def test_a_declared_gap_is_recorded_and_logged(harness, ids):
    app, pump = harness.hello(ids["w1"])
    with LogCapture() as logs:
        app.send(ackproto.encode_data(100, 102, b"z\n"))
        pump.flush()
    assert app.messages[-1] == Ack(102)
    assert "Gap" in logs.text()
    sink = harness.ingest.sinks()[0]
    assert sink.gaps == 1 and sink.committed_end == 102


def test_data_overlapping_the_high_water_mark_closes_the_connection(harness, ids):
    app, pump = harness.hello(ids["w1"])
    app.send(ackproto.encode_data(0, 4, b"abc\n"))
    pump.flush()
    with LogCapture() as logs:
        app.send(ackproto.encode_data(2, 6, b"cdx\n"))
        pump.flush()
    assert isinstance(app.messages[-1], Error) and "overlaps" in app.messages[-1].reason
    assert app.lost_reason is not None
    assert "overlaps" in logs.text()
    assert harness.mirror("w1", "decnet") == b"abc\n"


@pytest.mark.parametrize(
    "first, why",
    [
        (ackproto.encode_data(0, 2, b"a\n"), "unexpected DATA"),
        (ackproto.encode_hello("syslog"), "reserved"),
        (b"Q what", "unknown message"),
    ],
)
def test_the_ack_state_machine_refuses_out_of_order_messages(harness, ids, first, why):
    app, pump = harness.connect(ids["w1"])
    with LogCapture() as logs:
        app.send(first)
        pump.flush()
    assert why in logs.text()
    assert app.lost_reason is not None


# -- bad input --------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [b"GET / HTTP/1.1\r\n\r\n", b"0 ", b"12345678901234567890 x", b"65537 " + b"x" * 100],
    ids=["garbage", "zero-length", "twenty-digits", "just-over-cap"],
)
@pytest.mark.parametrize("ack", [False, True], ids=["plain", "ack"])
def test_bad_framing_closes_only_that_connection_and_keeps_earlier_frames(
    harness, ids, garbage, ack
):
    other, other_pump = harness.connect(ids["w2"], ack=False)
    if ack:
        app, pump = harness.hello(ids["w1"])
        good = encode_frame(ackproto.encode_data(0, 3, b"ok\n"))
    else:
        app, pump = harness.connect(ids["w1"], ack=False)
        good = encode_frame(b"ok")
    with LogCapture() as logs:
        app.transport.write(good + garbage)
        pump.flush()
    assert app.lost_reason is not None
    assert "framing error" in logs.text() and "w1@127.0.0.1" in logs.text()
    assert harness.mirror("w1", "decnet" if ack else "syslog") == b"ok\n"
    # Another worker's connection is untouched and still delivers.
    other.transport.write(encode_frame(b"still here"))
    other_pump.flush()
    assert other.lost_reason is None
    assert harness.mirror("w2", "syslog") == b"still here\n"


def test_a_frame_that_stops_midway_is_closed_by_the_idle_timeout(harness, ids):
    app, pump = harness.connect(ids["w1"], ack=False)
    app.transport.write(b"100 only part of it")
    pump.flush()
    with LogCapture() as logs:
        harness.clock.advance(config.DEFAULT_IDLE_TIMEOUT + 1)
        pump.flush()
    assert app.lost_reason is not None
    assert "incomplete frame" in logs.text()


def test_an_idle_connection_at_a_frame_boundary_is_kept(harness, ids):
    app, pump = harness.connect(ids["w1"], ack=False)
    app.transport.write(encode_frame(b"hello"))
    pump.flush()
    harness.clock.advance(config.DEFAULT_IDLE_TIMEOUT * 10)
    pump.flush()
    assert app.lost_reason is None


def test_a_connection_that_never_handshakes_is_aborted_at_the_handshake_deadline(harness):
    proto = harness.tls_factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    transport = StringTransport()
    proto.makeConnection(transport)
    with LogCapture() as logs:
        harness.clock.advance(DEFAULT_HANDSHAKE_TIMEOUT - 0.5)
        assert not transport.disconnecting
        harness.clock.advance(0.5)
    assert transport.disconnected
    assert "no TLS handshake within 10s" in logs.text()


def test_plaintext_on_the_tls_port_is_refused_and_logged(harness):
    proto = harness.tls_factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 2))
    transport = StringTransport()
    proto.makeConnection(transport)
    with LogCapture() as logs:
        proto.dataReceived(encode_frame(syslog_line(1)))
        assert transport.disconnecting or proto._lostTLSConnection
        proto.connectionLost(Failure(ConnectionLost()))
    assert "handshake" in logs.text()
    assert harness.ingest.sinks() == []


@pytest.mark.parametrize(
    "who, why",
    [
        ("impostor", "not issued by our CA"),
        ("upd", "role 'updater'"),
        ("expired", "expired"),
        ("master", "role 'master'"),
    ],
)
def test_wrong_certificates_are_refused_at_the_handshake(harness, ids, who, why):
    with LogCapture() as logs:
        app, pump = harness.connect(ids[who])
        app.transport.write(encode_frame(b"should never land"))
        pump.flush()
    # (With TLS 1.3 the client may think its side finished; the server never agreed.)
    assert app.lost_reason is not None
    assert why in logs.text()
    assert harness.ingest.sinks() == []
    assert harness.factory.by_worker == {}


def test_a_client_without_a_certificate_is_refused(harness, ids):
    from twisted.internet.ssl import Certificate, CertificateOptions, trustRootFromCertificates

    anonymous = CertificateOptions(
        trustRoot=trustRootFromCertificates([Certificate(ids["master"].ca)])
    )
    with LogCapture() as logs:
        app, pump = harness.connect(None, client_options=anonymous)
        app.transport.write(encode_frame(b"should never land"))
        pump.flush()
    assert app.lost_reason is not None
    assert "handshake" in logs.text() and "certificate" in logs.text()
    assert harness.ingest.sinks() == []


def test_thousands_of_connections_from_one_worker_hit_its_cap_and_others_still_get_in(
    tmp_path, ids
):
    harness = ListenerHarness(tmp_path / "ingest", ids["master"], max_per_worker=4)
    clients = []
    with LogCapture() as logs:
        for _ in range(40):
            clients.append(harness.connect(ids["w1"], ack=False))
    alive = [c for c, _ in clients if c.lost_reason is None]
    assert len(alive) == 4
    assert sum("max-connections-per-worker" in r for r in logs.reasons()) == 36
    other, pump = harness.connect(ids["w2"], ack=False)
    other.transport.write(encode_frame(b"w2 line"))
    pump.flush()
    assert harness.mirror("w2", "syslog") == b"w2 line\n"


def test_a_revoked_worker_is_cut_and_cannot_reconnect(tmp_path, ids):
    revocations = RevocationSet()
    harness = ListenerHarness(tmp_path / "ingest", ids["master"], revocations)
    revocations.subscribe(harness.factory.revoked)
    app, pump = harness.connect(ids["w1"], ack=False)
    other, other_pump = harness.connect(ids["w2"], ack=False)
    with LogCapture() as logs:
        revocations.apply(frozenset({ids["w1"].identity.fingerprint}))
        pump.flush()
        assert app.lost_reason is not None
        assert "revoked" in logs.text()
        again, again_pump = harness.connect(ids["w1"], ack=False)
        again.transport.write(encode_frame(b"should never land"))
        again_pump.flush()
    assert again.lost_reason is not None
    assert any("revoked" in r for r in logs.reasons())
    other.transport.write(encode_frame(b"unaffected"))
    other_pump.flush()
    assert other.lost_reason is None and harness.mirror("w2", "syslog") == b"unaffected\n"


# -- one pass per reactor turn ------------------------------------------------


def test_records_that_arrive_in_one_turn_are_decoded_and_appended_in_one_pass(harness, ids):
    app, pump = harness.connect(ids["w1"], ack=False)
    sent = lines(50)
    for line in sent:  # one TLS record per message, as rsyslog sends them
        app.transport.write(encode_frame(line))
    pump.flush()
    assert harness.mirror("w1", "syslog") == b"".join(m + b"\n" for m in sent)
    sink = harness.ingest.sinks()[0]
    assert sink.commits == 1
    assert app.server.wrappedProtocol.frames == 50


def test_bytes_received_just_before_the_connection_drops_are_still_ingested(harness, ids):
    app, pump = harness.connect(ids["w1"], ack=False)
    app.transport.write(encode_frame(b"first"))
    pump.flush()
    proto = app.server.wrappedProtocol
    # Delivered in the same reactor turn as the loss: no pass has run for them yet.
    proto.dataReceived(encode_frame(b"second") + encode_frame(b"last words"))
    proto.connectionLost(Failure(ConnectionLost()))
    assert harness.mirror("w1", "syslog") == b"first\nsecond\nlast words\n"


def test_a_framing_error_later_in_the_same_turn_keeps_the_frames_before_it(harness, ids):
    app, pump = harness.connect(ids["w1"], ack=False)
    for body in (b"one", b"two"):
        app.transport.write(encode_frame(body))
    app.transport.write(b"0 bad")
    with LogCapture() as logs:
        pump.flush()
    assert "framing error" in logs.text() and "2 frames before it were kept" in logs.text()
    assert harness.mirror("w1", "syslog") == b"one\ntwo\n"
