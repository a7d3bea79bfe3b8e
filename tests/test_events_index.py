"""The event index: every filter, exactly once, rebuilt when deleted, never reading the feeds."""

import os
import random
import sqlite3

import pytest

from decnet.errors import EventIndexError
from decnet.events import query
from decnet.events.index import EventIndex, index_path
from decnet.events.indexer import Indexer
from decnet.events.query import Filters, parse_network, parse_time
from decnet.listener import storage
from tests.events_support import (
    build_feeds,
    commit,
    event_line,
    feed_entries,
    index_all,
    ingest_with,
    reader,
)


def hour(h: int, minute: int = 0) -> str:
    return f"2026-05-01T{h:02d}:{minute:02d}:00.000000Z"


# (n, decky, service, event, src, user, hour, minute) of the test events, per worker.
FLEET = {
    "w1": [
        (0, "web-01", "ssh", "connect", "203.0.113.9", "root", 8, 0),
        (1, "web-01", "ssh", "login", "203.0.113.9", "root", 9, 0),
        (2, "db-01", "redis", "command", "198.51.100.4", None, 10, 0),
        (3, "web-01", "http", "request", "2001:db8::7", None, 11, 0),
    ],
    "w2": [
        (4, "mail-01", "smtp", "login", "203.0.113.200", "admin", 9, 30),
        (5, "mail-01", "ssh", "login", "2001:db8:1::9", "root", 12, 0),
    ],
}


@pytest.fixture
def fleet(tmp_path):
    """Two workers, events spread over a morning, two attackers per family."""
    ingest_with(
        tmp_path,
        {
            worker: [
                event_line(n, decky=d, service=s, kind=k, src=ip, user=u, when=hour(h, m))
                for n, d, s, k, ip, u, h, m in events
            ]
            for worker, events in FLEET.items()
        },
    )
    return tmp_path


def numbers(rows) -> list[int]:
    """The ``n`` parameter of each row's entry (which test event it is)."""
    return [int(query.event_params(query.parse_entry(line))["n"]) for _id, line in rows]


def search(ingest, limit=0, **filters) -> list[int]:
    index = reader(ingest)
    try:
        return numbers(index.query(Filters(**filters), limit))
    finally:
        index.close()


def test_a_search_returns_the_latest_matches_oldest_first(fleet):
    assert search(fleet) == [0, 1, 4, 2, 3, 5]
    assert search(fleet, limit=2) == [3, 5]


def test_each_filter_selects_what_it_names(fleet):
    assert search(fleet, workers=("w2",)) == [4, 5]
    assert search(fleet, workers=("w1", "w2"), event="login") == [1, 4, 5]
    assert search(fleet, decky="web-01") == [0, 1, 3]
    assert search(fleet, service="ssh") == [0, 1, 5]
    assert search(fleet, event="command") == [2]
    assert search(fleet, user="root") == [0, 1, 5]
    assert search(fleet, since=parse_time(hour(10))) == [2, 3, 5]
    assert search(fleet, until=parse_time(hour(10))) == [0, 1, 4]
    assert search(fleet, since=parse_time(hour(9)), until=parse_time(hour(11))) == [1, 4, 2]
    assert search(fleet, grep='"redis"') == [2]
    assert search(fleet, decky="nope") == []


def test_src_ip_takes_one_address_or_a_cidr_of_either_family(fleet):
    assert search(fleet, src=parse_network("203.0.113.9")) == [0, 1]
    assert search(fleet, src=parse_network("203.0.113.0/24")) == [0, 1, 4]
    assert search(fleet, src=parse_network("0.0.0.0/0")) == [0, 1, 4, 2]
    assert search(fleet, src=parse_network("2001:db8::/32")) == [3, 5]
    assert search(fleet, src=parse_network("2001:db8::7/128")) == [3]
    assert search(fleet, src=parse_network("::ffff:198.51.100.4")) == [2]


def test_the_acceptance_query_every_login_from_a_network_in_a_window_on_any_worker(fleet):
    filters = dict(event="login", src=parse_network("203.0.113.0/24"))
    assert search(fleet, since=parse_time(hour(9)), until=parse_time(hour(10)), **filters) == [1, 4]


def test_filtered_searches_are_index_range_scans(fleet):
    db = sqlite3.connect(index_path(fleet))
    cases = [
        Filters(src=parse_network("203.0.113.0/24"), since=0),
        Filters(workers=("w1",)),
        Filters(since=0),
        Filters(user="root", since=0),
    ]
    for filters in cases:
        sql, params = query.build_query(filters, limit=100)
        plan = " ".join(str(r[-1]) for r in db.execute("EXPLAIN QUERY PLAN " + sql, params))
        assert "USING INDEX" in plan and "SCAN events" not in plan, (filters, plan)


def test_each_entry_is_stored_unchanged(fleet):
    index = reader(fleet)
    stored = [query.parse_entry(line) for _id, line in index.query(Filters(workers=("w1",)), 0)]
    assert sorted(stored, key=lambda e: e["mirror_offset"]) == feed_entries(fleet, "w1")


def test_queries_never_read_the_feed_files(fleet):
    for path in fleet.glob("*/*"):
        if path.suffix in (".jsonl", ".log", ".idx"):
            os.chmod(path, 0)
    assert search(fleet, event="login") == [1, 4, 5]


def test_indexing_again_adds_nothing(fleet):
    index_all(fleet)
    index_all(fleet)
    assert reader(fleet).count() == 6


def test_two_indexers_at_once_index_every_line_exactly_once(tmp_path):
    commit(tmp_path, "w1", [event_line(i) for i in range(300)])
    build_feeds(tmp_path)
    files = storage.StreamFiles(tmp_path / "w1", "decnet")
    end = files.feed_path.stat().st_size
    a, b = EventIndex(index_path(tmp_path)), EventIndex(index_path(tmp_path))
    step = 2000  # a few lines per transaction, the two taking turns
    while a.position("w1", "decnet") < end:
        a.index_feed("w1", "decnet", files.feed_path, end, step)
        b.index_feed("w1", "decnet", files.feed_path, end, step)
    offsets = [r[0] for r in a.db.execute("SELECT mirror_offset FROM events ORDER BY id")]
    assert offsets == [e["mirror_offset"] for e in feed_entries(tmp_path, "w1")]
    assert a.positions() == {("w1", "decnet"): (end, 300)}


def test_a_deleted_index_is_rebuilt_from_the_feeds(fleet):
    before = search(fleet)
    for suffix in ("", "-wal", "-shm"):
        path = index_path(fleet).with_name(index_path(fleet).name + suffix)
        if path.exists():
            path.unlink()
    index_all(fleet)
    assert search(fleet) == before
    assert reader(fleet).count() == 6


def test_a_feed_rebuilt_from_the_mirror_adds_no_row_twice(fleet):
    storage.StreamFiles(fleet / "w1", "decnet").feed_path.unlink()
    build_feeds(fleet)  # the feed builder rebuilds it from byte 0, the same lines
    commit(fleet, "w1", [event_line(9, when=hour(13))])
    build_feeds(fleet)
    index_all(fleet)
    assert search(fleet, workers=("w1",)) == [0, 1, 2, 3, 9]


def test_a_line_that_is_not_a_feed_entry_stops_that_stream_only(fleet, capsys):
    commit(fleet, "w1", [event_line(7)])
    commit(fleet, "w2", [event_line(8)])
    build_feeds(fleet)
    feed = storage.StreamFiles(fleet / "w1", "decnet").feed_path
    data = feed.read_bytes()
    last = data.rstrip(b"\n").rfind(b"\n") + 1
    feed.write_bytes(data[:last] + b"\x1b[2J not json" + b" " * (len(data) - last - 14) + b"\n")
    indexer = index_all(fleet)
    assert indexer.stopped == {("w1", "decnet")}
    assert "w1/decnet is no longer indexed" in capsys.readouterr().err
    assert search(fleet, workers=("w2",)) == [4, 5, 8]
    assert 7 not in search(fleet)


def test_a_feed_changed_under_the_index_is_refused_not_duplicated(tmp_path):
    commit(tmp_path, "w1", [event_line(i) for i in range(3)])
    build_feeds(tmp_path)
    index_all(tmp_path)
    index = EventIndex(index_path(tmp_path))
    # Someone resets the position by hand: the rows are there already.
    index.db.execute("UPDATE positions SET feed_pos = 0")
    feed = storage.StreamFiles(tmp_path / "w1", "decnet").feed_path
    with pytest.raises(EventIndexError, match="already indexed"):
        index.index_feed("w1", "decnet", feed, feed.stat().st_size)
    assert index.count() == 3 and index.position("w1", "decnet") == 0


def test_hostile_values_are_stored_and_found_as_data(tmp_path):
    sql = "x'); DROP TABLE events; --"
    lines = [
        event_line(0, user=sql),
        event_line(1, user="\x1b]0;owned\x07\u202e", src="not-an-ip"),
        event_line(2, user="A" * 60_000),
    ]
    ingest_with(tmp_path, {"w1": lines})
    assert search(tmp_path, user=sql) == [0]
    assert search(tmp_path, user="\x1b]0;owned\x07\u202e") == [1]
    assert search(tmp_path, user="A" * 60_000) == [2]
    assert search(tmp_path, src=parse_network("0.0.0.0/0")) == [0, 2]  # junk has no address
    assert search(tmp_path, grep="DROP TABLE") == [0]


def test_the_index_file_is_private(fleet):
    assert os.stat(index_path(fleet)).st_mode & 0o077 == 0


def test_a_missing_index_says_who_builds_it(tmp_path):
    with pytest.raises(EventIndexError, match="feed process builds it"):
        EventIndex(index_path(tmp_path), readonly=True)


def test_an_indexer_waits_for_a_feed_being_rebuilt(fleet):
    feed = storage.StreamFiles(fleet / "w1", "decnet").feed_path
    position = reader(fleet).position("w1", "decnet")
    feed.unlink()  # the feed builder will rebuild it; until then it is shorter than the index
    indexer = Indexer(fleet)
    indexer.target("w1", "decnet", position + 100)  # told a length the feed does not have yet
    assert indexer.step() == 0
    assert indexer.behind() == [] and indexer.stopped == set()


def test_a_full_disk_pauses_indexing_and_loses_nothing(tmp_path, capsys):
    commit(tmp_path, "w1", [event_line(i, user="u" * 500) for i in range(400)])
    build_feeds(tmp_path)
    now = [0.0]
    index = EventIndex(index_path(tmp_path))
    indexer = Indexer(tmp_path, index, clock=lambda: now[0])
    indexer.scan()
    pages = index.db.execute("PRAGMA page_count").fetchone()[0]
    index.db.execute(f"PRAGMA max_page_count = {pages + 2}")  # SQLITE_FULL, as a full disk
    assert indexer.step() == 0
    assert "database or disk is full" in capsys.readouterr().err
    assert indexer.behind() == [] and indexer.wait() == pytest.approx(5.0)
    assert index.count() == 0 and index.position("w1", "decnet") == 0
    index.db.execute("PRAGMA max_page_count = 1073741823")  # space again
    now[0] += 5.0
    while indexer.step() >= 0:
        pass
    assert search(tmp_path) == list(range(400)) and indexer.stopped == set()


def test_a_worker_cannot_file_its_events_under_another_worker(tmp_path):
    lying = event_line(0, decky="w2", extra=(("source_worker", "w2"), ("worker", "w2")))
    ingest_with(tmp_path, {"w1": [lying], "w2": [event_line(1)]})
    assert search(tmp_path, workers=("w2",)) == [1]
    assert search(tmp_path, workers=("w1",)) == [0]


def _written() -> int:
    with open("/proc/self/io") as io:
        return int(dict(line.split(": ") for line in io.read().splitlines())["wchar"])


def test_indexing_writes_about_twice_the_feed_not_five_times(tmp_path):
    """What the index writes competes with the feed for the disk.  Attackers come from
    everywhere, so each row changes the address index at a random page: small
    transactions and a checkpoint after each one wrote every such page again and again."""
    rng = random.Random(7)
    pool = [
        f"198.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}" for _ in range(5000)
    ]
    lines = [event_line(i, src=rng.choice(pool), user=f"user{i % 50}") for i in range(20_000)]
    commit(tmp_path, "w1", lines)
    build_feeds(tmp_path)
    feed = storage.StreamFiles(tmp_path / "w1", "decnet").feed_path.stat().st_size
    indexer = Indexer(tmp_path)
    indexer.scan()
    before = _written()
    while indexer.step() >= 0:
        pass
    written = _written() - before
    indexer.close()
    assert reader(tmp_path).count() == len(lines)
    assert written < 3 * feed, f"{written / len(lines):.0f} bytes written per row"
