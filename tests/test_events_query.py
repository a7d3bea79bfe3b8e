"""The pure parts of ``decnet-admin events``: filter parsing, address keys, the SQL, index rows."""

import ipaddress
import sqlite3

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from decnet.errors import FilterError
from decnet.events import query
from decnet.events.query import Filters, build_query, ip_key, parse_network
from decnet.listener.feed import feed_record
from tests.events_support import event_line

S = 1_000_000


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("15m", 900), ("1h", 3600), ("1h30m", 5400), ("2d", 172800), ("1w", 604800)],
)
def test_durations_are_a_number_and_a_unit(text, seconds):
    assert query.parse_duration(text) == seconds * S


@pytest.mark.parametrize("text", ["", "1", "h", "1y", "-1h", "1.5h", "1 h", "1H", "9" * 12 + "s"])
def test_a_mistyped_duration_is_a_filter_error_that_shows_the_forms(text):
    with pytest.raises(FilterError, match="s m h d w"):
        query.parse_duration(text)


def test_since_is_a_duration_before_now_or_an_absolute_time():
    now = 1_777_000_000 * S
    assert query.parse_since("1h", now) == now - 3600 * S
    assert query.parse_since("2026-05-01T12:00:00Z", now) == query.parse_time("2026-05-01 12:00")
    with pytest.raises(FilterError, match="neither a duration"):
        query.parse_since("yesterday", now)


@pytest.mark.parametrize(
    ("text", "iso"),
    [
        ("2026-05-01", "2026-05-01T00:00:00+00:00"),
        ("2026-05-01 12:30", "2026-05-01T12:30:00+00:00"),
        ("2026-05-01T12:30:00Z", "2026-05-01T12:30:00+00:00"),
        ("2026-05-01T14:30:00+02:00", "2026-05-01T12:30:00+00:00"),
        ("2026-05-01T12:30:00.000250Z", "2026-05-01T12:30:00.000250+00:00"),
    ],
)
def test_times_are_rfc3339_or_a_date_and_time_in_utc(text, iso):
    import datetime

    assert query.parse_time(text) == query.micros_of(datetime.datetime.fromisoformat(iso))


@pytest.mark.parametrize("text", ["", "2026-13-01", "2026-05-01T25:00", "now", "1h", "05/01/2026"])
def test_a_mistyped_time_is_a_filter_error(text):
    with pytest.raises(FilterError, match="RFC 3339"):
        query.parse_time(text)


@pytest.mark.parametrize(
    "text", ["", "203.0.113", "203.0.113.0/33", "2001:db8::/129", "203.0.113.0/24x", "::g", "a/b"]
)
def test_a_mistyped_address_or_cidr_is_a_filter_error(text):
    with pytest.raises(FilterError, match="not an IP address or a CIDR"):
        parse_network(text)


def test_an_address_is_a_one_key_range_and_a_cidr_its_whole_block():
    one = parse_network("203.0.113.9")
    assert one[0] == one[1] == ip_key("203.0.113.9")
    lo, hi = parse_network("203.0.113.77/24")  # host bits allowed: the operator means the block
    assert (lo, hi) == (ip_key("203.0.113.0"), ip_key("203.0.113.255"))
    lo6, hi6 = parse_network("2001:db8::/32")
    assert lo6 == ip_key("2001:db8::") and hi6 == ip_key("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff")


def test_what_is_not_an_address_has_no_key():
    for junk in (None, 7, "", "localhost", "203.0.113.9; DROP TABLE events", "1" * 100):
        assert ip_key(junk) is None


addresses = st.one_of(
    st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address),
    st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address),
)


def _as_v6(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
    """An address as IPv6 (IPv4 as ``::ffff:a.b.c.d``, the form dual-stack decoys log)."""
    return int(address) | (0xFFFF << 32) if address.version == 4 else int(address)


@settings(max_examples=300, deadline=None)
@given(addresses, addresses, st.integers(0, 128))
def test_an_address_key_is_in_a_cidr_range_exactly_when_the_address_is_in_the_network(a, b, bits):
    network = ipaddress.ip_network(f"{b}/{min(bits, b.max_prefixlen)}", strict=False)
    lo, hi = parse_network(str(network))
    key = ip_key(str(a))
    inside = _as_v6(network.network_address) <= _as_v6(a) <= _as_v6(network.broadcast_address)
    assert (lo <= key <= hi) == inside
    if a.version == network.version:
        assert inside == (a in network)


def test_an_ipv4_address_and_its_ipv4_mapped_form_are_the_same_source():
    assert ip_key("::ffff:203.0.113.9") == ip_key("203.0.113.9")
    lo, hi = parse_network("203.0.113.0/24")
    assert lo <= ip_key("::ffff:203.0.113.200") <= hi
    assert not lo <= ip_key("2001:db8::1") <= hi


def test_values_are_parameters_never_sql_text():
    hostile = "x' OR 1=1; DROP TABLE events; --"
    filters = Filters(
        workers=(hostile, "w2"),
        decky=hostile,
        service=hostile,
        event=hostile,
        user=hostile,
        grep=hostile,
        src=parse_network("10.0.0.0/8"),
        since=1,
        until=2,
    )
    sql, params = build_query(filters, limit=5)
    assert hostile not in sql and "'" not in sql
    assert params.count(hostile) == 6 and params[-1] == 5
    db = sqlite3.connect(":memory:")
    db.execute(
        "CREATE TABLE events (id INTEGER PRIMARY KEY, worker, time, decky, service, event, "
        "src, user, entry)"
    )
    assert db.execute(sql, params).fetchall() == []


def test_a_search_is_newest_first_with_a_limit_and_a_follow_is_in_index_order():
    sql, params = build_query(Filters(), limit=0)
    assert sql == "SELECT id, entry FROM events ORDER BY time, id" and params == []
    sql, params = build_query(Filters(user="u"), limit=7)
    assert "ORDER BY time DESC, id DESC LIMIT ?) ORDER BY time, id" in sql
    assert params == ["u", 7]
    sql, params = build_query(Filters(event="login"), limit=10, after_id=42)
    assert "id > ?" in sql and sql.endswith("ORDER BY id LIMIT ?") and params == [42, "login", 10]


def test_an_index_row_takes_the_agent_fields_and_the_event_time():
    line = event_line(3, decky="web-01", service="ssh", kind="login", src="2001:db8::7", user="bob")
    entry = feed_record(
        line,
        worker="w1",
        stream="decnet",
        received_at="2026-05-01T12:00:05.000000Z",
        mirror_offset=77,
    )
    offset, when, received, decky, service, event, src, user = query.index_row(entry)
    assert (offset, decky, service, event, user) == (77, "web-01", "ssh", "login", "bob")
    assert src == ip_key("2001:db8::7")
    assert when == query.parse_time("2026-05-01T12:00:00.000001Z")
    assert received == query.parse_time("2026-05-01T12:00:05Z")


def test_an_unparsed_line_is_indexed_at_its_receive_time_with_no_fields():
    entry = feed_record(
        b"\x1b[2J garbage",
        worker="w1",
        stream="s",
        received_at="2026-05-01T12:00:05.000000Z",
        mirror_offset=0,
    )
    row = query.index_row(entry)
    assert row[1] == row[2] == query.parse_time("2026-05-01T12:00:05Z")
    assert row[3:] == (None, None, None, None, None)


def test_event_params_ignore_other_elements_and_malformed_pairs():
    entry = {
        "structured_data": [
            {"id": "other@1", "params": [["user", "not-this"]]},
            "junk",
            {
                "id": "decnet@32473",
                "params": [["user", "alice"], ["user", "second"], ["x"], 5, [[1], [2]]],
            },
        ]
    }
    assert query.event_params(entry) == {"user": "alice", "[1]": "[2]"}
    assert query.event_params({"structured_data": "junk"}) == {}
