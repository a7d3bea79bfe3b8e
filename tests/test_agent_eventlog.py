"""RFC 5424 event lines (decnet.agent.eventlog): exact format, escaping, caps, the writer."""

import os
import re

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor

from decnet import config
from decnet.agent.eventlog import (
    SEVERITY_NOTICE,
    Event,
    EventLog,
    decode_value,
    escape_value,
    format_event,
)

T = 1767323045.25  # 2026-01-02T03:04:05.25Z

# RFC 5424 ABNF, enough to check that a line is one well-formed message with
# one SD-ELEMENT whose values contain no unescaped '"', '\' or ']'.
SYSLOG_RE = re.compile(
    r"^<\d{1,3}>1 \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z [!-~]{1,255} [!-~]{1,48} - [!-~]{1,32} "
    r'\[decnet@32473(?: [^= \]"]{1,32}="(?:[^"\\\]]|\\["\\\]])*")*\]\n$'
)


def line(*params, kind="login", severity=SEVERITY_NOTICE) -> bytes:
    return format_event(Event("web-01", "ssh", kind, tuple(params), severity), T)


def test_an_event_is_one_rfc5424_line_with_decky_service_and_kind_in_the_header():
    got = line(("src_ip", "203.0.113.9"), ("src_port", 40022), ("user", "root"))
    assert got == (
        b"<133>1 2026-01-02T03:04:05.250000Z web-01 ssh - login "
        b'[decnet@32473 src_ip="203.0.113.9" src_port="40022" user="root"]\n'
    )
    assert SYSLOG_RE.match(got.decode())


def test_quote_backslash_and_bracket_are_escaped_per_rfc5424():
    got = line(("user", 'a"b]c\\d'))
    # '\' is first doubled by the printable layer, then each '\' escaped again.
    assert got.endswith(b' user="a\\"b\\]c\\\\\\\\d"]\n')
    assert SYSLOG_RE.match(got.decode())


def test_crlf_and_control_characters_never_break_the_line():
    got = line(("user", "root\r\n<13>1 fake - - - injected\x00\x1b[31m"))
    assert got.count(b"\n") == 1 and got.endswith(b"]\n")
    assert b"\r" not in got and b"\x00" not in got and b"\x1b" not in got
    assert b'user="root\\\\r\\\\n<13>1 fake - - - injected\\\\x00\\\\x1b[31m"' in got
    assert SYSLOG_RE.match(got.decode())


def test_invalid_utf8_bytes_are_escaped_and_recoverable():
    raw = b"\xff\xfeadmin\xc3\xa9"
    wire, cut = escape_value(raw)
    assert not cut
    assert wire == "\\\\xff\\\\xfeadminé"
    assert decode_value(wire).encode("utf-8", "surrogateescape") == raw


def test_unicode_line_separators_and_bidi_overrides_are_escaped():
    wire, _ = escape_value("a\u2028b\u202ec\x85")
    assert wire == "a\\\\u2028b\\\\u202ec\\\\u0085"


@given(st.text() | st.binary())
def test_escaping_round_trips_any_input(value):
    wire, cut = escape_value(value, limit=100_000)
    assert not cut
    assert "\n" not in wire and "\r" not in wire
    original = value if isinstance(value, str) else value.decode("utf-8", "surrogateescape")
    assert decode_value(wire) == original


@given(st.binary(max_size=3000))
def test_any_value_yields_one_well_formed_capped_line(value):
    got = line(("user", value), ("password", value), ("command", value))
    assert SYSLOG_RE.match(got.decode("utf-8", "surrogatepass"))
    assert len(got) <= config.EVENT_LINE_MAX


def test_values_are_capped_without_cutting_an_escape_and_listed_in_trunc():
    got = line(("user", "\x00" * 300))
    value = re.search(rb'user="([^"]*)"', got).group(1)
    assert len(value) <= 256 and value.endswith(b"\\\\x00")
    assert got.endswith(b' trunc="user"]\n')


def test_a_line_never_exceeds_the_maximum_even_with_many_big_fields():
    params = [(f"f{i}", "\x01" * 5000) for i in range(40)]
    got = format_event(Event("d", "http", "request", tuple(params)), T)
    assert len(got) <= config.EVENT_LINE_MAX
    assert got.endswith(b"]\n")


def test_none_values_are_left_out():
    assert line(("user", "x"), ("password", None)) == line(("user", "x"))


def test_every_event_line_is_written_by_the_log_pipelines_rfc5424_formatter(monkeypatch):
    from decnet.syslog import rfc5424

    calls = []
    original = rfc5424.format_message

    def recording(**fields):
        calls.append(fields)
        return original(**fields)

    monkeypatch.setattr(rfc5424, "format_message", recording)
    got = line(("user", 'a"b'), ("password", None))
    (fields,) = calls
    assert got == original(**fields) + b"\n"
    assert fields["structured_data"] == [(config.EVENT_SD_ID, [("user", 'a"b')])]
    assert (fields["hostname"], fields["app_name"], fields["msgid"]) == ("web-01", "ssh", "login")


def test_header_fields_take_the_rfc5424_limits():
    from decnet.syslog import rfc5424

    got = format_event(Event("h" * 300, "a" * 60, "k" * 40, ()), T)
    head = got.split(b" ")
    assert [len(field) for field in head[2:6]] == [
        rfc5424.MAX_HOSTNAME,
        rfc5424.MAX_APP_NAME,
        1,  # PROCID: NILVALUE
        rfc5424.MAX_MSGID,
    ]


def test_header_fields_are_sanitised():
    got = format_event(Event("bad name", "a\nb", "kind", ()), T)
    assert got.startswith(b"<134>1 2026-01-02T03:04:05.250000Z bad_name a_b - kind [")


# -- the writer --------------------------------------------------------------


@pytest.fixture
def started_log(tmp_path):
    log = EventLog(tmp_path / "log" / "decnet.log", reactor, now=lambda: T)
    log.startService()
    yield log
    if log.running:
        pytest_twisted.blockon(log.stopService())


@pytest_twisted.ensureDeferred
async def test_the_writer_appends_whole_lines_in_emit_order(started_log):
    for i in range(2000):
        started_log.emit(Event("d", "redis", "command", (("n", i), ("pad", "x" * (i % 300)))))
    await started_log.flush()
    lines = started_log.path.read_bytes().split(b"\n")
    assert lines[-1] == b""
    assert [int(re.search(rb'n="(\d+)"', ln).group(1)) for ln in lines[:-1]] == list(range(2000))
    assert started_log.written_lines == 2000


@pytest_twisted.ensureDeferred
async def test_the_writer_follows_a_rotated_file(started_log):
    started_log.emit(Event("d", "ftp", "connect", ()))
    await started_log.flush()
    os.rename(started_log.path, started_log.path.with_suffix(".1"))
    started_log.emit(Event("d", "ftp", "disconnect", ()))
    await started_log.flush()
    assert b" connect " in started_log.path.with_suffix(".1").read_bytes()
    assert b" disconnect " in started_log.path.read_bytes()
    assert b" connect " not in started_log.path.read_bytes()


@pytest_twisted.ensureDeferred
async def test_a_torn_last_line_is_terminated_before_new_lines(tmp_path):
    path = tmp_path / "decnet.log"
    path.write_bytes(b"<134>1 complete line\n<134>1 torn by a cra")
    log = EventLog(path, reactor, now=lambda: T)
    log.startService()
    log.emit(Event("d", "ftp", "connect", ()))
    await log.stopService()
    lines = path.read_bytes().split(b"\n")
    assert lines[1] == b"<134>1 torn by a cra"
    assert lines[2].startswith(b"<134>1 2026-01-02T03:04:05.250000Z d ftp - connect [")


@pytest_twisted.ensureDeferred
async def test_a_stalled_disk_drops_and_counts_instead_of_buffering_without_bound(tmp_path):
    log = EventLog(tmp_path / "decnet.log", reactor, now=lambda: T, max_pending=1000)
    # Not started: nothing drains, so the queue fills up.
    for _ in range(100):
        log.emit(Event("d", "ftp", "connect", ()))
    assert log.dropped > 0
    assert log.pending_bytes <= 1000
    log.startService()
    await log.stopService()
    assert len(log.path.read_bytes().splitlines()) == 100 - log.dropped


@given(st.binary(max_size=40), st.text(max_size=20))  # small enough never to be capped
def test_lines_parse_with_the_log_pipelines_rfc5424_parser_and_values_round_trip(raw, text):
    from decnet.agent.eventlog import decode_printable
    from decnet.syslog.rfc5424 import parse

    got = line(("user", raw), ("password", text))
    message = parse(got.rstrip(b"\n"))
    assert (message.hostname, message.app_name, message.msgid) == ("web-01", "ssh", "login")
    (element,) = message.structured_data
    params = dict(element.params)
    assert element.id == config.EVENT_SD_ID
    assert decode_printable(params["user"]).encode("utf-8", "surrogateescape") == raw
    assert decode_printable(params["password"]) == text
