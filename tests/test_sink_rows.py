"""The sink's pure part: a published event → one row, or a rejection that says why."""

from __future__ import annotations

import json

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from decnet.events import query
from decnet.listener import publishing
from decnet.sink import rows
from tests.events_support import event_line
from tests.sink_support import message_of, messages_for


def test_a_published_event_becomes_a_row_keyed_by_worker_stream_and_offset(tmp_path):
    line = event_line(1, decky="web-01", service="ssh", kind="login", src="203.0.113.9", user="bob")
    (message,) = messages_for(tmp_path, {"w1.dmz": [line]})
    row = rows.event_row(message)
    worker, stream, offset, _time, _recv, decky, service, event, src, user, entry, seq = row
    assert (worker, stream, decky, service, event, src, user) == (
        "w1.dmz", "decnet", "web-01", "ssh", "login", "203.0.113.9", "bob",
    )  # fmt: skip
    # The key is the line's logical offset (here, one listener and no gap: its mirror's).
    assert offset == int(message.headers[publishing.H_OFFSET])
    assert offset == json.loads(message.data)["mirror_offset"]
    assert entry.encode() == message.data and seq == message.js_seq


def test_an_ipv4_mapped_address_is_stored_as_ipv4_and_ipv6_stays_ipv6(tmp_path):
    lines = [event_line(1, src="::ffff:198.51.100.7"), event_line(2, src="2001:db8::7")]
    first, second = messages_for(tmp_path, {"w1": lines})
    assert rows.event_row(first)[8] == "198.51.100.7"
    assert rows.event_row(second)[8] == "2001:db8::7"


def test_nul_and_lone_surrogates_in_a_filter_column_become_u_fffd_and_the_entry_is_kept(tmp_path):
    (message,) = messages_for(tmp_path, {"w1": [event_line(1, user="ro\x00ot")]})
    row = rows.event_row(message)
    assert row[9] == "ro\ufffdot" and row[10].encode() == message.data
    assert rows.pg_text("a\ud800b\x00") == "a\ufffdb\ufffd"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"not json", "Expecting value"),
        (b"[1, 2]", "JSON object"),
        (b'{"mirror_offset": 5}', "not a feed entry"),
        (b'{"a": "\xff"}', "not UTF-8"),
        (b'{"a": "\x00"}', "NUL byte"),
        (b"{" + b" " * rows.MAX_ENTRY + b"}", "above"),
    ],
)
def test_garbage_is_rejected_with_a_specific_reason_never_raised(data, reason):
    message = message_of(data, "w1", 7)
    planned = rows.plan([message])
    assert planned.events == []
    (rejected,) = planned.rejected
    assert reason in rejected.reason and rejected.message is message
    js_stream, js_seq, _subject, headers, kept, _ = rejected.row()
    assert (js_stream, js_seq, kept) == ("DECNET", 7, data)
    assert json.loads(headers)[publishing.H_WORKER] == "w1"


def test_headers_that_lie_about_the_subject_or_the_offset_are_rejected(tmp_path):
    (message,) = messages_for(tmp_path, {"w1": [event_line(1)]})
    lies = [
        attrs.evolve(message, headers={**message.headers, publishing.H_OFFSET: "999999"}),
        attrs.evolve(message, headers={**message.headers, publishing.H_OFFSET: "-1"}),
        attrs.evolve(message, headers={**message.headers, publishing.H_END: "\u0661"}),
        attrs.evolve(message, headers={**message.headers, publishing.H_WORKER: "w2"}),
        attrs.evolve(message, subject="decnet.raw.w1.decnet"),
        attrs.evolve(message, subject="decnet.events.W1.decnet"),  # not a canonical token
    ]
    planned = rows.plan(lies)
    assert planned.events == [] and len(planned.rejected) == 6


def test_a_batch_keeps_good_rows_and_rejects_only_the_bad_ones(tmp_path):
    good = messages_for(tmp_path, {"w1": [event_line(i) for i in range(3)]})
    bad = message_of(b"\x1b[2Jgarbage", "w1", 99)
    planned = rows.plan([good[0], bad, good[1], good[2]])
    assert [r[-1] for r in planned.events] == [1, 2, 3]
    assert [r.message.js_seq for r in planned.rejected] == [99]


def test_a_wrong_existing_schema_is_named_column_by_column_and_absent_tables_are_fine():
    assert rows.schema_differences({}) == []
    assert rows.schema_differences({rows.EVENTS_TABLE: dict(rows.EVENT_COLUMNS)}) == []
    wrong = {**rows.EVENT_COLUMNS, "src_ip": "text"}
    del wrong["entry"]
    found = rows.schema_differences({rows.EVENTS_TABLE: wrong})
    assert found == [
        "decnet_events.src_ip is text, not inet",
        "decnet_events.entry is missing",
    ]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.text(max_size=20))
def test_any_bytes_under_any_subject_are_a_row_or_a_rejection(data, worker):
    subject = f"decnet.events.{worker}.x" if worker else "decnet.events.a.b"
    message = rows.Message(subject, {"Decnet-Offset": "0"}, data, "DECNET", 1)
    planned = rows.plan([message])
    assert len(planned.events) + len(planned.rejected) == 1


@settings(max_examples=300, deadline=None)
@given(st.ip_addresses(), st.integers(0, 128))
def test_a_cidr_filter_spelled_for_postgres_covers_the_same_range(address, bits):
    prefix = min(bits, address.max_prefixlen)
    text = f"{address}/{prefix}"
    lo, hi = query.parse_network(text)
    spelled = query.network_text(lo, hi)
    assert query.parse_network(spelled) == (lo, hi)


def test_filters_are_spelled_once_for_both_stores_with_only_parameters_for_values():
    filters = query.Filters(
        workers=("w1", "w2"), user="x'; DROP TABLE decnet_events;--",
        src=query.parse_network("203.0.113.0/24"), since=1, until=2, grep="%s",
    )  # fmt: skip
    sql, params = query.build_query(filters, limit=5, dialect=query.POSTGRES)
    assert "DROP" not in sql and "?" not in sql
    assert sql.count("%s") == len(params)
    assert "src_ip <<= %s::inet" in sql and "strpos(entry, %s)" in sql
    assert "203.0.113.0/24" in params
    lite, lite_params = query.build_query(filters, limit=5)
    assert "%s" not in lite and lite.count("?") == len(lite_params)
