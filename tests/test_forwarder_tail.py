"""The rotation-aware tailer: whole lines only, logical offsets, every rotation style."""

import os

from decnet import config
from decnet.forwarder.tail import FileIdentity, Tailer, TailPosition


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


def test_a_missing_file_is_waited_for(tmp_path):
    path = tmp_path / "decnet.log"
    tailer = Tailer(path)
    assert "waiting" in tailer.locate(None)
    assert drain(tailer) == []
    append(path, b"first\n")
    assert data_of(drain(tailer)) == b"first\n"


def test_a_partial_last_line_waits_and_cr_is_data(tmp_path):
    path = tmp_path / "decnet.log"
    append(path, b"one\rstill one\ntw")
    tailer = Tailer(path)
    tailer.locate(None)
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
    tailer = Tailer(path, max_line=1000, chunk_size=1500)
    tailer.locate(None)
    pieces = drain(tailer)
    out = data_of(pieces)
    lines = out.split(b"\n")
    assert lines[0] == b"short" and lines[2] == b"after"
    assert lines[1].endswith(config.TRUNCATION_MARKER) and len(lines[1]) + 1 == 1000
    assert tailer.truncated_lines == 1
    # Logical offsets still cover the original bytes exactly.
    assert pieces[-1].end == os.path.getsize(path)
    rewritten = [p for p in pieces if p.rewritten]
    assert rewritten[0].end - rewritten[0].start == 5001


def test_a_long_line_still_being_written_is_not_stalling(tmp_path):
    path = tmp_path / "decnet.log"
    tailer = Tailer(path, max_line=300, chunk_size=400)
    append(path, b"B" * 350)
    tailer.locate(None)
    assert drain(tailer) == []
    append(path, b"B" * 1000 + b"\nnext\n")
    out = data_of(drain(tailer))
    assert out.endswith(config.TRUNCATION_MARKER + b"\nnext\n")


def test_rename_and_create_drains_the_old_file_first(tmp_path):
    path = tmp_path / "decnet.log"
    append(path, b"old 1\n")
    tailer = Tailer(path)
    tailer.locate(None)
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
    tailer = Tailer(path, rotate_wait=5)
    tailer.locate(None)
    assert data_of(drain(tailer, now=100)) == b"done\n"
    os.rename(path, tmp_path / "old")
    path.touch()
    assert drain(tailer, now=101) == []
    assert drain(tailer, now=103) == []
    pieces = drain(tailer, now=107)
    assert data_of(pieces) == b"unfinish\n" and pieces[0].rewritten
    assert pieces[0].end == 13 and tailer.completed_lines == 1
    append(path, b"fresh\n")
    assert drain(tailer, now=108)[0].start == 13


def test_copytruncate_starts_again_at_byte_zero(tmp_path):
    path = tmp_path / "decnet.log"
    append(path, b"x" * 99 + b"\n")
    tailer = Tailer(path)
    tailer.locate(None)
    drain(tailer)
    os.truncate(path, 0)
    append(path, b"after truncate\n")
    pieces = drain(tailer)
    assert data_of(pieces) == b"after truncate\n"
    assert pieces[0].start == 100 and tailer.truncations == 1


def test_delete_and_recreate(tmp_path):
    path = tmp_path / "decnet.log"
    append(path, b"a\n")
    tailer = Tailer(path)
    tailer.locate(None)
    drain(tailer)
    path.unlink()
    append(path, b"b\n")
    assert data_of(drain(tailer)) == b"b\n"


def test_restart_resumes_in_the_same_file_or_in_the_rotated_one(tmp_path):
    path = tmp_path / "decnet.log"
    append(path, b"l1\nl2\n")
    tailer = Tailer(path)
    tailer.locate(None)
    drain(tailer)
    saved = tailer.position_at(3)
    tailer.close()
    again = Tailer(path)
    assert "same file" in again.locate(saved)
    assert data_of(drain(again)) == b"l2\n"
    again.close()
    # Rotated while we were down: the old file is found by identity, drained, then the new one.
    os.rename(path, tmp_path / "decnet.log.1")
    append(path, b"n1\n")
    third = Tailer(path)
    assert "rotated file decnet.log.1" in third.locate(saved)
    pieces = drain(third)
    assert data_of(pieces) == b"l2\nn1\n" and pieces[-1].end == 9


def test_a_reused_inode_with_other_content_is_not_mistaken_for_the_old_file(tmp_path):
    path = tmp_path / "decnet.log"
    append(path, b"original content\n")
    st = os.stat(path)
    ident = FileIdentity(st.st_dev, st.st_ino)
    tailer = Tailer(path)
    tailer.locate(None)
    drain(tailer)
    saved = tailer.position_at(17)
    assert saved.identity.fp_len == 17
    tailer.close()
    with open(path, "r+b") as f:  # same inode, different bytes
        f.write(b"REPLACED content\n")
    again = Tailer(path)
    assert "gone" in again.locate(saved)
    pieces = drain(again)
    assert data_of(pieces) == b"REPLACED content\n" and pieces[0].start == 17
    assert saved.identity.ino == ident.ino


def test_rewind_goes_back_into_an_older_generation(tmp_path):
    path = tmp_path / "decnet.log"
    append(path, b"g1a\ng1b\n")
    tailer = Tailer(path)
    tailer.locate(None)
    drain(tailer)
    os.rename(path, tmp_path / "r")
    append(path, b"g2\n")
    drain(tailer)
    assert tailer.rewind(4) == 4
    assert data_of(drain(tailer)) == b"g1b\ng2\n"
    tailer.release(8)  # the first generation is delivered: closed
    assert len(tailer.gens) == 1
    assert tailer.rewind(0) == 8  # the earliest we still have


def test_position_is_persistable(tmp_path):
    path = tmp_path / "decnet.log"
    append(path, b"abc\n")
    tailer = Tailer(path)
    tailer.locate(None)
    drain(tailer)
    pos = tailer.position_at(4)
    assert isinstance(pos, TailPosition) and pos.logical == 4
