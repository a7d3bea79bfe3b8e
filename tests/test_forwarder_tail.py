"""The rotation-aware tailer on a real file system: whole lines only, logical
offsets, every rotation style, and restarts from the journal it records."""

import gzip
import os

import attrs

from decnet import config
from decnet.forwarder.journal import DONE, Journal
from decnet.forwarder.tail import Tailer


def drain(tailer, now=0.0):
    pieces = []
    while True:
        got = tailer.read(now)
        if not got:
            return pieces
        pieces += got


def data_of(pieces):
    return b"".join(p.data for p in pieces)


def append(path, data):
    with open(path, "ab") as f:
        f.write(data)


class Durable:
    """What the forwarder's SQLite journal would hold: the records a tailer handed over."""

    def __init__(self):
        self.acked = 0
        self.records = {}

    def take(self, tailer):
        for rec in tailer.take_records():
            self.records[rec.seq] = rec

    def journal(self):
        return Journal(self.acked, tuple(self.records[s] for s in sorted(self.records)))

    def start(self, path, **kw):
        tailer = Tailer(path, **kw)
        plan = tailer.start(self.journal())
        for seq in plan.forget:
            self.records.pop(seq, None)
        self.take(tailer)
        return tailer

    def ack(self, tailer, offset):
        self.acked = offset
        tailer.release(offset)
        self.take(tailer)


def test_a_missing_file_is_waited_for(tmp_path):
    path = tmp_path / "decnet.log"
    tailer = Durable().start(path)
    assert drain(tailer) == []
    append(path, b"first\n")
    assert data_of(drain(tailer)) == b"first\n"


def test_a_partial_last_line_waits_and_cr_is_data(tmp_path):
    path = tmp_path / "decnet.log"
    append(path, b"one\rstill one\ntw")
    tailer = Durable().start(path)
    pieces = drain(tailer)
    assert data_of(pieces) == b"one\rstill one\n"
    assert (pieces[0].start, pieces[-1].end) == (0, 14)
    append(path, b"o\n")
    pieces = drain(tailer)
    assert data_of(pieces) == b"two\n" and pieces[0].start == 14


def test_over_long_lines_are_truncated_with_a_marker_and_the_stream_goes_on(tmp_path):
    path = tmp_path / "decnet.log"
    long = b"A" * 5000
    append(path, b"short\n" + long + b"\nafter\n")
    tailer = Durable().start(path, max_line=1000, chunk_size=1500)
    pieces = drain(tailer)
    lines = data_of(pieces).split(b"\n")
    assert lines[0] == b"short" and lines[2] == b"after"
    assert lines[1].endswith(config.TRUNCATION_MARKER) and len(lines[1]) + 1 == 1000
    assert tailer.truncated_lines == 1
    # Logical offsets still cover the original bytes exactly.
    assert pieces[-1].end == os.path.getsize(path)
    rewritten = [p for p in pieces if p.rewritten]
    assert rewritten[0].end - rewritten[0].start == 5001


def test_a_long_line_still_being_written_is_not_stalling(tmp_path):
    path = tmp_path / "decnet.log"
    append(path, b"B" * 350)
    tailer = Durable().start(path, max_line=300, chunk_size=400)
    assert drain(tailer) == []
    append(path, b"B" * 1000 + b"\nnext\n")
    assert data_of(drain(tailer)).endswith(config.TRUNCATION_MARKER + b"\nnext\n")


def test_rename_and_create_drains_the_old_file_first(tmp_path):
    path = tmp_path / "decnet.log"
    append(path, b"old 1\n")
    tailer = Durable().start(path)
    assert data_of(drain(tailer)) == b"old 1\n"
    os.rename(path, tmp_path / "decnet.log.1")
    append(tmp_path / "decnet.log.1", b"old 2 (written after the rename)\n")
    append(path, b"new 1\n")
    pieces = drain(tailer)
    assert data_of(pieces) == b"old 2 (written after the rename)\nnew 1\n"
    assert [p.start for p in pieces] == sorted(p.start for p in pieces)
    assert pieces[-1].end == 6 + 33 + 6
    assert tailer.rotations == 1


def test_an_empty_new_file_waits_for_rotate_wait_then_an_unfinished_line_gets_an_lf(tmp_path):
    path = tmp_path / "decnet.log"
    append(path, b"done\nunfinish")
    tailer = Durable().start(path, rotate_wait=5)
    assert data_of(drain(tailer, now=100)) == b"done\n"
    os.rename(path, tmp_path / "decnet.log.1")
    path.touch()
    assert drain(tailer, now=101) == []
    assert drain(tailer, now=103) == []
    pieces = drain(tailer, now=107)
    assert data_of(pieces) == b"unfinish\n" and pieces[0].rewritten
    assert pieces[0].end == 13 and tailer.completed_lines == 1
    append(path, b"fresh\n")
    assert drain(tailer, now=108)[0].start == 13


def test_copytruncate_finishes_the_old_content_from_the_copy_then_starts_at_byte_zero(tmp_path):
    path = tmp_path / "decnet.log"
    append(path, b"x" * 99 + b"\n")
    tailer = Durable().start(path)
    drain(tailer)
    append(path, b"written before the copy\n")
    # logrotate's copytruncate: copy, then truncate in place.
    (tmp_path / "decnet.log.1").write_bytes(path.read_bytes())
    os.truncate(path, 0)
    append(path, b"after truncate\n")
    pieces = drain(tailer)
    assert data_of(pieces) == b"written before the copy\nafter truncate\n"
    assert pieces[-1].start == 124 and tailer.truncations == 1


def test_copytruncate_whose_copy_is_gone_declares_the_rest_lost(tmp_path):
    path = tmp_path / "decnet.log"
    append(path, b"read\n")
    tailer = Durable().start(path)
    drain(tailer)
    os.truncate(path, 0)
    append(path, b"after\n")
    pieces = drain(tailer)
    assert [(p.start, p.end, p.gone) for p in pieces] == [(5, 6, True), (6, 12, False)]


def test_delete_and_recreate_drains_the_deleted_file_through_its_descriptor(tmp_path):
    path = tmp_path / "decnet.log"
    append(path, b"a\n")
    tailer = Durable().start(path)
    drain(tailer)
    append(path, b"last words\n")
    path.unlink()
    append(path, b"b\n")
    assert data_of(drain(tailer)) == b"last words\nb\n"


def test_restart_resumes_in_the_same_file_or_in_the_rotated_one(tmp_path):
    path = tmp_path / "decnet.log"
    append(path, b"l1\nl2\n")
    durable = Durable()
    tailer = durable.start(path)
    drain(tailer)
    durable.ack(tailer, 3)
    tailer.close()
    again = durable.start(path)
    assert data_of(drain(again)) == b"l2\n"
    again.close()
    # Rotated while we were down: the old file is found by identity, drained, then the new one.
    os.rename(path, tmp_path / "decnet.log.1")
    append(path, b"n1\n")
    third = durable.start(path)
    pieces = drain(third)
    assert data_of(pieces) == b"l2\nn1\n" and pieces[-1].end == 9


def test_a_rotation_before_anything_was_acknowledged_is_not_forgotten(tmp_path):
    """Issue #9 A: the generation is recorded when it is opened, not on the first ACK."""
    path = tmp_path / "decnet.log"
    path.touch()
    durable = Durable()
    durable.start(path).close()  # (kill -9: only the journal survives)
    append(path, b"first 100\n")
    os.rename(path, tmp_path / "decnet.log.1")
    append(path, b"second 100\n")
    pieces = drain(durable.start(path))
    assert data_of(pieces) == b"first 100\nsecond 100\n"


def test_two_rotations_while_down_are_drained_in_rotation_order(tmp_path):
    path = tmp_path / "decnet.log"
    append(path, b"g1\n")
    durable = Durable()
    durable.start(path).close()
    os.rename(path, tmp_path / "decnet.log.1")
    append(path, b"g2\n")
    os.rename(tmp_path / "decnet.log.1", tmp_path / "decnet.log.2")
    os.rename(path, tmp_path / "decnet.log.1")
    append(path, b"g3\n")
    assert data_of(drain(durable.start(path))) == b"g1\ng2\ng3\n"


def test_a_file_deleted_while_down_is_a_declared_gap_and_a_compressed_one_an_exact_gap(tmp_path):
    path = tmp_path / "decnet.log"
    append(path, b"shipped\n")
    durable = Durable()
    tailer = durable.start(path)
    drain(tailer)
    durable.ack(tailer, 8)
    tailer.close()
    append(path, b"never shipped\n")  # 14 bytes
    os.rename(path, tmp_path / "decnet.log.1")
    with gzip.open(tmp_path / "decnet.log.1.gz", "wb") as f:
        f.write((tmp_path / "decnet.log.1").read_bytes())
    os.unlink(tmp_path / "decnet.log.1")
    append(path, b"next\n")
    again = durable.start(path)
    again.rewind(8)
    pieces = drain(again)
    # The compressed file says exactly how many bytes are gone.
    assert [(p.start, p.end, p.gone) for p in pieces] == [(8, 22, True), (22, 27, False)]


def test_a_reused_inode_with_other_content_is_not_mistaken_for_the_old_file(tmp_path):
    path = tmp_path / "decnet.log"
    append(path, b"original content\n")
    durable = Durable()
    tailer = durable.start(path)
    drain(tailer)
    tailer.close()
    with open(path, "r+b") as f:  # same inode, different bytes
        f.write(b"REPLACED content\n")
    again = durable.start(path)
    again.rewind(17)
    pieces = drain(again)
    assert [p.gone for p in pieces] == [True, False]
    assert pieces[-1].data == b"REPLACED content\n" and pieces[-1].start == 18


def test_rewind_goes_back_into_an_older_generation_and_release_closes_it(tmp_path):
    path = tmp_path / "decnet.log"
    append(path, b"g1a\ng1b\n")
    durable = Durable()
    tailer = durable.start(path)
    drain(tailer)
    os.rename(path, tmp_path / "r")
    append(path, b"g2\n")
    drain(tailer)
    assert tailer.rewind(4) == 4
    assert data_of(drain(tailer)) == b"g1b\ng2\n"
    durable.ack(tailer, 8)  # the first generation is delivered: closed and marked done
    assert len(tailer.gens) == 1
    assert [r.state for r in durable.journal().generations] == [DONE, "active"]
    assert tailer.rewind(0) == 8  # the earliest we still have


def test_files_rotated_before_the_first_start_are_remembered_not_shipped(tmp_path):
    path = tmp_path / "decnet.log"
    append(tmp_path / "decnet.log.1", b"from before\n")
    append(path, b"now\n")
    durable = Durable()
    tailer = durable.start(path)
    assert data_of(drain(tailer)) == b"now\n"
    tailer.close()
    states = {attrs.astuple(r.identity)[1]: r.state for r in durable.journal().generations}
    assert states[os.stat(tmp_path / "decnet.log.1").st_ino] == DONE
    assert data_of(drain(durable.start(path))) == b"now\n"


# -- the watcher that wakes the shipper ------------------------------------------


def test_a_log_directory_inotify_cannot_watch_yet_is_polled_and_said_once(tmp_path):
    from twisted.internet.testing import MemoryReactorClock
    from twisted.logger import Logger

    from decnet.forwarder.service import TailWatcher

    reactor = MemoryReactorClock()
    woken, logged = [], []
    watcher = TailWatcher(reactor, tmp_path / "later" / "decnet.log", lambda: woken.append(1), 1.0)
    watcher.log = Logger(observer=logged.append)
    watcher.startService()
    try:
        reactor.advance(1.0)
        reactor.advance(1.0)
        assert len(woken) == 3  # the poll timer wakes the shipper all the same
        (said,) = logged
        assert said["log_format"].startswith("Cannot watch {directory} with inotify")
        assert said["directory"] == str(tmp_path / "later")
        (tmp_path / "later").mkdir()
        reactor.advance(1.0)
        assert watcher._watching
        assert [e["log_format"] for e in logged[1:]] == ["Watching {directory} with inotify"]
    finally:
        watcher.stopService()  # closes the inotify descriptor
