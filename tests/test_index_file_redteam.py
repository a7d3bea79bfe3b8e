"""storage.IndexFile (the publisher's binary search of the commit index) against the
list the publisher read before (storage.read_records): the same cursor, or the same
error, for any index a crash can leave (gaps, moves, a torn tail of any length)."""

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from decnet.listener import publishing as pub
from decnet.listener import storage
from decnet.listener.storage import INDEX_RECORD, IndexRecord

SIZE = INDEX_RECORD.size

# One step of a stream: a commit of n mirror bytes (+ extra logical bytes: truncated
# lines), a gap of n logical bytes, or a move to n logical bytes further on.
step = st.one_of(
    st.tuples(st.just("data"), st.integers(1, 50), st.integers(0, 5)),
    st.tuples(st.just("gap"), st.integers(1, 50), st.just(0)),
    st.tuples(st.just("moved"), st.integers(0, 50), st.just(0)),
)


def _records(steps) -> list[IndexRecord]:
    mirror = offset = 0
    out = []
    for kind, n, extra in steps:
        if kind == "data":
            mirror += n
            offset += n + extra
        else:
            offset += n
        out.append(IndexRecord(mirror, offset, 1, moved=kind == "moved"))
    return out


def _torn(record: IndexRecord, how: int, cut: int) -> bytes:
    """A record a crash (or a reader racing the writer) may leave: zeros, a wrong crc,
    a wrong magic, or its first bytes only."""
    raw = bytearray(storage.pack_record(record))
    if how == 0:
        raw = bytearray(SIZE)
    elif how == 1:
        raw[4] ^= 0xFF
    elif how == 2:
        raw[0:4] = b"XXXX"
    else:
        return bytes(raw[: cut % SIZE])
    return bytes(raw)


torn_tail = st.lists(st.tuples(st.integers(0, 3), st.integers(0, SIZE - 1)), max_size=4)


def _outcome(end: int, record_at, count: int):
    try:
        return pub.locate(end, record_at, count)
    except pub.PublishError as exc:
        return type(exc), str(exc)


def _ends(records: list[IndexRecord]) -> set[int]:
    ends = {0, 1}
    for r in records:
        ends |= {r.stream_end - 1, r.stream_end, r.stream_end + 1}
    return {e for e in ends if e >= 0}


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=st.lists(step, max_size=30), tail=torn_tail)
def test_locate_over_the_index_file_is_locate_over_the_whole_index_read(tmp_path, steps, tail):
    records = _records(steps)
    raw = b"".join(storage.pack_record(r) for r in records)
    nxt = IndexRecord(records[-1].mirror_end + 7 if records else 7, 99_999, 1)
    # Whole torn records first, then at most one partial one (a file ends once).
    whole = [_torn(nxt, how, cut) for how, cut in tail if how < 3]
    partial = [_torn(nxt, how, cut) for how, cut in tail if how == 3][:1]
    path = tmp_path / "s.idx"
    path.write_bytes(raw + b"".join(whole + partial))
    listed = storage.read_records(path)
    assert listed == records
    with storage.IndexFile(path) as index:
        assert len(index) == len(records)
        for end in sorted(_ends(records)):
            assert _outcome(end, index.__getitem__, len(index)) == _outcome(
                end, listed.__getitem__, len(listed)
            ), end


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=st.lists(step, min_size=2, max_size=30), data=st.data())
def test_a_torn_record_mid_index_never_yields_a_different_cursor_below_it(tmp_path, steps, data):
    """Where the old whole-index read found a cursor (the broker below the torn record),
    the binary search finds the same one or says the index is corrupt: never another."""
    records = _records(steps)
    torn_at = data.draw(st.integers(0, len(records) - 2))
    raw = bytearray(b"".join(storage.pack_record(r) for r in records))
    raw[torn_at * SIZE + 10] ^= 0xFF
    path = tmp_path / "s.idx"
    path.write_bytes(bytes(raw))
    listed = storage.read_records(path)
    assert listed == records[:torn_at]
    with storage.IndexFile(path) as index:
        assert len(index) == len(records)
        for end in sorted(_ends(records)):
            old = _outcome(end, listed.__getitem__, len(listed))
            if not isinstance(old, pub.Cursor):
                continue
            try:
                new = pub.locate(end, index.__getitem__, len(index))
            except storage.IngestCorrupt:
                continue
            assert new == old, end


def test_the_index_file_gives_its_descriptor_back_when_a_read_fails_on_open(tmp_path, monkeypatch):
    path = tmp_path / "s.idx"
    path.write_bytes(storage.pack_record(IndexRecord(10, 10, 1)))
    opened: list[int] = []
    real_open = os.open

    def tracked_open(*args, **kw):
        fd = real_open(*args, **kw)
        opened.append(fd)
        return fd

    def failing_pread(fd, n, offset):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "open", tracked_open)
    monkeypatch.setattr(os, "pread", failing_pread)
    with pytest.raises(OSError, match="Input/output"):
        storage.IndexFile(path)
    monkeypatch.undo()
    assert opened
    for fd in opened:
        with pytest.raises(OSError):
            os.fstat(fd)  # (closed)


def test_the_torn_helper_really_tears():
    record = IndexRecord(1, 2, 3)
    for how in range(3):
        assert storage.unpack_record(_torn(record, how, 0)) is None
