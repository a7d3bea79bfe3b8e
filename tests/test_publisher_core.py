"""The publisher's pure decisions (decnet.listener.publishing), byte by byte."""

from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from decnet.listener import publishing as pub
from decnet.listener import storage
from decnet.listener.publisher import StreamJob, find_event_start
from decnet.listener.storage import IndexRecord
from tests.nats_support import IngestWriter, logical_lines, syslog_line

# -- subject tokens ----------------------------------------------------------------


def test_a_worker_name_with_dots_becomes_one_subject_token_and_back():
    assert pub.encode_token("web-01.dmz") == "web-01_2edmz"
    assert pub.decode_token("web-01_2edmz") == "web-01.dmz"
    assert pub.raw_subject("web-01.dmz", "auth.log") == "decnet.raw.web-01_2edmz.auth_2elog"
    assert pub.events_subject("w1", "a_b") == "decnet.events.w1.a_5fb"
    assert pub.parse_subject("decnet.raw.web-01_2edmz.auth_2elog") == (
        "raw",
        "web-01.dmz",
        "auth.log",
    )


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=40))
def test_every_name_round_trips_through_a_subject_safe_token(name):
    token = pub.encode_token(name)
    assert pub.decode_token(token) == name
    assert all(c.isascii() and (c.isalnum() or c in "-_") for c in token)
    assert not any(c in token for c in ".*> \t\r\n")


@pytest.mark.parametrize("token", ["", "a.b", "a_2", "a_zz", "A", "a>b", "a*", "a_2E"])
def test_a_token_that_is_not_a_canonical_encoding_is_refused(token):
    with pytest.raises(ValueError):
        pub.decode_token(token)


def test_an_escaped_character_that_needs_no_escape_is_not_canonical():
    with pytest.raises(ValueError, match="canonical"):
        pub.decode_token("_61")  # "a" spelled escaped


def test_message_ids_keep_raw_and_event_ids_apart():
    assert pub.raw_msg_id("w1", "auth", 120) == "raw/w1/auth/120"
    assert pub.event_msg_id("w1", "auth", 120) == "ev/w1/auth/120"


# -- planning raw messages ----------------------------------------------------------------


def _lines(n: int, start: int = 0) -> bytes:
    return b"".join(syslog_line(i) for i in range(start, start + n))


def _records(commits: list[tuple[int, int]]) -> list[IndexRecord]:
    """Index records from (mirror bytes, logical bytes) per commit (0 mirror: a gap)."""
    out, m, s = [], 0, 0
    for mirror, logical in commits:
        m += mirror
        s += logical
        out.append(IndexRecord(m, s, 7))
    return out


def test_small_commits_share_one_message_whose_end_is_the_last_commit_end():
    a, b = _lines(2), _lines(3, 2)
    records = _records([(len(a), len(a)), (len(b), len(b))])
    pieces = pub.plan_raw(pub.Cursor(), records, a + b, max_payload=10_000)
    assert pieces == [
        pub.RawPiece(
            0, len(a + b), 0, len(a + b), False, True, pub.Cursor(2, len(a + b), len(a + b))
        )
    ]


def test_a_commit_larger_than_the_limit_is_split_at_line_ends():
    data = _lines(10)
    line = len(syslog_line(0))
    records = _records([(len(data), len(data))])
    pieces = pub.plan_raw(pub.Cursor(), records, data, max_payload=3 * line + 5)
    assert [(p.start, p.end, p.exact) for p in pieces] == [
        (0, 3 * line, False),
        (3 * line, 6 * line, False),
        (6 * line, 9 * line, False),
        (9 * line, 10 * line, True),
    ]
    assert pieces[0].after == pub.Cursor(0, 3 * line, 3 * line)
    assert pieces[-1].after == pub.Cursor(1, 10 * line, 10 * line)
    assert b"".join(data[p.mirror_start : p.mirror_end] for p in pieces) == data


def test_a_gap_is_an_empty_message_of_its_own_between_data():
    a, b = _lines(1), _lines(1, 1)
    records = [
        IndexRecord(len(a), len(a), 1),
        IndexRecord(len(a), len(a) + 500, 1),  # bytes lost on the worker
        IndexRecord(len(a + b), len(a + b) + 500, 1),
    ]
    pieces = pub.plan_raw(pub.Cursor(), records, a + b, max_payload=10_000)
    assert [(p.start, p.end, p.gap, p.size) for p in pieces] == [
        (0, len(a), False, len(a)),
        (len(a), len(a) + 500, True, 0),
        (len(a) + 500, len(a + b) + 500, False, len(b)),
    ]
    gap = pieces[1]
    assert pub.raw_headers("w1", "auth", gap, 41) == {
        "Decnet-Worker": "w1",
        "Decnet-Stream": "auth",
        "Decnet-Start": str(len(a)),
        "Decnet-End": str(len(a) + 500),
        "Nats-Msg-Id": f"raw/w1/auth/{len(a) + 500}",
        "Nats-Expected-Last-Subject-Sequence": "41",
        "Decnet-Gap": "true",
    }


def test_a_moved_record_is_never_published_as_a_gap_the_publisher_waits_for_the_broker():
    """The worker was here up to len(a), moved away and came back at len(a) + 900: the
    bytes between are another listener's to publish, so planning stops at the move."""
    a, b = _lines(2), _lines(3, 2)
    moved_at = len(a) + 900
    records = [
        IndexRecord(len(a), len(a), 1),
        IndexRecord(len(a), moved_at, 1, moved=True),
        IndexRecord(len(a + b), moved_at + len(b), 1),
    ]
    pieces = pub.plan_raw(pub.Cursor(), records, a + b, max_payload=10_000)
    assert [(p.start, p.end, p.gap) for p in pieces] == [(0, len(a), False)]
    assert pub.waiting_for_move(pub.Cursor(), records) is None  # (data comes first)
    after_a = pieces[0].after
    assert pub.plan_raw(after_a, records[1:], b, max_payload=10_000) == []
    assert pub.waiting_for_move(after_a, records[1:]) == moved_at
    # The other listener's publisher got halfway: still waiting, not a gap.
    halfway = pub.locate(len(a) + 400, records.__getitem__, len(records))
    assert halfway == pub.Cursor(1, len(a), len(a) + 400)
    assert pub.plan_raw(halfway, records[1:], b, max_payload=10_000) == []
    assert pub.waiting_for_move(halfway, records[1:]) == moved_at
    # The broker reached the move: this mirror's next segment goes on from there.
    there = pub.locate(moved_at, records.__getitem__, len(records))
    assert there == pub.Cursor(2, len(a), moved_at)
    pieces = pub.plan_raw(there, records[2:], b, max_payload=10_000)
    assert [(p.start, p.end, p.gap, p.size) for p in pieces] == [
        (moved_at, moved_at + len(b), False, len(b))
    ]
    assert pub.waiting_for_move(there, records[2:]) is None


def test_planning_goes_on_from_a_cursor_inside_a_commit():
    data = _lines(6)
    line = len(syslog_line(0))
    records = _records([(len(data), len(data))])
    cursor = pub.Cursor(0, 2 * line, 2 * line)
    pieces = pub.plan_raw(cursor, records, data[2 * line :], max_payload=10_000)
    assert [(p.start, p.end, p.mirror_start, p.exact) for p in pieces] == [
        (2 * line, 6 * line, 2 * line, True)
    ]


def test_a_commit_with_truncated_lines_splits_at_mirror_lengths_below_its_end():
    data = _lines(4)
    line = len(syslog_line(0))
    records = _records([(len(data), len(data) + 1000)])  # the worker's lines were longer
    pieces = pub.plan_raw(pub.Cursor(), records, data, max_payload=2 * line)
    assert [(p.start, p.end, p.exact) for p in pieces] == [
        (0, 2 * line, False),
        (2 * line, 4 * line + 1000, True),
    ]


def test_an_index_that_goes_backwards_is_an_error_not_a_guess():
    records = [IndexRecord(100, 100, 1), IndexRecord(50, 150, 1)]
    with pytest.raises(pub.PublishError, match="backwards"):
        pub.plan_raw(pub.Cursor(), records, b"x" * 100, max_payload=1000)


@settings(max_examples=60, deadline=None)
@given(
    commits=st.lists(
        st.tuples(st.integers(0, 12), st.integers(0, 300), st.integers(0, 40)),
        min_size=1,
        max_size=12,
    ),
    limit_lines=st.integers(1, 8),
)
def test_pieces_concatenate_to_the_mirror_and_every_end_locates_its_cursor(commits, limit_lines):
    """(lines, gap before, truncated bytes) per commit; any max payload of whole lines."""
    data, records, m, s, line_no = bytearray(), [], 0, 0, 0
    for lines, gap, extra in commits:
        if gap:
            s += gap
            records.append(IndexRecord(m, s, 1))
        chunk = _lines(lines, line_no)
        line_no += lines
        if not chunk and not gap:
            continue
        data += chunk
        m += len(chunk)
        s += len(chunk) + (extra if chunk else 0)
        if chunk:
            records.append(IndexRecord(m, s, 1))
    limit = limit_lines * len(syslog_line(0))
    pieces = pub.plan_raw(pub.Cursor(), records, bytes(data), max_payload=limit)
    assert b"".join(data[p.mirror_start : p.mirror_end] for p in pieces) == data
    assert all(p.size <= limit for p in pieces)
    previous = 0
    for piece in pieces:
        assert piece.start == previous and piece.end > piece.start
        previous = piece.end
        assert pub.locate(piece.end, records.__getitem__, len(records)) == piece.after
        # Resuming from any piece's end plans exactly the rest.
        after = piece.after
        rest = pub.plan_raw(after, records[after.record :], bytes(data[after.mirror :]), limit)
        assert rest == pieces[pieces.index(piece) + 1 :]
    assert previous == (records[-1].stream_end if records else 0)


def test_the_broker_ahead_of_this_mirror_is_reported():
    records = [IndexRecord(10, 10, 1)]
    with pytest.raises(pub.BrokerAhead, match="offset 20"):
        pub.locate(20, records.__getitem__, 1)
    assert pub.locate(0, records.__getitem__, 0) == pub.Cursor()


def test_header_end_refuses_a_message_without_a_number():
    assert pub.header_end({"Decnet-End": "42"}) == 42
    for headers in (None, {}, {"Decnet-End": "-1"}, {"Decnet-End": "4 2"}):
        with pytest.raises(pub.PublishError, match="Decnet-End"):
            pub.header_end(headers)


# -- compare-and-set -------------------------------------------------------------------


def test_the_subject_sequence_is_named_read_again_after_a_fence():
    seq = pub.SubjectSequence()
    with pytest.raises(pub.PublishError):
        seq.expected()
    seq.learned(0)
    assert seq.expected() == 0
    seq.published(5)
    assert seq.expected() == 5
    with pytest.raises(pub.PublishError, match="after 5"):
        seq.published(5)
    seq.fenced()
    assert not seq.known and seq.fences == 1


# -- events -----------------------------------------------------------------------------


def test_event_headers_and_spans():
    item = pub.EventItem(77, 120, b"{}", pub.Cursor(1, 43, 120))
    assert pub.event_headers("w1", "auth", item, 3) == {
        "Decnet-Worker": "w1",
        "Decnet-Stream": "auth",
        "Decnet-Offset": "77",
        "Decnet-End": "120",
        "Nats-Msg-Id": "ev/w1/auth/77",
        "Nats-Expected-Last-Subject-Sequence": "3",
    }
    assert pub.event_headers("w1", "auth", item) == {
        "Decnet-Worker": "w1",
        "Decnet-Stream": "auth",
        "Decnet-Offset": "77",
        "Decnet-End": "120",
        "Nats-Msg-Id": "ev/w1/auth/77",
    }
    assert pub.feed_line_span(b'{"mirror_offset":12,"length":5,"x":1}') == (12, 5)
    for bad in (
        b"{}",
        b"nope",
        b'{"mirror_offset":-1,"length":1}',
        b'{"mirror_offset":"1","length":1}',
        b'{"mirror_offset":1}',
        b'{"mirror_offset":1,"length":true}',
    ):
        with pytest.raises(pub.PublishError):
            pub.feed_line_span(bad)
    assert pub.split_lines(b"a\nb\nc") == ([b"a", b"b"], 4)
    assert pub.split_lines(b"abc") == ([], 0)


def _feed(writer) -> list[tuple[int, int, bytes]]:
    lines = writer.files.feed_path.read_bytes().split(b"\n")[:-1]
    return [(*pub.feed_line_span(line), line) for line in lines]


def test_events_are_keyed_by_logical_offsets_across_gaps_and_moves(tmp_path):
    """A gap and a move shift the logical offsets away from the mirror's: every event
    carries the offset of its line in the worker's stream, whichever listener has it."""
    writer = IngestWriter(tmp_path)
    a, b, c = _lines(3), _lines(2, 3), _lines(4, 5)
    writer.commit(a)
    writer.commit(b, gap_before=500)
    moved_at = writer.offset + 900
    writer.files.commit(b"", [storage.IndexRecord(writer.mirror, moved_at, 1, moved=True)])
    writer.offset = moved_at
    writer.commit(c)
    writer.build_feed()
    records = storage.read_records(writer.files.index_path)
    lines = _feed(writer)
    items = pub.plan_events(pub.Cursor(), records, lines, limit=100)
    expected = logical_lines([(0, a), (len(a) + 500, b)])
    assert [(i.start, i.end) for i in items] == expected
    assert [i.line for i in items] == [line for _, _, line in lines[:5]]
    # The move stops the plan: the events below moved_at are the other listener's.
    last = items[-1].after
    assert pub.plan_events(last, records[last.record :], lines[5:], limit=100) == []
    assert pub.waiting_for_move(last, records[last.record :]) == moved_at
    there = pub.locate(moved_at, records.__getitem__, len(records))
    rest = pub.plan_events(there, records[there.record :], lines[5:], limit=100)
    assert [(i.start, i.end) for i in rest] == logical_lines([(moved_at, c)])
    # Every event's end locates the cursor just after it (how a publisher resumes).
    for item in items + rest:
        assert pub.locate(item.end, records.__getitem__, len(records)) == item.after
    writer.close()


def test_a_commit_with_truncated_lines_ends_its_last_event_at_the_commit_end(tmp_path):
    writer = IngestWriter(tmp_path)
    data = _lines(3)
    writer.commit(data, extra=70_000)  # (the worker's line was longer than the mirror's)
    writer.commit(_lines(1, 3))
    writer.build_feed()
    records = storage.read_records(writer.files.index_path)
    items = pub.plan_events(pub.Cursor(), records, _feed(writer), limit=100)
    line = len(syslog_line(0))
    assert [(i.start, i.end) for i in items] == [
        (0, line),
        (line, 2 * line),
        (2 * line, len(data) + 70_000),
        (len(data) + 70_000, len(data) + 70_000 + len(syslog_line(3))),
    ]
    writer.close()


def test_event_planning_stops_at_the_limit_and_where_the_feed_ends(tmp_path):
    writer = IngestWriter(tmp_path)
    writer.commit(_lines(5))
    writer.build_feed()
    writer.commit(_lines(5, 5))  # (not in the feed yet)
    records = storage.read_records(writer.files.index_path)
    lines = _feed(writer)
    assert len(pub.plan_events(pub.Cursor(), records, lines, limit=3)) == 3
    assert len(pub.plan_events(pub.Cursor(), records, lines, limit=100)) == 5
    writer.close()


def test_after_a_move_the_events_wait_for_the_other_listener_then_go_on_and_say_so(
    tmp_path, monkeypatch
):
    """The other listener publishes the events below the move; if it never does (it died
    with its disk), this one goes on from the move after MOVE_EVENTS_WAIT, once, loudly."""
    from types import SimpleNamespace

    from decnet.listener import publisher

    said = []
    owner = SimpleNamespace(
        directory=tmp_path, reporter=SimpleNamespace(send=said.append), events=True
    )
    job = publisher.StreamJob(owner, "w1", "auth")
    a, c = _lines(2), _lines(2, 2)
    records = [
        IndexRecord(len(a), len(a), 1),
        IndexRecord(len(a), 5000, 1, moved=True),
        IndexRecord(len(a + c), 5000 + len(c), 1),
    ]
    inside = pub.locate(1200, records.__getitem__, len(records))  # the other's events so far
    now = [100.0]
    monkeypatch.setattr(publisher.time, "monotonic", lambda: now[0])
    assert job._past_move(inside, records[inside.record :]) is False
    assert job.ev_cursor is None and "waiting for the events of w1/auth" in said[-1]["warn"]
    now[0] += publisher.MOVE_EVENTS_WAIT - 1
    assert job._past_move(inside, records[inside.record :]) is False
    assert len(said) == 1  # (said once)
    now[0] += 2
    assert job._past_move(inside, records[inside.record :]) is True
    assert job.ev_cursor == pub.Cursor(2, len(a), 5000)
    assert "from offset 1200 to 5000 did not reach the broker" in said[-1]["warn"]
    # Not at a move: nothing to wait for.
    assert job._past_move(pub.Cursor(), records[:1]) is False


def test_a_feed_that_disagrees_with_the_mirror_is_an_error_not_a_guess(tmp_path):
    writer = IngestWriter(tmp_path)
    writer.commit(_lines(3))
    writer.build_feed()
    records = storage.read_records(writer.files.index_path)
    lines = _feed(writer)
    with pytest.raises(pub.PublishError, match="feed's next line"):
        pub.plan_events(pub.Cursor(), records, lines[1:], limit=10)
    short = [IndexRecord(lines[0][1], lines[0][1], 1), *records]
    with pytest.raises(pub.PublishError, match="crosses the end"):
        pub.plan_events(pub.Cursor(), short, lines, limit=10)
    writer.close()


def test_the_event_after_a_mirror_offset_is_found_in_the_feed(tmp_path):
    writer = IngestWriter(tmp_path)
    for i in range(30):
        writer.commit(_lines(3, 3 * i))
    writer.build_feed()
    feed = writer.files.feed_path.read_bytes()
    starts = [0, *[i + 1 for i, c in enumerate(feed) if c == 10][:-1]]
    offsets = [pub.feed_line_span(feed[a:].split(b"\n", 1)[0])[0] for a in starts]
    for k, offset in enumerate(offsets):
        assert find_event_start(writer.files.feed_path, len(feed), offset) == (
            starts[k + 1] if k + 1 < len(starts) else len(feed)
        )
    assert find_event_start(writer.files.feed_path, len(feed), -1) == 0
    # Only the durable length counts: a longer file changes nothing.
    assert find_event_start(writer.files.feed_path, starts[5], offsets[10]) == starts[5]
    writer.close()


# -- the stream ----------------------------------------------------------------------------


def test_the_stream_we_create_and_how_another_differs():
    wanted = pub.stream_config("DECNET", 3, 1 << 20)
    assert wanted["subjects"] == ["decnet.>"] and wanted["storage"] == "file"
    assert wanted["num_replicas"] == 3 and wanted["duplicate_window"] == 600 * 10**9
    assert pub.config_differences(dict(wanted, max_msg_size=-1), wanted) == []
    other = dict(wanted, subjects=["other.>"], num_replicas=1, max_msg_size=1000)
    assert pub.config_differences(other, wanted) == [
        'subjects is ["other.>"], not ["decnet.>"]',
        "num_replicas is 1, not 3",
        "max_msg_size is 1000, below --nats-max-msg 1048576",
    ]


def test_a_message_limit_above_the_brokers_is_refused():
    assert pub.payload_limit(1 << 20, 1 << 20) == (1 << 20) - pub.HEADER_ROOM
    with pytest.raises(pub.PublishError, match="larger than the broker's max_payload 65536"):
        pub.payload_limit(1 << 20, 65536)


# -- a window of events in flight -----------------------------------------------------

DOWN = pub.Failure(True, "no PubAck")
REFUSED = pub.Failure(False, "refused")


def test_a_window_stored_whole_goes_on_after_its_last_event():
    assert pub.settle_window([5, 6, 7]) == pub.Settled(3, (), False, None)
    assert pub.settle_window([]) == pub.Settled(0, (), False, None)


def test_a_window_cut_short_goes_on_after_the_stored_prefix_and_names_the_failure():
    assert pub.settle_window([5, 6, DOWN, DOWN]) == pub.Settled(2, (), False, DOWN)
    assert pub.settle_window([DOWN, REFUSED]) == pub.Settled(0, (), False, DOWN)
    assert pub.settle_window([5, REFUSED, DOWN]) == pub.Settled(1, (), False, REFUSED)


def test_a_window_fenced_out_midway_keeps_what_was_stored_before_the_other_publisher():
    assert pub.settle_window([5, 6, None, None]) == pub.Settled(2, (), True, None)


def test_a_hole_before_a_stored_event_is_repaired_not_skipped():
    """A leader change lost event 1 but stored event 2: 1 is republished, 3 is retried."""
    assert pub.settle_window([5, DOWN, 9, DOWN]) == pub.Settled(3, (1,), False, DOWN)
    assert pub.settle_window([DOWN, None, 9]) == pub.Settled(3, (0, 1), False, None)


def test_a_creds_file_needs_a_user_jwt_and_a_user_seed_and_is_never_quoted():
    jwt = "eyJ0eXAiOiJKV1QifQ.eyJzdWIiOiJVQSJ9.c2ln"
    seed = "SU" + "A" * 56
    good = (
        f"-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
    )
    assert pub.creds_problem(good) is None
    assert "JWT" in pub.creds_problem(seed + "\n")
    no_seed = good.replace(seed, "SA" + "A" * 56)  # (an account seed is not a user's)
    assert "seed" in pub.creds_problem(no_seed)
    assert seed not in pub.creds_problem(no_seed)


def test_the_broker_position_is_found_in_a_large_index_by_a_few_reads(tmp_path, monkeypatch):
    """A long-lived stream's index holds millions of records: the position is a binary
    search of the file (every start, every error, every poll of a move wait), never the
    whole index read into the publisher (that was ~100 bytes of memory per record)."""
    line = len(syslog_line(0))
    index = storage.StreamFiles(tmp_path / "w1", "auth").index_path
    index.parent.mkdir()
    index.write_bytes(
        b"".join(storage.pack_record(IndexRecord(i * line, i * line, 1)) for i in range(1, 100_001))
    )
    opened: list[storage.IndexFile] = []

    class Counted(storage.IndexFile):
        def __init__(self, path):
            super().__init__(path)
            opened.append(self)

    monkeypatch.setattr(storage, "IndexFile", Counted)
    monkeypatch.setattr(storage, "read_records", _no_whole_index_reads(storage.read_records))
    cursor, before = _job(tmp_path)._locate(1234 * line)
    assert cursor == pub.Cursor(1234, 1234 * line, 1234 * line)
    assert before == IndexRecord(1234 * line, 1234 * line, 1)
    assert opened and all(index.reads <= 20 for index in opened)


def _job(directory) -> StreamJob:
    return StreamJob(SimpleNamespace(directory=directory, events=True), "w1", "auth")  # type: ignore[arg-type]


def _no_whole_index_reads(read_records):
    def guarded(path, first=0, until_mirror=None):
        assert until_mirror is not None, "the whole index was read"
        return read_records(path, first, until_mirror)

    return guarded


def test_the_index_file_skips_a_torn_end_and_refuses_a_torn_middle(tmp_path):
    path = tmp_path / "s.idx"
    records = [IndexRecord(10 * (i + 1), 10 * (i + 1), 1) for i in range(5)]
    path.write_bytes(b"".join(storage.pack_record(r) for r in records) + b"\x00" * 7)
    with storage.IndexFile(path) as index:
        assert len(index) == 5 and index[4] == records[4]
        with pytest.raises(IndexError):
            index[5]
    raw = bytearray(path.read_bytes())
    raw[4 * storage.INDEX_RECORD.size + 10] ^= 0xFF  # the last whole record: torn
    raw[1 * storage.INDEX_RECORD.size + 10] ^= 0xFF  # and one in the middle
    path.write_bytes(bytes(raw))
    with storage.IndexFile(path) as index:
        assert len(index) == 4
        assert index[3] == records[3]
        with pytest.raises(storage.IngestCorrupt, match="index record 1"):
            index[1]
    with storage.IndexFile(tmp_path / "absent.idx") as index:
        assert len(index) == 0
    assert pub.locate(0, index.__getitem__, len(index)) == pub.Cursor()


def test_a_torn_index_record_in_the_middle_is_a_publish_error_the_loop_retries(tmp_path):
    writer = IngestWriter(tmp_path)
    for i in range(8):
        writer.commit(syslog_line(i))
    writer.close()
    raw = bytearray(writer.files.index_path.read_bytes())
    raw[3 * storage.INDEX_RECORD.size + 10] ^= 0xFF
    writer.files.index_path.write_bytes(bytes(raw))
    job = StreamJob(
        SimpleNamespace(directory=tmp_path, payload_limit=1 << 20, events=True), "w1", "auth"
    )
    with pytest.raises(pub.PublishError, match="index record 3"):
        job._locate(5 * len(syslog_line(0)) - 1)
