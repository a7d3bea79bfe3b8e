"""Hostile input against each decoy, driven in memory (StringTransport, Clock).

Linearity is checked by counting work, never by timing: every decoy parses
through its connection's Inbox, whose meter counts the bytes searched and the
bytes copied out.  A parser that rescans or copies the rest of its buffer for
each item (as the redis decoy's did: 64 KiB of LF cost 2 GiB of copying) fails
these tests whatever the machine's speed.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from decnet.agent.decoys import http, redis, ssh
from decnet.agent.decoys.base import CLOSE_GRACE, MAX_COMMANDS
from decnet.agent.decoys.budget import TURN_ITEMS, TurnBudget
from decnet.agent.decoys.inbox import TOO_LONG, Inbox
from tests.decoy_support import Conn, TurnClock

KINDS = ("ssh", "telnet", "http", "ftp", "smtp", "redis", "tcp-banner")


@pytest.fixture(scope="module")
def host_keys(tmp_path_factory):
    return ssh.load_or_create_host_keys(tmp_path_factory.mktemp("ssh-keys"))


def ssh_packet(payload: bytes) -> bytes:
    """An unencrypted SSH binary packet (block size 8, at least 4 bytes of padding)."""
    pad = 8 - (5 + len(payload)) % 8
    pad += 8 if pad < 4 else 0
    return struct.pack("!LB", 1 + len(payload) + pad, pad) + payload + b"\x00" * pad


SSH_HELLO = b"SSH-2.0-OpenSSH_9.6\r\n"

# (type, name, input): each one pathological for a naive parser.
HOSTILE = [
    ("redis", "blank lines", b"\n" * 65536),
    ("redis", "empty multibulks", b"*0\r\n*-1\r\n" * 8192),
    ("redis", "a long inline line", b"x" * 60000),
    ("redis", "one multibulk of tiny bulks", b"*1024\r\n" + b"$1\r\na\r\n" * 1024),
    ("redis", "pings", b"PING\r\n" * 10000),
    ("ftp", "blank lines", b"\r\n" * 32768),
    ("ftp", "a line just under the cap", b"y" * 8190),
    ("ftp", "noops", b"NOOP\r\n" * 10000),
    ("smtp", "blank lines", b"\n" * 65536),
    ("smtp", "a line just under the cap", b"y" * 8190),
    ("telnet", "blank lines", b"\r\n" * 32768),
    ("telnet", "IAC NOPs", b"\xff\xf1" * 32768),
    ("telnet", "IAC WILLs", b"\xff\xfb\x05" * 20000),
    ("telnet", "an unterminated subnegotiation", b"\xff\xfa\x18" + b"z" * 4000),
    ("telnet", "text with escaped IACs", (b"ab\xff\xff" * 250) + b"\r\n"),
    ("http", "header lines", b"GET / HTTP/1.1\r\n" + b"a:b\r\n" * 90 + b"\r\n"),
    ("http", "pipelined requests", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n" * 3000),
    ("http", "a request line just under the cap", b"GET /" + b"a" * 16000),
    (
        "http",
        "a chunked body of one-byte chunks",
        b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1\r\nz\r\n" * 5000,
    ),
    ("ssh", "IGNORE packets", SSH_HELLO + ssh_packet(b"\x02") * 8000),
    ("ssh", "unknown packets", SSH_HELLO + ssh_packet(b"\xc8") * 8000),
    ("ssh", "lines before the version", b"hello\r\n" * 500),
    ("ssh", "one large packet", SSH_HELLO + ssh_packet(b"\x02" + b"\x00" * 200_000)),
    ("tcp-banner", "garbage", bytes(range(256)) * 256),
]


def bounded(conn: Conn) -> None:
    """Work within a constant factor of the input; the connection still parses or closed."""
    inbox = conn.proto.inbox
    assert inbox.work <= 8 * inbox.received + 64, (inbox.work, inbox.received)


@pytest.mark.parametrize(("kind", "name", "data"), HOSTILE, ids=[f"{k}-{n}" for k, n, _ in HOSTILE])
def test_hostile_input_costs_work_linear_in_its_size_when_sent_at_once(kind, name, data, host_keys):
    conn = Conn(kind, host_keys)
    conn.feed(data)
    bounded(conn)


@pytest.mark.parametrize(("kind", "name", "data"), HOSTILE, ids=[f"{k}-{n}" for k, n, _ in HOSTILE])
def test_hostile_input_costs_work_linear_in_its_size_when_trickled(kind, name, data, host_keys):
    # The first 8 KiB a byte at a time (a parser that rescans its buffer on
    # every read does 32 MiB of work here), then the rest in 1000-byte reads.
    conn = Conn(kind, host_keys)
    conn.feed(data[:8192], chunk=1)
    conn.feed(data[8192:], chunk=1000)
    bounded(conn)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=st.sampled_from(HOSTILE),
    cuts=st.lists(st.integers(min_value=1, max_value=70000), max_size=40),
)
def test_hostile_input_costs_linear_work_however_it_is_chunked(case, cuts, host_keys):
    kind, _name, data = case
    conn = Conn(kind, host_keys)
    at = 0
    for cut in sorted(set(cuts)):
        conn.feed(data[at:cut])
        at = max(at, cut)
    conn.feed(data[at:])
    bounded(conn)


# -- every item counts, degenerate ones included -------------------------------

DEGENERATE = [
    ("redis", b"\n"),
    ("redis", b"\r\n"),
    ("redis", b"   \r\n"),
    ("redis", b"*0\r\n"),
    ("redis", b"*-1\r\n"),
    ("telnet", b"\xff\xf1"),
    ("telnet", b"\xff\xfb\x05"),
    ("telnet", b"\r\n"),
    ("ftp", b"\r\n"),
    ("smtp", b" \n"),
    ("ssh", ssh_packet(b"\x02")),
    ("http", b"a:b\r\n"),
]


@pytest.mark.parametrize(("kind", "unit"), DEGENERATE)
def test_empty_and_degenerate_commands_count_toward_the_command_cap(kind, unit, host_keys):
    conn = Conn(kind, host_keys)
    prefix = {"ssh": SSH_HELLO, "http": b"GET / HTTP/1.1\r\n"}.get(kind, b"")
    if kind == "http":
        conn.proto.maxHeaders = 10**6  # this test is about the command cap
    conn.feed(prefix + unit * (MAX_COMMANDS + 10))
    assert conn.closed
    assert conn.reason() == "command-limit"


def test_a_run_of_blank_lines_is_answered_once_per_line_within_the_cap():
    conn = Conn("smtp")
    conn.transport.clear()
    conn.feed(b"\r\n" * 5 + b"NOOP\r\n")
    assert conn.transport.value() == b"500 5.5.2 Error: bad syntax\r\n" * 5 + b"250 2.0.0 Ok\r\n"
    assert conn.commands == 6
    assert conn.kinds() == ["connect", "command"]  # blank lines carry nothing to record


def test_redis_ignores_degenerate_commands_like_redis_and_answers_the_next_one():
    conn = Conn("redis")
    conn.feed(b"\r\n*0\r\n*-1\r\n  \r\nPING\r\n")
    assert conn.transport.value() == b"-NOAUTH Authentication required.\r\n"
    assert conn.commands == 5


def test_an_ssh_packet_with_no_payload_is_a_protocol_error_not_a_traceback(host_keys):
    conn = Conn("ssh", host_keys)
    conn.feed(SSH_HELLO + struct.pack("!LB", 12, 11) + b"\x00" * 11)
    assert conn.reason() == "protocol-error"


def test_an_ssh_kexinit_that_does_not_parse_closes_with_protocol_error(host_keys):
    conn = Conn("ssh", host_keys)
    conn.feed(SSH_HELLO + ssh_packet(b"\x14" + b"\xff" * 20))
    assert conn.reason() == "protocol-error"


def test_the_ssh_decoy_never_offers_compression_before_authentication(host_keys):
    conn = Conn("ssh", host_keys)
    assert conn.proto.supportedCompressions == [b"none", b"zlib@openssh.com"]


def test_telnet_subnegotiation_is_bounded_and_an_unknown_command_is_refused():
    conn = Conn("telnet")
    conn.feed(b"\xff\xfa\x18" + b"z" * 5000)
    assert conn.reason() == "protocol-error"
    conn = Conn("telnet")
    conn.feed(b"\xff\x01")
    assert conn.reason() == "protocol-error"


def test_telnet_subnegotiations_and_option_requests_never_reach_the_captured_text():
    conn = Conn("telnet", max_attempts=1)
    conn.feed(b"ro\xff\xfa\x18\x00xterm\xff\xf0ot\xff\xfd\x01\r\n")
    conn.feed(b"pw\xff\xff!\r\x00")
    login = next(e for e in conn.events if e.kind == "login")
    assert dict(login.params)["user"] == b"root"
    assert dict(login.params)["password"] == b"pw\xff!"


def test_http_refuses_more_header_fields_than_apache_would():
    conn = Conn("http")
    conn.feed(b"GET / HTTP/1.1\r\n" + b"a:b\r\n" * 101 + b"\r\n")
    assert conn.transport.value().startswith(b"HTTP/1.1 400 Bad Request")
    assert conn.reason() == "protocol-error"


# -- pacing: no connection holds the reactor -----------------------------------


def test_a_flood_on_one_connection_is_parsed_a_bounded_batch_per_reactor_turn():
    conn = Conn("redis")
    conn.proto.dataReceived(b"PING\r\n" * 5000)
    assert conn.commands == TURN_ITEMS
    assert conn.transport.producerState == "paused"  # not reading until its next turn
    conn.clock.advance(0)
    assert conn.commands == 2 * TURN_ITEMS
    conn.settle()
    assert conn.reason() == "command-limit"


def test_connections_take_turns_and_one_turn_spends_at_most_the_slice():
    clock = TurnClock()
    ticks = iter(range(10**9))
    # Every item "takes" 1 ms; the slice is 5 ms.
    turns = TurnBudget(clock, slice=0.005, items=1000, timer=lambda: next(ticks) / 1000)
    a = Conn("redis", turns=turns, clock=clock)
    b = Conn("redis", turns=turns, clock=clock)
    a.proto.dataReceived(b"PING\r\n" * 100)
    b.proto.dataReceived(b"PING\r\n" * 100)
    assert a.commands > 0 and b.commands == 0  # b read in a spent turn: it waits
    previous = a.commands + b.commands
    served = []
    for _ in range(10):
        clock.advance(0)
        assert a.commands + b.commands - previous <= 5  # at most a slice of items per turn
        previous = a.commands + b.commands
        served.append((a.commands, b.commands))
    assert served[-1][0] > 10 and served[-1][1] > 10  # both progress, in turn


def test_a_client_that_does_not_read_its_replies_stops_being_read():
    conn = Conn("redis")
    conn.proto.pauseProducing()  # what the transport does when its write buffer is full
    conn.proto.dataReceived(b"PING\r\n" * 10)
    assert conn.commands == 0
    conn.proto.resumeProducing()
    assert conn.commands == 10


# -- time budgets --------------------------------------------------------------


def test_a_connection_that_keeps_trickling_is_closed_at_its_lifetime_limit():
    conn = Conn("telnet", idle_timeout=10, max_lifetime=30)
    for _ in range(5):
        conn.clock.advance(9)  # never idle for 10 s
        conn.feed(b"a")
    assert conn.closed
    assert conn.reason() == "lifetime-limit"


def test_a_closed_connection_whose_peer_does_not_read_is_aborted_after_a_grace_period():
    conn = Conn("ftp")
    conn.feed(b"QUIT\r\n")
    assert conn.transport.disconnecting and not conn.transport.disconnected
    conn.clock.advance(CLOSE_GRACE)
    assert conn.transport.disconnected  # abortConnection
    assert conn.reason() == "quit"


def test_the_idle_and_lifetime_timers_are_cancelled_when_the_connection_ends():
    conn = Conn("redis")
    conn.feed(b"PING\r\n")
    conn.clock.advance(0)
    conn.lose()
    assert conn.clock.getDelayedCalls() == []


# -- the inbox itself ----------------------------------------------------------


def test_next_line_resumes_its_search_where_it_stopped():
    inbox = Inbox()
    for byte in b"abcdef":
        inbox.extend(bytes([byte]))
        assert inbox.next_line(b"\r\n", 100) is None
    inbox.extend(b"\r")
    assert inbox.next_line(b"\r\n", 100) is None
    inbox.extend(b"\nz")
    assert inbox.next_line(b"\r\n", 100) == b"abcdef"
    # Each search looks again at most at the byte that could start "\r\n".
    assert inbox.scanned <= 2 * inbox.received
    assert len(inbox) == 1


def test_next_line_reports_a_line_over_the_limit_without_scanning_past_it():
    inbox = Inbox()
    inbox.extend(b"x" * 100_000)
    assert inbox.next_line(b"\n", 10) is TOO_LONG
    assert inbox.scanned <= 11


def test_telnet_option_requests_are_refused_in_one_write_and_each_counted():
    conn = Conn("telnet")
    conn.transport.clear()
    conn.feed(b"\xff\xfb\x05" * 3 + b"\xff\xfd\x03\xff\xfc\x07\xff\xfe\x08")
    # WILL STATUS gets DONT STATUS each time, DO SGA gets WONT SGA; WONT and
    # DONT of an option that is off need no answer (as Conch's RFC 1143 says).
    assert conn.transport.value() == b"\xff\xfe\x05" * 3 + b"\xff\xfc\x03"
    assert conn.commands == 6
    # ECHO is negotiated for real (the password prompt turns it on).
    conn.transport.clear()
    conn.feed(b"\xff\xfd\x01")
    assert conn.transport.value() == b"\xff\xfb\x01"


def test_meaningless_plaintext_ssh_packets_are_counted_in_one_pass(host_keys):
    conn = Conn("ssh", host_keys)
    conn.feed(SSH_HELLO + ssh_packet(b"\x02") * 5 + ssh_packet(b"\x04\x00" + b"\x00" * 8))
    assert conn.commands == 1 + 6  # the version line, then the packets
    assert conn.proto.incomingPacketSequence == 6
    conn.transport.clear()
    conn.feed(ssh_packet(b"\xc8"))  # an unknown message type: answered with UNIMPLEMENTED
    assert conn.commands == 8
    # One 16-byte packet: length 12, 6 bytes of padding, UNIMPLEMENTED, sequence number 7.
    answer = conn.transport.value()
    assert len(answer) == 16 and answer[:10] == b"\x00\x00\x00\x0c\x06\x03\x00\x00\x00\x07"
    assert conn.proto.outgoingPacketSequence == 2  # KEXINIT, then this


# -- the HTTP decoy's chunked decoder ------------------------------------------


def decode_chunked(decoder_class, body: bytes, cuts) -> tuple[list[bytes], bytes | None]:
    chunks, done = [], []
    if decoder_class is http.ChunkedBody:
        decoder = decoder_class(lambda data, count: chunks.append(data), done.append)
    else:
        decoder = decoder_class(chunks.append, done.append)
    at = 0
    for cut in [*sorted(set(cuts)), len(body)]:
        if done:
            break
        decoder.dataReceived(body[at:cut])
        at = max(at, cut)
    return chunks, (done[0] if done else None)


chunk_bodies = st.lists(st.binary(min_size=1, max_size=40), max_size=12).map(
    lambda parts: (
        b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts)
        + b"0\r\nX-Trailer: 1\r\n\r\nGET /next HTTP/1.1\r\n"
    )
)


@settings(max_examples=200, deadline=None)
@given(body=chunk_bodies, cuts=st.lists(st.integers(min_value=0, max_value=600), max_size=20))
def test_the_chunked_decoder_agrees_with_twisted_web_however_the_body_is_cut(body, cuts):
    from twisted.web.http import _ChunkedTransferDecoder

    ours = decode_chunked(http.ChunkedBody, body, cuts)
    theirs = decode_chunked(_ChunkedTransferDecoder, body, cuts)
    assert b"".join(ours[0]) == b"".join(theirs[0])
    # What followed the body in the read that ended it is handed back.
    assert ours[1] == theirs[1] and b"GET /next HTTP/1.1\r\n".startswith(ours[1])


@pytest.mark.parametrize(
    "body",
    [b"z\r\n", b"1\r\nab\r\n", b"1;ext=\x00\r\na\r\n", b"1" * 1100, b"0\r\n" + b"a" * 20000],
    ids=["not hex", "no CRLF after data", "control in extension", "long size line", "trailers"],
)
def test_a_malformed_chunked_body_is_a_400_that_closes(body):
    conn = Conn("http")
    conn.feed(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
    assert conn.transport.value().startswith(b"HTTP/1.1 400 Bad Request")
    assert conn.reason() == "protocol-error"


def test_a_chunked_post_is_captured_and_the_next_request_served():
    conn = Conn("http")
    conn.feed(
        b"POST /login HTTP/1.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n9\r\nusername=\r\nf\r\nadmin&password=\r\n"
        b"2\r\npw\r\n0\r\n\r\nGET /x HTTP/1.1\r\n\r\n"
    )
    login = next(e for e in conn.events if e.kind == "login")
    assert dict(login.params)["user"] == b"admin" and dict(login.params)["password"] == b"pw"
    assert conn.transport.value().count(b"HTTP/1.1 ") == 2


# -- event lines stay exact while they got cheaper --------------------------------


@settings(max_examples=300, deadline=None)
@given(ts=st.floats(min_value=0, max_value=4e9, allow_nan=False))
def test_event_timestamps_are_the_strftime_text_whatever_the_cache_holds(ts):
    import datetime

    from decnet.syslog.rfc5424 import format_timestamp

    expected = datetime.datetime.fromtimestamp(ts, datetime.UTC)
    assert format_timestamp(ts) == expected.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert format_timestamp(ts + 0.5) == (
        datetime.datetime.fromtimestamp(ts + 0.5, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    )


def test_a_header_field_with_characters_outside_printusascii_is_still_replaced():
    from decnet.agent.eventlog import Event, format_event

    line = format_event(Event("web 01", "ssh", "kex\x00", (("a", "b"),)), 0.0)
    assert line == b'<134>1 1970-01-01T00:00:00.000000Z web_01 ssh - kex_ [decnet@32473 a="b"]\n'


def test_every_chunk_of_a_chunked_body_counts_toward_the_command_cap():
    conn = Conn("http")
    conn.feed(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1\r\nz\r\n" * 1200)
    assert conn.reason() == "command-limit"
    assert conn.kinds() == ["connect", "disconnect"]  # the request never completed


def test_an_unknown_message_for_the_ssh_auth_service_is_answered_without_a_log_line(host_keys):
    from twisted.logger import globalLogPublisher

    conn = Conn("ssh", host_keys)
    service = ssh.DecoyUserAuth()
    service.transport = conn.proto
    conn.proto.service = service
    logged = []
    globalLogPublisher.addObserver(logged.append)
    try:
        conn.transport.clear()
        conn.proto.dispatchMessage(200, b"junk")
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert conn.transport.value()[5:6] == b"\x03"  # UNIMPLEMENTED
    assert logged == []


def test_a_chunk_that_arrives_over_several_reads_must_still_end_in_crlf():
    from twisted.web.http import _MalformedChunkedDataError

    chunks = []
    decoder = http.ChunkedBody(lambda data, count: chunks.append((data, count)), pytest.fail)
    decoder.dataReceived(b"3\r\nab")
    decoder.dataReceived(b"c")
    with pytest.raises(_MalformedChunkedDataError, match="chunk not followed by CRLF"):
        decoder.dataReceived(b"xy")
    assert chunks == [(b"ab", 1), (b"c", 0)]  # a chunk is counted where its size line is


def test_bytes_after_the_end_of_a_chunked_body_are_refused():
    from twisted.web.http import _MalformedChunkedDataError

    chunks, done = [], []
    decoder = http.ChunkedBody(lambda data, count: chunks.append((data, count)), done.append)
    decoder.dataReceived(b"2\r\nhi\r\n0\r\nX-A: 1\r\n\r\nnext")
    assert chunks == [(b"hi", 1)] and done == [b"next"]
    with pytest.raises(_MalformedChunkedDataError, match="data after the last chunk"):
        decoder.dataReceived(b"more")


def resp_commands(data: bytes, cuts) -> list:
    inbox = Inbox()
    parser = redis.RespParser(inbox)
    commands, at = [], 0
    for cut in [*sorted(set(cuts)), len(data)]:
        inbox.extend(data[at:cut])
        at = max(at, cut)
        while (command := parser.next_command()) is not None:
            commands.append(command)
    return commands


@settings(max_examples=100, deadline=None)
@given(
    argvs=st.lists(st.lists(st.binary(max_size=12), min_size=1, max_size=5), max_size=5),
    cuts=st.lists(st.integers(min_value=0, max_value=300), max_size=12),
)
def test_resp_requests_parse_to_the_same_arguments_however_they_are_cut(argvs, cuts):
    data = b"*0\r\n\n" + b"".join(
        b"*%d\r\n" % len(argv) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in argv)
        for argv in argvs
    )
    commands = resp_commands(data, cuts)
    # A run of degenerate commands may be counted in pieces, never differently.
    assert sum(c for c in commands if isinstance(c, int)) == 2
    assert [c for c in commands if not isinstance(c, int)] == argvs


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"*x\r\n", "invalid multibulk length"),
        (b"*1025\r\n", "invalid multibulk length"),
        (b"*1\r\n$x\r\n", "invalid bulk length"),
        (b"*1\r\n$-2\r\n", "invalid bulk length"),
        (b"*1\r\n:1\r\n", "expected '$', got ':'"),
        (b"*1\r\n$1" + b"0" * 40, "invalid bulk length"),
    ],
)
def test_a_malformed_resp_header_is_refused_in_redis_words(data, problem):
    with pytest.raises(redis.RespError) as caught:
        resp_commands(data, range(len(data)))
    assert str(caught.value) == problem
