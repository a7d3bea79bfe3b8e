"""RFC 5424 parser (lenient, typed errors) and formatter (escaping), round trips."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from decnet.syslog import rfc5424
from decnet.syslog.rfc5424 import BOM, ParseError, SDElement, format_message, parse


def test_every_field_is_parsed():
    line = (
        b"<165>1 2003-10-11T22:14:15.003Z mymachine.example.com evntslog 1234 ID47 "
        b'[exampleSDID@32473 iut="3" eventSource="Application" eventID="1011"]'
        b'[examplePriority@32473 class="high"] ' + BOM + b"An application event"
    )
    m = parse(line)
    assert (m.facility, m.severity, m.version) == (20, 5, 1)
    assert m.timestamp == "2003-10-11T22:14:15.003Z"
    assert (m.hostname, m.app_name, m.procid, m.msgid) == (
        "mymachine.example.com",
        "evntslog",
        "1234",
        "ID47",
    )
    assert m.structured_data == (
        SDElement(
            "exampleSDID@32473",
            (("iut", "3"), ("eventSource", "Application"), ("eventID", "1011")),
        ),
        SDElement("examplePriority@32473", (("class", "high"),)),
    )
    assert m.bom and m.msg == b"An application event"


def test_nil_values_and_no_msg():
    m = parse(b"<0>1 - - - - - -")
    assert m.timestamp is m.hostname is m.app_name is m.procid is m.msgid is m.msg is None
    assert m.structured_data == ()


def test_sd_param_escapes_are_undone_and_other_backslashes_kept():
    m = parse(b'<14>1 - h a - - [x@1 v="a\\"b\\\\c\\]d\\ne"] m')
    assert m.structured_data[0].params == (("v", 'a"b\\c]d\\ne'),)


def test_a_cr_inside_msg_is_data():
    assert parse(b"<14>1 - h a - - - one\rtwo").msg == b"one\rtwo"


@pytest.mark.parametrize(
    "line, why",
    [
        (b"hello world", "PRI"),
        (b"<999>1 - - - - - -", "PRI"),
        (b"<14> - - - - - -", "VERSION"),
        (b"<14>1 yesterday h a - - - m", "TIMESTAMP"),
        (b"<14>1 - h a - - [broken m", "STRUCTURED-DATA"),
        (b"<14>1 - h a - - x m", "STRUCTURED-DATA"),
        (b"<14>1 - h\xff a - - - m", "non-printable"),
        (b"<14>1 - h a - - -m", "SP before MSG"),
    ],
)
def test_invalid_lines_raise_a_parse_error_saying_where(line, why):
    with pytest.raises(ParseError, match=why):
        parse(line)


def test_formatter_escapes_param_values():
    line = format_message(hostname="h", structured_data=[("x@1", [("p", 'q"]\\')])], msg=b"m")
    assert b'[x@1 p="q\\"\\]\\\\"]' in line
    assert parse(line).structured_data[0].params == (("p", 'q"]\\'),)


def test_formatter_refuses_bad_header_fields():
    with pytest.raises(ValueError):
        format_message(hostname="has space")
    with pytest.raises(ValueError):
        format_message(app_name="a" * 49)
    with pytest.raises(ValueError):
        format_message(structured_data=[("bad=id", [])])


def test_a_str_msg_gets_a_bom():
    line = format_message(msg="héllo")
    assert line.endswith(BOM + "héllo".encode())
    assert parse(line).msg == "héllo".encode()


printable = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1)
sd_name = st.text(
    st.characters(min_codepoint=33, max_codepoint=126, exclude_characters='= ]"'),
    min_size=1,
    max_size=32,
)
timestamps = st.one_of(
    st.none(),
    st.builds(
        "{:04d}-{:02d}-{:02d}T{:02d}:{:02d}:{:02d}{}Z".format,
        st.integers(0, 9999),
        st.integers(1, 12),
        st.integers(1, 28),
        st.integers(0, 23),
        st.integers(0, 59),
        st.integers(0, 59),
        st.sampled_from(["", ".1", ".123456"]),
    ),
)


@given(
    facility=st.integers(0, 23),
    severity=st.integers(0, 7),
    timestamp=timestamps,
    hostname=st.one_of(st.none(), printable.filter(lambda s: s != "-" and len(s) <= 255)),
    app_name=st.one_of(st.none(), printable.filter(lambda s: s != "-" and len(s) <= 48)),
    msgid=st.one_of(st.none(), printable.filter(lambda s: s != "-" and len(s) <= 32)),
    sd=st.lists(
        st.tuples(sd_name, st.lists(st.tuples(sd_name, st.text(max_size=20)), max_size=3)),
        max_size=3,
        unique_by=lambda e: e[0],
    ),
    msg=st.one_of(st.none(), st.binary(max_size=50).filter(lambda b: not b.startswith(BOM))),
)
def test_format_then_parse_round_trips(
    facility, severity, timestamp, hostname, app_name, msgid, sd, msg
):
    line = format_message(
        facility=facility,
        severity=severity,
        timestamp=timestamp,
        hostname=hostname,
        app_name=app_name,
        msgid=msgid,
        structured_data=sd,
        msg=msg,
    )
    m = parse(line)
    assert (m.facility, m.severity, m.timestamp) == (facility, severity, timestamp)
    assert (m.hostname, m.app_name, m.msgid) == (hostname, app_name, msgid)
    assert [(e.id, [list(p) for p in e.params]) for e in m.structured_data] == [
        (i, [list(p) for p in ps]) for i, ps in sd
    ]
    assert m.msg == msg
    # And the formatter reproduces the very same bytes from what was parsed.
    assert (
        format_message(
            facility=m.facility,
            severity=m.severity,
            timestamp=m.timestamp,
            hostname=m.hostname,
            app_name=m.app_name,
            procid=m.procid,
            msgid=m.msgid,
            structured_data=m.structured_data,
            msg=m.msg,
            bom=m.bom,
        )
        == line
    )


@given(st.binary(max_size=200))
def test_the_parser_never_crashes_on_hostile_bytes(data):
    try:
        rfc5424.parse(data)
    except ParseError:
        pass


def test_a_timestamp_in_seconds_is_written_in_utc_with_six_fraction_digits():
    line = format_message(timestamp=1767323045.25, hostname="h")
    assert line == b"<14>1 2026-01-02T03:04:05.250000Z h - - - -"
    assert parse(line).timestamp == "2026-01-02T03:04:05.250000Z"
