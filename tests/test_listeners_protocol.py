"""decnet-syslog/2 byte by byte: HELLO carries the worker's acknowledged offset, a listener
below it starts a new mirror segment there ("moved", not a gap), and everything stays as
it was for a forwarder with one listener and for an older peer on either side."""

from __future__ import annotations

import pytest
from twisted.internet.error import ConnectionDone
from twisted.logger import LogLevel
from twisted.python.failure import Failure

from decnet import config
from decnet.forwarder import core
from decnet.listener import storage
from decnet.syslog import ackproto
from decnet.syslog.ackproto import Ack, Error, Hello, ProtocolError, Resume
from decnet.syslog.framing import encode_frame
from decnet.tls import PolicyOptions
from tests.logpipe_support import MASTER_ONLY, ListenerHarness, LogCapture
from tests.support import write_identity
from tests.test_forwarder_core import Rig, data_frame

# -- the message ------------------------------------------------------------


def test_a_version_1_hello_is_byte_for_byte_what_it_always_was():
    assert ackproto.encode_hello("decnet") == b"H 1 decnet"
    assert ackproto.decode(b"H 1 decnet") == Hello("decnet", 1, None)


def test_a_version_2_hello_carries_the_acknowledged_offset():
    assert ackproto.encode_hello("decnet", 4096) == b"H 2 decnet 4096"
    assert ackproto.decode(b"H 2 decnet 4096") == Hello("decnet", 2, 4096)
    assert ackproto.decode(b"H 2 s 0") == Hello("s", 2, 0)


@pytest.mark.parametrize(
    ("frame", "why"),
    [
        (b"H 2 decnet", "version 2 must be"),
        (b"H 1 decnet 5", "HELLO must be"),
        (b"H 2 decnet 05", "not a decimal"),
        (b"H 2 decnet -1", "not a decimal"),
        (b"H 2 decnet 99999999999999999999", "not a decimal"),
        (b"H 2 decnet 1 2", "HELLO must be"),
        (b"H 3 decnet 1", "unsupported protocol version 3"),
        (b"H 2 ../x 1", "invalid stream name"),
    ],
)
def test_a_malformed_hello_is_refused_with_its_reason(frame, why):
    with pytest.raises(ProtocolError, match=why):
        ackproto.decode(frame)


# -- the forwarder ----------------------------------------------------------


def test_a_forwarder_with_one_listener_says_hello_as_today(tmp_path):
    rig = Rig(tmp_path)
    assert rig.connect() == encode_frame(b"H 1 decnet")


def test_on_a_version_2_connection_hello_names_the_acknowledged_offset(tmp_path):
    rig = Rig(tmp_path)
    rig.connect()
    rig.say(b"R 0")
    rig.write(b"one\ntwo\n")
    rig.say(b"A 8")
    rig.proto.connectionLost(Failure(ConnectionDone()))
    assert rig.connect(config.ACK_ALPN_MOVES) == encode_frame(b"H 2 decnet 8")
    rig.say(b"R 8")  # the new listener starts its segment there
    rig.write(b"three\n")
    assert rig.take() == data_frame(8, 14, b"three\n")


def test_handing_a_connection_back_waits_until_everything_sent_is_acknowledged(tmp_path):
    rig = Rig(tmp_path)
    rig.connect()
    rig.say(b"R 0")
    rig.write(b"one\n")
    assert rig.take() == data_frame(0, 4, b"one\n")
    rig.shipper.drain()
    rig.write(b"two\n")
    assert rig.take() == b""  # nothing more is sent while draining
    assert not rig.transport.disconnecting
    rig.say(b"A 4")
    assert rig.transport.disconnecting  # closed once all it sent is acknowledged
    assert rig.shipper.core.acked == 4


def test_handing_back_a_connection_with_nothing_in_flight_closes_it_at_once(tmp_path):
    rig = Rig(tmp_path)
    rig.connect()
    rig.say(b"R 0")
    assert rig.shipper.core.drain() == [core.Close(core.DRAINED)]


# -- the listener -----------------------------------------------------------


@pytest.fixture(scope="module")
def ids(ca, tmp_path_factory):
    d = tmp_path_factory.mktemp("moveids")
    return {
        "master": write_identity(d / "m", ca, "master"),
        "w1": write_identity(d / "w1", ca, "worker", "w1"),
        "w2": write_identity(d / "w2", ca, "worker", "w2"),
    }


@pytest.fixture
def harness(tmp_path, ids):
    # The listener's real server options: both versions offered, version 2 preferred.
    return ListenerHarness(tmp_path / "ingest", ids["master"])


def _moves(harness, identity, body: bytes):
    options = PolicyOptions(
        identity, MASTER_ONLY, acceptable_protocols=[config.ACK_ALPN_MOVES, config.ACK_ALPN]
    )
    app, pump = harness.connect(identity, client_options=options)
    assert app.transport.negotiatedProtocol == config.ACK_ALPN_MOVES
    app.send(body)
    pump.flush()
    return app, pump


def test_a_worker_arriving_with_a_higher_offset_starts_a_new_segment_there(harness, ids):
    with LogCapture(levels=(LogLevel.info,)) as logs:
        app, pump = _moves(harness, ids["w1"], b"H 2 decnet 1000")
    assert app.messages == [Resume(1000)]
    app.send(ackproto.encode_data(0, 1000, b"x" * 999 + b"\n"))  # the other listener's: dropped
    app.send(ackproto.encode_data(1000, 1004, b"new\n"))
    pump.flush()
    assert app.messages[-1] == Ack(1004)
    assert harness.mirror("w1", "decnet") == b"new\n"
    index = harness.ingest.directory / "w1" / "decnet.idx"
    records = storage.read_records(index)
    assert records[0].moved and (records[0].mirror_end, records[0].stream_end) == (0, 1000)
    assert not any(r.moved for r in records[1:])
    assert "arrived on stream decnet with offset 1000" in logs.text()


def test_a_listener_already_at_or_past_the_offset_resumes_at_its_own_mark(harness, ids):
    app, pump = _moves(harness, ids["w1"], b"H 2 decnet 0")
    app.send(ackproto.encode_data(0, 6, b"a\nb\nc\n"))
    pump.flush()
    app2, _ = _moves(harness, ids["w1"], b"H 2 decnet 4")
    assert app2.messages == [Resume(6)]
    index = harness.ingest.directory / "w1" / "decnet.idx"
    assert not any(r.moved for r in storage.read_records(index))


def test_a_segment_start_survives_a_restart_of_the_listener(harness, ids, tmp_path):
    app, pump = _moves(harness, ids["w1"], b"H 2 decnet 500")
    app.send(ackproto.encode_data(500, 504, b"abc\n"))
    pump.flush()
    files = storage.StreamFiles(tmp_path / "ingest" / "w1", "decnet")
    recovered = files.open()
    files.close()
    assert (recovered.mirror_end, recovered.stream_end) == (4, 504)


def test_a_worker_claiming_an_absurd_offset_moves_only_its_own_stream(harness, ids):
    """A compromised worker with a valid certificate can only skip its own stream ahead
    (as a GAP could); other workers are untouched and nothing already stored changes."""
    app, pump = _moves(harness, ids["w1"], b"H 2 decnet 0")
    app.send(ackproto.encode_data(0, 2, b"a\n"))
    pump.flush()
    liar, liar_pump = _moves(harness, ids["w1"], b"H 2 decnet %d" % ackproto.MAX_OFFSET)
    assert liar.messages == [Resume(ackproto.MAX_OFFSET)]
    liar.send(ackproto.encode_data(0, 4, b"b\nc\n"))  # below the claimed mark: dropped
    liar_pump.flush()
    assert harness.mirror("w1", "decnet") == b"a\n"
    other, other_pump = _moves(harness, ids["w2"], b"H 2 decnet 0")
    other.send(ackproto.encode_data(0, 2, b"z\n"))
    other_pump.flush()
    assert other.messages == [Resume(0), Ack(2)]
    assert harness.mirror("w2", "decnet") == b"z\n"


def test_a_version_1_hello_on_a_version_2_connection_is_refused(harness, ids):
    app, _ = _moves(harness, ids["w1"], b"H 1 decnet")
    assert isinstance(app.messages[-1], Error)
    assert "HELLO version 1 on a version 2 connection" in app.messages[-1].reason


def test_an_older_forwarder_still_gets_version_1(harness, ids):
    app, pump = harness.connect(ids["w1"])
    assert app.transport.negotiatedProtocol == config.ACK_ALPN
    app.send(ackproto.encode_hello("decnet"))
    pump.flush()
    assert app.messages == [Resume(0)]


def _rig_on_second_choice(tmp_path):
    """A rig whose factory has two listeners and is connected to its second choice."""
    from decnet.forwarder.rendezvous import ListenerChoice

    rig = Rig(tmp_path)
    choice = ListenerChoice("w1", [("10.0.0.1", 6514), ("10.0.0.2", 6514)], return_after=300)
    rig.factory.choice, rig.factory.clock = choice, rig.clock
    rig.factory.failed_attempt("connection refused")  # the preferred one is down
    assert choice.index == 1
    rig.connect()
    rig.say(b"R 0")
    return rig


def test_on_another_listener_the_connection_is_handed_back_after_return_after(tmp_path):
    rig = _rig_on_second_choice(tmp_path)
    rig.write(b"one\n")
    rig.take()
    rig.clock.advance(299)
    assert not rig.transport.disconnecting
    rig.clock.advance(1)
    assert not rig.transport.disconnecting  # "one\n" is not acknowledged yet
    rig.say(b"A 4")
    assert rig.transport.disconnecting
    rig.proto.connectionLost(Failure(ConnectionDone()))
    assert rig.factory.choice.target == rig.factory.choice.preferred
    assert rig.factory.moves == 2  # away, and back


def test_a_listener_that_never_acknowledges_the_hand_back_is_closed_after_a_grace(tmp_path):
    from decnet.forwarder.client import DRAIN_GRACE

    rig = _rig_on_second_choice(tmp_path)
    rig.write(b"one\n")
    rig.take()
    rig.clock.advance(300)
    rig.clock.advance(DRAIN_GRACE - 0.5)
    assert not rig.transport.disconnecting
    rig.clock.advance(0.5)
    assert rig.transport.disconnecting
    assert rig.acked_on_disk() == 0  # nothing unacknowledged counts as delivered


def test_a_receiver_refused_for_want_of_the_ack_protocol_is_one_failed_attempt(tmp_path):
    """One refusal moves the worker one listener on, not two."""
    from decnet.forwarder.rendezvous import ListenerChoice

    rig = Rig(tmp_path)
    rig.factory.mode = "ack"
    choice = ListenerChoice("w1", [(f"10.0.0.{i}", 6514) for i in (1, 2, 3)], return_after=300)
    rig.factory.choice, rig.factory.clock = choice, rig.clock
    rig.connect(alpn=None)
    assert rig.transport.disconnecting
    rig.proto.connectionLost(Failure(ConnectionDone()))
    assert choice.index == 1 and rig.factory.moves == 1
    assert rig.factory.state == "failing"
