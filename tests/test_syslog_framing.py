"""RFC 5425 octet-counting codec: fragmentation, caps, malformed prefixes."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from decnet.syslog.framing import (
    FrameTooLarge,
    MalformedPrefix,
    OctetCountingDecoder,
    encode_frame,
    encode_lines,
)


def feed_bytewise(decoder, data):
    out = []
    for i in range(len(data)):
        out += decoder.feed(data[i : i + 1])
    return out


def test_frames_fed_one_byte_at_a_time_come_out_whole():
    msgs = [b"<14>1 - h a - - - hello", b"x", b"a b c" * 100]
    stream = b"".join(encode_frame(m) for m in msgs)
    decoder = OctetCountingDecoder()
    assert feed_bytewise(decoder, stream) == msgs
    assert decoder.buffered == 0


def test_many_frames_in_one_chunk_and_a_trailing_partial_frame():
    decoder = OctetCountingDecoder()
    assert decoder.feed(b"3 abc2 de4 fg") == [b"abc", b"de"]
    assert decoder.buffered == len(b"4 fg")
    assert decoder.feed(b"hi") == [b"fghi"]


def test_one_trailing_lf_inside_a_frame_is_stripped():
    decoder = OctetCountingDecoder()
    assert decoder.feed(b"4 abc\n4 ab\n\n") == [b"abc", b"ab\n"]


def test_trailing_lf_is_kept_when_asked():
    assert OctetCountingDecoder(strip_lf=False).feed(b"4 abc\n") == [b"abc\n"]


@pytest.mark.parametrize(
    "garbage, why",
    [
        (b"0 ", "starts with 0"),
        (b"01 a", "starts with 0"),
        (b"abc 1 a", "not a decimal"),
        (b" 1 a", "empty"),
        (b"12345678901234567890 x", "longer than"),
        (b"1-2 ab", "not a decimal"),
        (b"+5 abcde", "not a decimal"),
        (b"1_0 abcdefghij", "not a decimal"),
    ],
)
def test_a_malformed_prefix_is_a_typed_error(garbage, why):
    decoder = OctetCountingDecoder()
    with pytest.raises(MalformedPrefix, match=why):
        decoder.feed(garbage)


def test_a_twenty_digit_length_is_refused_without_waiting_for_more_bytes():
    decoder = OctetCountingDecoder(max_frame=65536)
    # Six digits and no space yet: already impossible for a 64 KiB cap.
    with pytest.raises(MalformedPrefix):
        decoder.feed(b"123456")


def test_garbage_before_the_first_frame_is_refused():
    with pytest.raises(MalformedPrefix):
        OctetCountingDecoder().feed(b"GET / HTTP/1.1\r\n")


def test_a_frame_just_over_the_cap_is_refused_and_earlier_frames_are_kept():
    decoder = OctetCountingDecoder(max_frame=100)
    data = encode_frame(b"a" * 100) + b"101 " + b"b" * 101
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(data)
    assert info.value.frames == [b"a" * 100]
    assert info.value.offset == 104


def test_a_dead_decoder_keeps_refusing():
    decoder = OctetCountingDecoder()
    with pytest.raises(MalformedPrefix):
        decoder.feed(b"x")
    with pytest.raises(MalformedPrefix):
        decoder.feed(b"3 abc")


def test_empty_messages_cannot_be_framed():
    with pytest.raises(ValueError):
        encode_frame(b"")


@given(st.lists(st.binary(min_size=1, max_size=300), max_size=30), st.data())
def test_round_trip_with_arbitrary_fragmentation(msgs, data):
    msgs = [m for m in msgs if not m.endswith(b"\n")]
    stream = encode_lines(msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    decoder = OctetCountingDecoder(max_frame=300)
    out, last = [], 0
    for cut in [*cuts, len(stream)]:
        out += decoder.feed(stream[last:cut])
        last = cut
    assert out == msgs
