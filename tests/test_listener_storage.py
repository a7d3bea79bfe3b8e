"""Durable ingest files: commit, crash recovery (torn tails cut), feed exactly once."""

import os

import pytest

from decnet.listener import storage
from decnet.listener.feed import FeedWriter, read_feed
from decnet.listener.storage import IndexRecord, IngestCorrupt, StreamFiles
from tests.logpipe_support import syslog_line


def open_stream(tmp_path):
    files = StreamFiles(tmp_path / "w1", "decnet")
    return files, files.open()


def test_a_fresh_stream_starts_at_zero_and_commits_durably(tmp_path):
    files, rec = open_stream(tmp_path)
    assert (rec.mirror_end, rec.stream_end) == (0, 0)
    files.commit(b"a\nb\n", [IndexRecord(4, 4, 1)])
    files.close()
    files, rec = open_stream(tmp_path)
    assert (rec.mirror_end, rec.stream_end, rec.records) == (4, 4, 1)
    assert oct(os.stat(files.mirror_path).st_mode & 0o777) == "0o600"


def test_unacknowledged_mirror_bytes_and_a_torn_index_record_are_cut_on_open(tmp_path):
    files, _ = open_stream(tmp_path)
    files.commit(b"a\n", [IndexRecord(2, 2, 1)])
    files.close()
    # A crash after the mirror write but before/during the index write.
    with open(files.mirror_path, "ab") as f:
        f.write(b"never acknowledged\n")
    with open(files.index_path, "ab") as f:
        f.write(storage.pack_record(IndexRecord(21, 21, 2))[:20])
    files, rec = open_stream(tmp_path)
    assert (rec.mirror_end, rec.stream_end) == (2, 2)
    assert rec.cut_mirror_bytes == 19 and rec.cut_index_bytes == 20
    assert files.mirror_path.read_bytes() == b"a\n"


def test_a_corrupt_record_is_not_trusted(tmp_path):
    raw = bytearray(storage.pack_record(IndexRecord(5, 6, 7)))
    raw[-1] ^= 1
    assert storage.unpack_record(bytes(raw)) is None


def test_a_mirror_shorter_than_its_index_is_refused(tmp_path):
    files, _ = open_stream(tmp_path)
    files.commit(b"abc\n", [IndexRecord(4, 4, 1)])
    files.close()
    os.truncate(files.mirror_path, 1)
    with pytest.raises(IngestCorrupt, match="refusing to guess"):
        open_stream(tmp_path)


def test_the_feed_has_one_entry_per_mirror_line_even_after_a_crash_mid_step(tmp_path):
    files, _ = open_stream(tmp_path)
    lines = [syslog_line(i) + b"\n" for i in range(50)]
    files.commit(b"".join(lines[:30]), [IndexRecord(sum(map(len, lines[:30])), 999, 10**15)])
    files.commit(b"".join(lines[30:]), [IndexRecord(sum(map(len, lines)), 1999, 2 * 10**15)])
    end = sum(map(len, lines))
    writer = FeedWriter(files, "w1")
    writer.open()
    assert writer.step(end, limit=len(lines[0]) * 10 + 5) == 10
    # Crash: feed lines written past the recorded position, position not updated.
    with open(files.feed_path, "ab") as f:
        f.write(b'{"half": "written"}\n{"and a torn')
    writer.close()
    writer = FeedWriter(files, "w1")
    writer.open()
    while writer.step(end):
        pass
    feed = read_feed(files.feed_path)
    assert [e["structured_data"][0]["params"][0][1] for e in feed] == [str(i) for i in range(50)]
    assert [e["mirror_offset"] for e in feed][:2] == [0, len(lines[0])]
    # Lines of the second commit carry the second commit's receive time.
    assert (
        feed[29]["received_at"].startswith("2001-09-09")
        and feed[30]["received_at"] > feed[29]["received_at"]
    )


def test_a_deleted_feed_is_rebuilt_from_the_start(tmp_path):
    files, _ = open_stream(tmp_path)
    files.commit(b"x\ny\n", [IndexRecord(4, 4, 1)])
    writer = FeedWriter(files, "w1")
    writer.open()
    writer.step(4)
    writer.close()
    files.feed_path.unlink()
    writer = FeedWriter(files, "w1")
    writer.open()
    assert writer.reset_reason
    writer.step(4)
    assert len(read_feed(files.feed_path)) == 2
