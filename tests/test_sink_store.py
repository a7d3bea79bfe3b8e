"""The PostgreSQL store on a real private cluster: exactly once, poison kept, SQLite's answers."""

from __future__ import annotations

import itertools
import json
from concurrent.futures import ThreadPoolExecutor

import attrs
import psycopg
import pytest

from decnet.errors import EventIndexError
from decnet.events import query
from decnet.sink import rows
from decnet.sink.store import PgEvents, SchemaMismatch, SinkStore, StoreUnavailable
from tests.events_support import event_line, reader
from tests.sink_support import message_of, messages_for

_clock = itertools.count(1)


def _lines(n: int, when: str = "2026-05-01T12:00:00", **kw) -> list[bytes]:
    """``n`` events, each at its own microsecond (the stores order ties differently)."""
    return [event_line(i, when=f"{when}.{next(_clock):06d}Z", **kw) for i in range(n)]


def test_a_batch_written_twice_is_stored_once(tmp_path, pg_dsn):
    messages = messages_for(tmp_path, {"w1": _lines(5), "w2": _lines(3)})
    store = SinkStore(pg_dsn)
    assert store.write(messages)[:2] == (8, 0)
    assert store.write(messages[2:])[:2] == (0, 6)
    assert store.counts() == (8, 0)
    store.close()


def test_poison_messages_are_kept_in_the_rejected_table_and_never_fail_the_batch(tmp_path, pg_dsn):
    good = messages_for(tmp_path, {"w1": _lines(2)})
    bad = [message_of(b"\xff\xfe\x00garbage", "w1", 50), message_of(b"[]", "w1", 51)]
    store = SinkStore(pg_dsn)
    added, _dups, rejected = store.write([good[0], *bad, good[1]])
    assert added == 2 and [r.message.js_seq for r in rejected] == [50, 51]
    store.write(bad)  # delivered again: still kept once
    assert store.counts() == (2, 2)
    with psycopg.connect(pg_dsn) as conn:
        kept = conn.execute(
            f"SELECT js_seq, data, reason FROM {rows.REJECTED_TABLE} ORDER BY js_seq"  # noqa: S608
        ).fetchall()
    assert kept[0][:2] == (50, b"\xff\xfe\x00garbage") and "NUL byte" in kept[0][2]


def test_a_wrong_existing_schema_is_one_clear_error_and_nothing_is_changed(pg_dsn):
    with psycopg.connect(pg_dsn) as conn:
        conn.execute(f"CREATE TABLE {rows.EVENTS_TABLE} (worker text, entry jsonb)")
    store = SinkStore(pg_dsn)
    with pytest.raises(SchemaMismatch) as caught:
        store.open()
    text = str(caught.value)
    assert "\n" not in text and "decnet_events.entry is jsonb, not text" in text
    assert "decnet_events.src_ip is missing" in text


def test_an_unreachable_server_is_store_unavailable_not_a_crash(pg_cluster):
    store = SinkStore(f"host=127.0.0.1 port={pg_cluster.port + 1} user=postgres dbname=x")
    with pytest.raises(StoreUnavailable):
        store.write([])


FILTERS = [
    query.Filters(),
    query.Filters(workers=("w2",)),
    query.Filters(src=query.parse_network("203.0.113.0/24")),
    query.Filters(src=query.parse_network("2001:db8::/32")),
    query.Filters(src=query.parse_network("198.51.100.7")),
    query.Filters(user="bob", event="login"),
    query.Filters(decky="web-02", service="http"),
    query.Filters(grep='"n","3"'),
    query.Filters(since=query.parse_time("2026-05-01T12:00:00Z")),
    query.Filters(until=query.parse_time("2026-05-01T12:00:00Z")),
]


@pytest.mark.parametrize("limit", [0, 3])
def test_events_postgres_answers_every_filter_exactly_as_the_sqlite_index(tmp_path, pg_dsn, limit):
    workers = {
        "w1": _lines(4, src="203.0.113.9", user="bob")
        + _lines(2, src="::ffff:198.51.100.7", kind="connect", user=None),
        "w2": _lines(3, src="2001:db8::7", decky="web-02", service="http")
        + _lines(2, src="203.0.113.200", when="2026-04-30T23:00:00", user="bob"),
    }
    messages = messages_for(tmp_path, workers)
    SinkStore(pg_dsn).write(messages)
    sqlite, pg = reader(tmp_path), PgEvents(pg_dsn)
    try:
        for filters in FILTERS:
            want = [entry for _id, entry in sqlite.query(filters, limit)]
            got = [entry for _id, entry in pg.query(filters, limit)]
            assert got == want, filters
            assert want or filters.until is not None
    finally:
        sqlite.close()
        pg.close()


def test_follow_sees_rows_committed_after_its_snapshot_in_commit_order(tmp_path, pg_dsn):
    messages = messages_for(tmp_path, {"w1": _lines(6)})
    store = SinkStore(pg_dsn)
    store.write(messages[:2])
    pg = PgEvents(pg_dsn)
    backlog, after = pg.snapshot(query.Filters(), 10)
    assert len(backlog) == 2
    store.write(messages[2:])
    new = pg.follow(query.Filters(), after, 100)
    assert [e.encode() for _i, e in new] == [m.data for m in messages[2:]]
    pg.close()


def test_events_postgres_on_a_database_without_the_sink_says_what_to_do(pg_dsn):
    with pytest.raises(EventIndexError, match="twistd decnet-sink"):
        PgEvents(pg_dsn)


def test_two_sinks_writing_the_same_batch_at_once_store_each_event_once(tmp_path, pg_dsn):
    messages = messages_for(tmp_path, {"w1": _lines(50), "w2": _lines(50)})
    stores = [SinkStore(pg_dsn), SinkStore(pg_dsn)]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda s: s.write(messages), stores))
    assert sorted(r[0] for r in results) == [0, 100]
    assert sum(r[1] for r in results) == 100
    assert stores[0].counts() == (100, 0)
    with psycopg.connect(pg_dsn) as conn:
        ids = [i for (i,) in conn.execute(f"SELECT id FROM {rows.EVENTS_TABLE} ORDER BY id")]  # noqa: S608
    assert ids == list(range(ids[0], ids[0] + 100))  # one writer at a time: no interleaving


def test_a_row_postgres_refuses_is_rejected_alone_and_the_rest_of_the_batch_is_stored(
    tmp_path, pg_dsn
):
    good = messages_for(tmp_path, {"w1": _lines(3)})
    entry = json.loads(good[0].data)
    entry["mirror_offset"] = 2**70  # a lying publisher: beyond bigint
    liar = attrs.evolve(
        good[0],
        data=json.dumps(entry).encode(),
        headers={**good[0].headers, "Decnet-Offset": str(2**70), "Decnet-End": str(2**70 + 9)},
        js_seq=77,
    )
    store = SinkStore(pg_dsn)
    added, _dups, rejected = store.write([good[0], liar, good[1], good[2]])
    assert added == 3 and [r.message.js_seq for r in rejected] == [77]
    assert rejected[0].reason.startswith("PostgreSQL refused the row")
    assert store.counts() == (3, 1)
