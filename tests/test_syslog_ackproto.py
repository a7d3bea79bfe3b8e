"""decnet-syslog/1 messages: encoding, strict decoding."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from decnet.syslog import ackproto
from decnet.syslog.ackproto import Ack, Data, Error, Hello, ProtocolError, Resume, decode


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
