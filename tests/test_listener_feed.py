"""The JSON feed: the fast encoder equals the definition, the builder, the feed process."""

import datetime
import os

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor

from decnet.listener import feed, storage
from decnet.listener.feed import FeedBuilder, FeedEncoder, FeedWriter, feed_record, read_feed
from decnet.listener.feedproc import FeedProcess
from decnet.listener.feedworker import decode_messages, encode_message
from decnet.syslog.rfc5424 import BOM, format_message
from tests.logpipe_support import syslog_line
from tests.support import eventually

WHEN = "2024-05-01T12:00:00.000001Z"


def reference(lines: list[bytes], offset: int = 0) -> list[str]:
    """The feed lines ``feed_record`` (the definition) gives for ``lines``."""
    out = []
    for line in lines:
        out.append(
            feed._dumps(
                feed_record(
                    line, worker="w1", stream="decnet", received_at=WHEN, mirror_offset=offset
                )
            )
        )
        offset += len(line) + 1
    return out


def fast(lines: list[bytes], offset: int = 0) -> tuple[list[str], FeedEncoder]:
    encoder = FeedEncoder("w1", "decnet")
    out: list[str] = []
    count = encoder.encode(b"".join(line + b"\n" for line in lines), offset, WHEN, out)
    assert count == len(out) == len(lines)
    return out, encoder


HOSTILE = [
    syslog_line(1),
    b"<134>1 2024-05-01T12:00:00.000001Z decoy-7 sshd 22 login - plain msg",
    b"<0>1 - - - - - -",
    b"<191>999 - h a p m -",
    b"<192>1 - h a p m - too big a PRI",
    b"<05>1 - h a p m - leading zero",
    b"<14>01 - h a p m - leading zero version",
    b"<14>1 2024-13-01T00:00:00Z h a p m - month 13",
    b"<14>1 2024-02-30T24:00:00Z h a p m - hour 24",
    b"<14>1 2024-05-01T12:00:60.1234567Z h a p m - seven fraction digits",
    b"<14>1 2024-05-01T12:00:00+02:00 h a p m - offset",
    b"<14>1 - h a p m - ",
    b"<14>1 - h a p m -x",
    b'<14>1 - h"q a p m - quote in HOSTNAME',
    b"<14>1 - h\\b a p m - backslash in HOSTNAME",
    b"<14>1 - " + b"h" * 256 + b" a p m - HOSTNAME too long",
    b"<14>1 - h " + b"a" * 49 + b" p m - APP-NAME too long",
    b"<14>1 - h a p " + b"m" * 33 + b" - MSGID too long",
    b"<14>1 - h a p m - " + BOM + b"bom then utf-8 \xc3\xa9",
    b"<14>1 - h a p m - invalid utf-8 \xff\xfe and \xe2\x82",
    b'<14>1 - h a p m - quotes " and \\ and \t tab and \x01 and \x7f',
    b'<14>1 - h a p m [x@1 v="a\\"b\\\\c\\]d"] escapes',
    b'<14>1 - h a p m [x@1 v="a]b[c" w=""][y@2][z@3 k="v v"] msg',
    b'<14>1 - h a p m [x@1 v="caf\xc3\xa9"] non-ASCII value',
    b'<14>1 - h a p m [x@1 v="tab\there"] control char in a value',
    b'<14>1 - h a p m [x%s@1 p%d="%s"] percent signs',
    b'<14>1 - h a p m [x[1 v="1"] bracket in an SD-ID',
    b'<14>1 - h a p m [x@1 v="1"]msg without SP',
    b'<14>1 - h a p m [x@1 v="1" ] space before ]',
    b'<14>1 - h a p m [x@1 v="1"',
    b"<14>1 - h a p m [x@1 v=1] unquoted",
    b"<14>1 - h a p m [] empty element",
    b'<14>1 - h a p m [x@1 v="1"] [y@1 w="2"] second element after SP is MSG',
    b"not syslog at all",
    b"",
    b"\r",
    b"<14>1 - h a p m - one\rtwo",
    "<14>1 - h a p m - ünïcödé".encode(),
]


def test_the_fast_encoder_gives_exactly_the_bytes_of_the_definition_on_hostile_lines():
    out, encoder = fast(HOSTILE, offset=1000)
    assert out == reference(HOSTILE, offset=1000)
    # Both paths were taken: the common lines fast, the odd ones through feed_record.
    assert encoder.fast_lines >= 10 and encoder.slow_lines >= 10


@settings(max_examples=150, deadline=None)
@given(st.lists(st.binary(max_size=120).map(lambda b: b.replace(b"\n", b"")), max_size=8))
def test_the_fast_encoder_equals_the_definition_on_random_bytes(lines):
    assert fast(lines)[0] == reference(lines)


header_text = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=12)
sd_name = st.text(
    st.characters(min_codepoint=33, max_codepoint=126, exclude_characters='= ]"'),
    min_size=1,
    max_size=8,
)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.builds(
            lambda host, app, sd, msg: format_message(
                hostname=host, app_name=app, structured_data=sd, msg=msg
            ),
            st.one_of(st.none(), header_text),
            st.one_of(st.none(), header_text),
            st.lists(
                st.tuples(
                    sd_name,
                    st.lists(st.tuples(sd_name, st.text(max_size=10)), max_size=3),
                ),
                max_size=3,
            ),
            st.one_of(st.none(), st.text(max_size=30), st.binary(max_size=30)),
        ).map(lambda b: b.replace(b"\n", b" ")),
        min_size=1,
        max_size=6,
    )
)
def test_the_fast_encoder_equals_the_definition_on_well_formed_messages(lines):
    assert fast(lines)[0] == reference(lines)


# -- hostile RFC 5424 lines, piece by piece ------------------------------------
# Each piece is usually valid and sometimes broken in the ways attackers and
# broken senders break it: escapes, brackets, quotes, UTF-8 (valid or not), a
# BOM, NILVALUEs, fields one byte too long, very long STRUCTURED-DATA.

_ascii = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
_nasty = st.sampled_from(
    ['"', "\\", "]", "[", "=", " ", '\\"', "\\]", "\\\\", "\t", "\x01", "\x7f", "\r"]
)
_unicode = st.sampled_from(["é", "\u2028", "\u202e", "\ufeff", "\U0001f600", "\x85"])
_text_piece = st.one_of(_ascii, _ascii, _ascii, _nasty, _unicode)


def _text(min_size=0, max_size=12):
    return st.lists(_text_piece, min_size=min_size, max_size=max_size).map("".join)


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


_raw_bytes = st.sampled_from([b"\xff", b"\xc3", b"\xe2\x82", BOM, b"\x00"])
_printusascii = st.text(_ascii, min_size=1, max_size=12)
_name_chars = _ascii.filter(lambda c: c not in '= ]"')


def _escaped(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


# Valid pieces: what a conforming sender may write, hostile content included.
good_sd_value = st.one_of(
    st.text(_ascii.filter(lambda c: c not in '"\\]') | st.just(" "), max_size=12),
    _text(0, 16).map(_escaped),
    _text(0, 8).map(lambda v: v.replace('"', "").replace("]", "") + "\\q"),  # a lone backslash
    st.integers(200, 2000).map(lambda n: "v" * n),  # long SD
)
good_sd_element = st.builds(
    lambda sd_id, params: f"[{sd_id}" + "".join(f' {n}="{v}"' for n, v in params) + "]",
    st.text(_name_chars, min_size=1, max_size=8),
    st.lists(st.tuples(st.text(_name_chars, min_size=1, max_size=8), good_sd_value), max_size=4),
)
GOOD = {
    "pri": st.integers(0, 191).map(str),
    "version": st.sampled_from(["1", "1", "2", "999"]),
    "ts": st.one_of(
        st.just("-"),
        st.builds(
            lambda d, frac, zone: d.strftime("%Y-%m-%dT%H:%M:%S") + frac + zone,
            st.datetimes(min_value=datetime.datetime(1000, 1, 1)),
            st.sampled_from(["", ".1", ".000001", ".123456"]),
            st.sampled_from(["Z", "+02:00", "-23:59"]),
        ),
    ),
    "host": st.one_of(st.just("-"), _printusascii, st.just("h" * 255)),
    "app": st.one_of(st.just("-"), _printusascii, st.just("a" * 48)),
    "procid": st.one_of(st.just("-"), _printusascii, st.just("p" * 128)),
    "msgid": st.one_of(st.just("-"), _printusascii, st.just("m" * 32)),
    "sd": st.one_of(
        st.just("-"),
        st.lists(good_sd_element, min_size=1, max_size=3).map("".join),
        st.integers(20, 60).map(lambda n: '[x@1 k="v"]' * n),  # many elements
    ),
    "msg": st.one_of(
        st.none(),
        _text(0, 20).map(lambda m: b" " + _utf8(m)),
        _text(0, 20).map(lambda m: b" " + BOM + _utf8(m)),
        st.lists(st.one_of(_raw_bytes, _text(0, 3).map(_utf8)), max_size=6).map(
            lambda parts: b" " + b"".join(parts)
        ),
    ),
}
# Broken pieces: one is swapped in, so the rest of the line still looks right.
BAD = {
    "pri": st.sampled_from(["192", "05", "00", "999", "", "1a", "-1"]),
    "version": st.sampled_from(["01", "0", "1000", "", "x"]),
    "ts": st.one_of(
        st.sampled_from(
            [
                "2024-13-01T00:00:00Z",
                "2024-02-30T24:00:00Z",
                "2024-05-01T12:00:61Z",
                "2024-05-01T12:00:00.1234567Z",
                "2024-05-01T12:00:00+24:00",
                "2024-05-01T12:00:00z",
                "2024-05-01T12:00:00",
            ]
        ),
        _text(1, 30),
    ),
    "host": st.one_of(st.just("h" * 256), _text(0, 12)),
    "app": st.one_of(st.just("a" * 49), _text(0, 12)),
    "procid": st.one_of(st.just("p" * 129), _text(0, 12)),
    "msgid": st.one_of(st.just("m" * 33), _text(0, 12)),
    "sd": st.one_of(
        st.builds(
            lambda name, sep, value, closing: f"[{name} k{sep}{value}{closing}",
            st.one_of(st.just("n" * 33), _text(0, 4)),
            st.sampled_from(["=", "= ", ""]),
            st.one_of(_text(0, 6), _text(0, 6).map(lambda v: f'"{v}"')),
            st.sampled_from(["]", " ]", ""]),
        ),
        _text(0, 6),
    ),
    "msg": _text(1, 6).map(_utf8),  # no SP before MSG
}
FIELDS = list(GOOD)


@st.composite
def hostile_lines(draw):
    """A valid RFC 5424 line with hostile content, or one with one piece broken."""
    broken = draw(st.sampled_from([None, None, None, *FIELDS]))
    piece = {f: draw(BAD[f] if f == broken else GOOD[f]) for f in FIELDS}
    sep = draw(st.sampled_from([" "] * 12 + ["  ", "\t"]))
    head = sep.join(piece[f] for f in ("ts", "host", "app", "procid", "msgid", "sd"))
    line = _utf8(f"<{piece['pri']}>{piece['version']}{sep}{head}") + (piece["msg"] or b"")
    return line.replace(b"\n", b" ")


@settings(max_examples=200, deadline=None)
@given(st.lists(hostile_lines(), min_size=1, max_size=4))
def test_the_fast_path_gives_what_the_parser_gives_on_generated_hostile_lines(lines):
    out, encoder = fast(lines)
    assert out == reference(lines)
    assert encoder.fast_lines + encoder.slow_lines == len(lines)


def test_the_hostile_line_generator_reaches_both_paths():
    """The property above means something only if both paths take generated lines."""
    from hypothesis import find

    find(hostile_lines(), lambda line: fast([line])[1].fast_lines == 1)
    find(hostile_lines(), lambda line: fast([line])[1].slow_lines == 1)


def test_many_distinct_structured_data_shapes_stay_correct(monkeypatch):
    monkeypatch.setattr(feed, "_SD_TEMPLATES_MAX", 8)
    lines = [b'<14>1 - h a p m [id%d@1 k%d="%d"] m' % (i, i % 5, i) for i in range(50)]
    assert fast(lines)[0] == reference(lines)


# -- writer and builder -------------------------------------------------------


def committed_stream(tmp_path, batches):
    """A stream whose mirror holds ``batches`` of lines, one commit (and receive time) each."""
    files = storage.StreamFiles(tmp_path / "w1", "decnet")
    files.open()
    end = 0
    for i, batch in enumerate(batches):
        data = b"".join(line + b"\n" for line in batch)
        end += len(data)
        files.commit(data, [storage.IndexRecord(end, end, (i + 1) * 10**15)])
    files.close()
    return files, end


def test_each_line_carries_the_receive_time_of_its_commit_across_steps(tmp_path):
    batches = [[syslog_line(i) for i in range(b * 7, b * 7 + 7)] for b in range(6)]
    files, end = committed_stream(tmp_path, batches)
    writer = FeedWriter(files, "w1")
    writer.open()
    # Steps that end in the middle of commits.
    while writer.step(end, limit=len(syslog_line(0)) * 5):
        pass
    entries = read_feed(files.feed_path)
    assert len(entries) == 42
    stamps = [e["received_at"] for e in entries]
    for b in range(6):
        assert len(set(stamps[b * 7 : b * 7 + 7])) == 1
    assert len(set(stamps)) == 6
    assert [e["mirror_offset"] for e in entries] == [
        sum(len(syslog_line(j)) + 1 for j in range(i)) for i in range(42)
    ]


def test_a_feed_locked_by_another_builder_waits_and_is_written_once(tmp_path):
    files, end = committed_stream(tmp_path, [[syslog_line(i) for i in range(10)]])
    leftover = FeedWriter(files, "w1")  # the builder of a listener that was just killed
    leftover.open()
    now = [0.0]
    reports = []
    builder = FeedBuilder(tmp_path, reports.append, clock=lambda: now[0])
    builder.target("w1", "decnet", end)
    assert builder.step()  # tried, found it locked
    assert not builder.has_work() and builder.retry_delay() == pytest.approx(feed.BUSY_RETRY)
    leftover.step(end)
    leftover.close()
    now[0] += feed.BUSY_RETRY
    while builder.step():
        pass
    builder.close()
    assert len(read_feed(files.feed_path)) == 10
    assert reports[-1] == {"worker": "w1", "stream": "decnet", "pos": end, "lines": 0}


def test_the_builder_takes_streams_in_turn_and_reports_a_broken_one(tmp_path):
    good, end = committed_stream(tmp_path, [[syslog_line(i) for i in range(3)]])
    reports = []
    builder = FeedBuilder(tmp_path, reports.append, step_bytes=len(syslog_line(0)) + 1)
    builder.target("w1", "decnet", end)
    builder.target("w2", "gone", 100)  # no mirror there
    while builder.step():
        pass
    assert len(read_feed(good.feed_path)) == 3
    assert next(r for r in reports if "error" in r)["worker"] == "w2"
    assert any(r.get("pos") == end for r in reports)


def test_pipe_messages_round_trip_and_wait_for_a_whole_line():
    buffer = bytearray(encode_message({"worker": "w", "stream": "s", "end": 5}))
    buffer += b'{"worker": "w", "str'
    assert decode_messages(buffer) == [{"worker": "w", "stream": "s", "end": 5}]
    assert bytes(buffer) == b'{"worker": "w", "str'


# -- the feed process ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_feed_process_builds_what_it_is_told_and_is_restarted_if_it_dies(tmp_path):
    lines = [syslog_line(i) for i in range(2000)]
    files, end = committed_stream(tmp_path, [lines[:1000], lines[1000:]])
    half = sum(len(line) + 1 for line in lines[:1000])
    feeds = FeedProcess(reactor, tmp_path)
    feeds.start()
    try:
        feeds.notify("w1", "decnet", half)
        await eventually(lambda: feeds.positions.get(("w1", "decnet")) == half, 30, what="half")
        assert len(read_feed(files.feed_path)) == 1000
        # Killed (an OOM kill, say): started again, told its targets again.
        pid = feeds.supervisor.pid
        os.kill(pid, 9)
        await eventually(
            lambda: feeds.supervisor.starts == 2 and feeds.supervisor.running, 30, what="restart"
        )
        feeds.notify("w1", "decnet", end)
        await eventually(lambda: feeds.lag("w1", "decnet") == 0, 30, what="the rest")
    finally:
        await feeds.close()
    assert feeds.supervisor.child is None
    entries = read_feed(files.feed_path)
    assert [e["structured_data"][0]["params"][0][1] for e in entries] == [
        str(i) for i in range(2000)
    ]


def _sent(child) -> list[dict]:
    return decode_messages(bytearray(child.written))


def test_a_feed_process_that_cannot_be_spawned_is_retried_and_then_told_every_target(tmp_path):
    """fork failing (EAGAIN, ENOMEM) must not take the listener's start-up down with it."""
    from tests.test_process import FakeProcessReactor

    fake = FakeProcessReactor()
    fake.fail_next = [OSError(11, "Resource temporarily unavailable")]
    feeds = FeedProcess(fake, tmp_path)
    feeds.start()
    feeds.notify("w1", "decnet", 100)
    assert fake.spawned == [] and not feeds.supervisor.running
    fake.advance(0.5)
    (child,) = fake.spawned
    assert child.env is not None and child.child_fds == {0: "w", 1: "r", 2: "r"}
    assert _sent(child) == [{"worker": "w1", "stream": "decnet", "end": 100}]


def test_a_dead_feed_process_is_restarted_with_backoff_that_progress_resets(tmp_path):
    from tests.test_process import FakeProcessReactor

    fake = FakeProcessReactor()
    feeds = FeedProcess(fake, tmp_path)
    feeds.start()
    feeds.notify("w1", "a", 10)
    feeds.notify("w1", "b", 20)
    waits = []
    for _ in range(3):
        fake.spawned[-1].end(signal=9)
        waits.append(fake.getDelayedCalls()[0].getTime() - fake.seconds())
        fake.advance(waits[-1])
    assert waits == [0.5, 1, 2] and len(fake.spawned) == 4
    # Every new process is told every target again.
    assert _sent(fake.spawned[-1]) == [
        {"worker": "w1", "stream": "a", "end": 10},
        {"worker": "w1", "stream": "b", "end": 20},
    ]
    fake.spawned[-1].proto.outReceived(encode_message({"worker": "w1", "stream": "a", "pos": 10}))
    assert feeds.lag("w1", "a") == 0 and feeds.lag("w1", "b") == 20
    fake.spawned[-1].end(code=1)
    assert fake.getDelayedCalls()[0].getTime() - fake.seconds() == 0.5


def test_closing_ends_the_feed_process_input_kills_it_after_the_grace_and_writes_no_more(tmp_path):
    from decnet.listener import feedproc
    from tests.test_process import FakeProcessReactor

    fake = FakeProcessReactor(on_eof="ignore")
    feeds = FeedProcess(fake, tmp_path)
    feeds.start()
    closed = feeds.close()
    (child,) = fake.spawned
    assert child.stdin_closed and child.signals == []
    feeds.notify("w1", "decnet", 5)  # kept for a next start, not written to a closed stdin
    fake.advance(feedproc.STOP_GRACE)
    fake.advance(0)
    assert child.signals == ["KILL"] and closed.called and fake.getDelayedCalls() == []
    feeds.start()  # a closed feed stays closed
    assert len(fake.spawned) == 1


def test_a_feed_process_that_writes_garbage_is_killed_and_restarted(tmp_path):
    from tests.test_process import FakeProcessReactor

    fake = FakeProcessReactor()
    feeds = FeedProcess(fake, tmp_path)
    feeds.start()
    fake.spawned[0].proto.outReceived(b"not json\n")
    fake.advance(0)
    assert fake.spawned[0].signals == ["KILL"]
    fake.advance(0.5)
    assert len(fake.spawned) == 2 and feeds.supervisor.running


def test_a_step_encoded_by_a_pool_in_pieces_equals_one_encoded_whole(tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(feed, "PIECE_BYTES", 1000)
    batches = [[syslog_line(i) for i in range(b * 30, b * 30 + 30)] + HOSTILE for b in range(4)]
    alone, end = committed_stream(tmp_path / "alone", batches)
    pooled, _ = committed_stream(tmp_path / "pooled", batches)
    writer = FeedWriter(alone, "w1")
    writer.open()
    with ThreadPoolExecutor(3) as pool:
        parallel = FeedWriter(pooled, "w1", pool)
        parallel.open()
        assert parallel.step(end) == writer.step(end) == 4 * (30 + len(HOSTILE))
        # Small steps: each next step is encoded while the current one is written.
        more = [[syslog_line(i) for i in range(500)]]
        alone2, end2 = committed_stream(tmp_path / "alone2", more)
        pooled2, _ = committed_stream(tmp_path / "pooled2", more)
        writer, parallel = FeedWriter(alone2, "w1"), FeedWriter(pooled2, "w1", pool)
        writer.open()
        parallel.open()
        steps = 0
        while count := parallel.step(end2, limit=5000):
            assert count == writer.step(end2, limit=5000)
            assert parallel.position == writer.position
            steps += 1
        assert steps > 10
    assert pooled.feed_path.read_bytes() == alone.feed_path.read_bytes()
    assert pooled2.feed_path.read_bytes() == alone2.feed_path.read_bytes()


def test_a_killed_feed_process_leaves_no_encoder_process_behind(tmp_path):
    import subprocess
    import sys

    from tests.support import wait_for

    lines = [syslog_line(i, pad=100) for i in range(6000)]  # ~1.5 MB: several pieces
    _files, end = committed_stream(tmp_path, [lines])
    proc = subprocess.Popen(
        [sys.executable, "-m", "decnet.listener.feedworker", str(tmp_path), "--encoders", "2"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        proc.stdin.write(encode_message({"worker": "w1", "stream": "decnet", "end": end}))
        proc.stdin.flush()
        assert b'"pos"' in proc.stdout.readline()  # a step was encoded by the pool

        def encoders():
            path = f"/proc/{proc.pid}/task/{proc.pid}/children"
            return [int(pid) for pid in open(path).read().split()]

        pool = wait_for(encoders, what="the encoder processes")
        proc.kill()
        proc.wait()

        def alive(pid):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    return f.read().rsplit(")", 1)[1].split()[0] != "Z"
            except FileNotFoundError:
                return False

        wait_for(lambda: not any(alive(pid) for pid in pool), what="the encoders to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_step_that_fails_half_way_leaves_the_feed_as_its_position_says(tmp_path, monkeypatch):
    files, end = committed_stream(tmp_path, [[syslog_line(i) for i in range(40)]])
    writer = FeedWriter(files, "w1")
    writer.open()
    writer.step(end, limit=len(syslog_line(0)) * 10)
    before = files.feed_path.read_bytes()

    class Boom(Exception):
        pass

    real = writer.encoder.encode
    calls = []

    def failing(*args):
        calls.append(1)
        if len(calls) > 1:
            raise Boom("disk full, say")
        return real(*args)

    writer.encoder.encode = failing
    monkeypatch.setattr(feed, "PIECE_BYTES", len(syslog_line(0)) * 3)  # one piece lands, then boom
    with pytest.raises(Boom):
        writer.step(end)
    assert files.feed_path.read_bytes() == before
    writer.encoder.encode = real
    while writer.step(end):
        pass
    assert [e["mirror_offset"] for e in read_feed(files.feed_path)] == [
        sum(len(syslog_line(j)) + 1 for j in range(i)) for i in range(40)
    ]


def test_idle_streams_with_an_empty_mirror_open_no_feed_file(tmp_path):
    reports = []
    builder = FeedBuilder(tmp_path, reports.append)
    for i in range(100):
        builder.target(f"w{i}", "decnet", 0)
    assert not builder.has_work() and not builder.step()
    assert reports == [] and list(tmp_path.iterdir()) == []
