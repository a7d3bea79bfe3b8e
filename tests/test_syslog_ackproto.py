"""decnet-syslog/1 messages: encoding, strict decoding."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from decnet.syslog import ackproto
from decnet.syslog.ackproto import Ack, Data, Error, Gap, Hello, ProtocolError, Resume, decode


def test_each_message_round_trips():
    assert decode(ackproto.encode_hello("decnet")) == Hello("decnet")
    assert decode(ackproto.encode_resume(0)) == Resume(0)
    assert decode(ackproto.encode_ack(123)) == Ack(123)
    assert decode(ackproto.encode_error("no")) == Error("no")
    assert decode(ackproto.encode_data(5, 9, b"abc\n")) == Data(5, 9, b"abc\n")


@pytest.mark.parametrize(
    "frame",
    [
        b"D 5 5 a\n",  # empty span
        b"D 9 5 a\n",  # backwards
        b"D 1 2 abc",  # not whole lines
        b"D 01 2 a\n",  # leading zero
        b"D 1 2",  # no payload
        b"D x 2 a\n",
        b"A -1",
        b"A 99999999999999999999",
        b"H 2 decnet",
        b"H 1 ../etc",
        b"H 1 Upper",
        b"H 1",
        b"Z",
        b"",
    ],
)
def test_malformed_messages_are_protocol_errors(frame):
    with pytest.raises(ProtocolError):
        decode(frame)


@given(st.integers(0, 2**62), st.integers(1, 2**20), st.binary(max_size=100))
def test_data_round_trips(start, span, body):
    payload = body.replace(b"\n", b"") + b"\n"
    assert decode(ackproto.encode_data(start, start + span, payload)) == Data(
        start, start + span, payload
    )


def test_a_gap_and_a_bare_error_round_trip():
    assert decode(ackproto.encode_gap(7, 9)) == Gap(7, 9)
    assert decode(b"E") == Error("")
    assert decode(b"E \xff") == Error("\ufffd")


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"G 9 9", "GAP end 9 is not after start 9"),
        (b"G 1", "GAP must be 'G <start> <end>'"),
        (b"G 1 2 3", "GAP must be 'G <start> <end>'"),
        (b"H 1 a b", "HELLO must be 'H <version> <stream>'"),
        (b"H 1 \xff", "stream name is not ASCII"),
        (b"D  5 a\n", "DATA start is not a decimal offset: b''"),
        (b"D 5", "DATA header is incomplete"),
        (b"R ", "RESUME offset is not a decimal offset: b''"),
        (b"Ex", "unknown message type b'E'"),
    ],
)
def test_each_refusal_names_what_is_wrong(frame, reason):
    with pytest.raises(ProtocolError) as caught:
        decode(frame)
    assert str(caught.value) == reason


_NEAR_VALID = st.tuples(
    st.sampled_from([b"D ", b"G ", b"A ", b"R ", b"H ", b"E ", b"E", b"S ", b""]),
    st.lists(st.sampled_from(list(b" 0123456789\n-x\xff")), max_size=48).map(bytes),
).map(b"".join)


@given(st.one_of(st.binary(max_size=64), _NEAR_VALID))
def test_any_frame_decodes_to_a_message_or_is_a_protocol_error(frame):
    try:
        message = decode(frame)
    except ProtocolError:
        return
    assert isinstance(message, Ack | Data | Error | Gap | Hello | Resume | ackproto.Status)


def test_status_is_s_space_end_byte_for_byte():
    assert ackproto.encode_status(0) == b"S 0"
    assert ackproto.encode_status(1234) == b"S 1234"
    assert decode(b"S 1234") == ackproto.Status(1234)
    assert decode(b"S %d" % ackproto.MAX_OFFSET) == ackproto.Status(ackproto.MAX_OFFSET)


@pytest.mark.parametrize(
    "frame",
    [b"S", b"S ", b"S -1", b"S 01", b"S 1 2", b"S x", b"S 9223372036854775808", b"S 1\n"],
)
def test_a_malformed_status_is_a_protocol_error(frame):
    with pytest.raises(ProtocolError):
        decode(frame)


@given(st.integers(0, ackproto.MAX_OFFSET))
def test_status_round_trips(end):
    assert decode(ackproto.encode_status(end)) == ackproto.Status(end)
