"""Follow a log file by path *and* identity, across rotations, in logical offsets.

The stream is the concatenation of every generation of the file (the file
that was at the path, then the one after a rotation, ...).  A **logical
offset** counts bytes of that concatenation, so it only grows: rotation,
copytruncate and delete-and-recreate all start a new generation whose first
byte has the logical offset where the previous generation stopped.  Where a
generation is gone before it was read to its end (deleted or compressed while
the forwarder was down), the next generation starts one byte past anything
that can have been shipped from it: the jump is the gap the listener records.

Every generation the tailer opens is a :class:`~decnet.forwarder.journal.
GenerationRecord`; :meth:`Tailer.take_records` hands over the records that
changed, and the caller makes them durable before it ships any byte read
after them (see :mod:`decnet.forwarder.core`).

Rules (``docs/Logging.md``):

* only whole lines are shipped, split on ``\\n`` alone (a ``\\r`` is data);
* a line longer than ``max_line`` bytes (LF included) is shipped cut to
  ``max_line`` with a marker, counted, and the stream goes on after it;
* on rename-and-create or delete-and-recreate, the old file is read to its end
  before the new one; we switch once the new file has data (the writer moved)
  or the old file has been still for ``rotate_wait`` seconds, and a last line
  the writer never finished is shipped with an LF added (counted); files
  rotated in between two looks (two rotations at once) are found in the
  directory and drained in rotation order;
* copytruncate (the file shrank, or its first bytes changed) continues the
  old generation in logrotate's copy, found by content, then starts a new
  generation at byte 0 of the truncated file.

Everything here blocks (file system calls); the forwarder runs it in a thread
and never calls into one :class:`Tailer` from two threads at once.
"""

from __future__ import annotations

import os
from pathlib import Path

import attrs
from twisted.logger import Logger

from decnet import config
from decnet.forwarder.fs import GZIP_MAGIC, Files, Handle, OsFiles, Stat
from decnet.forwarder.journal import (
    ACTIVE,
    DONE,
    FINGERPRINT_BYTES,
    GONE,
    GZIP_PROBE_BYTES,
    Candidate,
    FileIdentity,
    GenerationRecord,
    Journal,
    Plan,
    Planned,
    fingerprint,
    identity_of,
    plan_start,
    probe,
    unknown_rotations,
)

DEFAULT_CHUNK = 1024 * 1024
DEFAULT_ROTATE_WAIT = 5.0


@attrs.frozen
class Piece:
    """Data to ship for logical offsets ``[start, end)``.

    ``data`` is either the raw bytes (``len(data) == end - start``, whole
    lines) or one rewritten line (truncated, or given a missing LF).  A
    ``gone`` piece has no data: those offsets are lost on this worker (a
    generation deleted or compressed before it was read to its end).
    """

    start: int
    end: int
    data: bytes
    rewritten: bool = False
    gone: bool = False

    @property
    def raw(self) -> bool:
        return not self.rewritten


class _Generation:
    """One file of the stream, open by handle (``None``: the file is gone)."""

    def __init__(self, record: GenerationRecord, handle: Handle | None, pos: int = 0):
        self.seq = record.seq
        self.identity = record.identity
        self.base = record.base
        self.final_size: int | None = None
        if record.end is not None and record.base is not None:
            self.final_size = record.end - record.base
        self.handle = handle
        self.pos = pos  # next byte to read
        self.seen = pos  # the largest size we have seen the file at
        self.mtime = 0  # its modification time when we last looked
        # No file holds it any more (not even compressed): its inode may be reused.
        self.vanished = False

    @property
    def lost(self) -> bool:
        return self.handle is None

    @property
    def fd(self) -> Handle:
        """The open file (only asked of a generation that is not lost)."""
        assert self.handle is not None, "a lost generation has no file"
        return self.handle

    @property
    def end(self) -> int | None:
        if self.final_size is None or self.base is None:
            return None
        return self.base + self.final_size

    def at(self, pos: int) -> int:
        """The logical offset of byte ``pos`` of this file (its base is known by then)."""
        assert self.base is not None, "a generation is read only once it is placed"
        return self.base + pos

    def record(self, state: str = ACTIVE) -> GenerationRecord:
        if state == ACTIVE and self.vanished:
            state = GONE
        return GenerationRecord(self.seq, self.identity, self.base, self.end, state)


class Tailer:
    """Reads whole lines from a rotating file; see the module docstring."""

    log = Logger()

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        files: Files | None = None,
        max_line: int = config.DEFAULT_MAX_LINE,
        chunk_size: int = DEFAULT_CHUNK,
        rotate_wait: float = DEFAULT_ROTATE_WAIT,
        marker: bytes = config.TRUNCATION_MARKER,
    ) -> None:
        if max_line < len(marker) + 2:
            raise ValueError("max_line is too small to hold the truncation marker")
        self.path = Path(path)
        self.files = files if files is not None else OsFiles()
        self.max_line = max_line
        self.chunk_size = max(chunk_size, max_line + 1)
        self.rotate_wait = rotate_wait
        self.marker = marker
        self.gens: list[_Generation] = []
        self.cur = 0  # index in gens being read
        self.done: list[FileIdentity] = []  # shipped generations whose file may still be here
        self.floor = 0  # everything below is acknowledged (the journal's ``acked``)
        self.placed = False  # has the master named its mark (a rewind) since start?
        self.next_seq = 1
        self.truncated_lines = 0
        self.completed_lines = 0  # unfinished last lines given an LF at rotation
        self.rotations = 0
        self.truncations = 0
        self._dirty: dict[int, GenerationRecord] = {}
        self._long: tuple[int, bytes] | None = None  # (logical start, head) of a long line
        self._still: tuple[int, float] | None = None  # (size, since) of the old file

    # -- start-up --------------------------------------------------------

    def start(self, journal: Journal) -> Plan:
        """Open every generation the journal (and the directory) says is still to ship."""
        self.close()
        self.floor = journal.acked
        self.placed = False
        plan = plan_start(journal, self.path.name, self._candidates())
        self.next_seq = max([journal.next_seq, *(r.seq + 1 for r in plan.records)])
        for rec in plan.records:
            self._dirty[rec.seq] = rec
        done = {r.seq: r for r in journal.generations if r.state == DONE}
        done.update({r.seq: r for r in plan.records if r.state == DONE})
        self.done = [
            r.identity
            for seq, r in sorted(done.items())
            if seq not in plan.forget and r.identity.fp_len
        ]
        self.gens = [self._open_planned(planned) for planned in plan.generations]
        self.cur = 0
        self._resolve_bases()
        return plan

    def _open_planned(self, planned: Planned) -> _Generation:
        handle = None
        if planned.name is not None:
            handle = self.files.open(str(self.path.parent / planned.name))
            if handle is not None and not planned.record.identity.same_inode(
                self.files.fstat(handle)
            ):
                self.files.close(handle)  # replaced between the listing and now
                handle = None
        gen = _Generation(planned.record, handle, planned.start)
        if handle is not None:
            st = self.files.fstat(handle)
            gen.seen, gen.mtime = max(gen.pos, st.size), st.mtime_ns
        elif planned.size is None:
            gen.vanished = True  # (an active record not found, or already gone)
        elif gen.final_size is None:
            gen.final_size = planned.size  # gone, but its size survives (compressed)
        return gen

    def take_records(self) -> list[GenerationRecord]:
        """Journal records changed since the last call (to be made durable)."""
        records, self._dirty = list(self._dirty.values()), {}
        return records

    def _mark(self, gen: _Generation, state: str = ACTIVE) -> None:
        self._dirty[gen.seq] = gen.record(state)

    def _candidates(self) -> list[Candidate]:
        out = []
        for entry in self.files.listdir(str(self.path.parent)):
            if entry.stat.regular:
                candidate = self._probe(entry.name)
                if candidate is not None:
                    out.append(candidate)
        return out

    def _probe(self, name: str) -> Candidate | None:
        """What ``name`` in the log's directory holds (see :func:`journal.probe`)."""
        handle = self.files.open(str(self.path.parent / name))
        if handle is None:
            return None
        try:
            st = self.files.fstat(handle)
            if not st.regular:
                return None
            first = self.files.pread(handle, FINGERPRINT_BYTES, 0)
            last = b""
            if first.startswith(GZIP_MAGIC):
                first = self.files.pread(handle, GZIP_PROBE_BYTES, 0)
                last = self.files.pread(handle, 4, max(0, st.size - 4))
            return probe(name, st, first, last, self.files.version(handle))
        finally:
            self.files.close(handle)

    def _generation_for(self, c: Candidate) -> _Generation | None:
        """A new generation for the file ``c``: open it, or (compressed) know its size."""
        handle = None
        if c.readable:
            handle = self.files.open(str(self.path.parent / c.name))
            if handle is None:
                return None
            if not c.identity.same_inode(self.files.fstat(handle)):
                self.files.close(handle)  # replaced since we looked
                return None
        gen = self._new_generation(c.identity, handle, c.size or 0, c.stat)
        if handle is None:
            gen.final_size = c.size
            self._mark(gen)
        return gen

    def _new_generation(
        self, identity: FileIdentity, handle: Handle | None, size: int, st: Stat
    ) -> _Generation:
        gen = _Generation(GenerationRecord(self.next_seq, identity, None), handle)
        self.next_seq += 1
        gen.seen, gen.mtime = size, st.mtime_ns
        self._mark(gen)
        return gen

    def _open_at_path(self) -> bool:
        """The first generation ever, once the file exists."""
        c = self._probe(self.path.name)
        gen = self._generation_for(c) if c is not None and c.readable else None
        if gen is None:
            return False
        gen.base = self.floor
        self.gens.append(gen)
        self.cur = len(self.gens) - 1
        self._mark(gen)
        self.log.info("Log file {path} appeared", path=str(self.path))
        return True

    def _head(self, handle: Handle, size: int) -> bytes:
        n = min(size, FINGERPRINT_BYTES)
        return self.files.pread(handle, n, 0) if n else b""

    # -- reading ---------------------------------------------------------

    @property
    def logical(self) -> int:
        """Logical offset of the next byte to read."""
        if not self.gens:
            return self.floor
        gen = self.gens[self.cur]
        return (gen.base if gen.base is not None else self.floor) + gen.pos

    @property
    def file_end(self) -> int:
        """Logical offset of the end of the newest file as last seen: what the worker wrote.

        Also read on the reactor thread by the metrics while a job may run: it
        only reads a copy of the list and plain ints.
        """
        gens = list(self.gens)
        if not gens:
            return self.floor
        last = gens[-1]
        if last.base is None:
            return self.logical
        return max(self.logical, last.base + max(last.seen, last.pos))

    def read(self, now: float = 0.0) -> list[Piece]:
        """The next whole lines (possibly none).  ``now`` (seconds) drives ``rotate_wait``."""
        if not self.gens and not self._open_at_path():
            return []
        while True:
            pieces = self._read_step(now)
            if pieces is not None:
                return pieces

    def _read_step(self, now: float) -> list[Piece] | None:
        """Read on in the current generation: what to return, or ``None`` to look again
        (the generation changed: finished, truncated, or preceded by rotated files)."""
        gen = self.gens[self.cur]
        if gen.base is None:
            self._resolve_bases()
            if gen.base is None:
                return []  # placed once the master names its mark (rewind)
        if gen.lost:
            return self._past_lost(gen, now)
        size = self._size(gen)
        if self.gens[self.cur] is not gen or gen.lost:
            return None
        pieces = self._read_lines(gen, size)
        if pieces:
            self._still = None
            return pieces
        # At the end of this generation (or only an unfinished line is left).
        if self.cur < len(self.gens) - 1:
            return self._advance(gen, size) or None
        return None if self._look_for_rotation(gen, now) else []

    def _past_lost(self, gen: _Generation, now: float) -> list[Piece] | None:
        """Move past a generation that is gone, declaring what is lost of it."""
        if self.cur == len(self.gens) - 1:
            return None if self._look_for_rotation(gen, now) else []
        nxt = self.gens[self.cur + 1]
        if nxt.base is None:
            return []
        self._long = None
        start = gen.at(gen.pos)
        self.cur += 1
        nxt.pos = 0
        return [Piece(start, nxt.base, b"", gone=True)] if nxt.base > start else None

    def _size(self, gen: _Generation) -> int:
        """How far ``gen`` may be read; checks the file at the path for truncation."""
        if gen.final_size is None and gen is self.gens[-1]:
            self._check_content(gen, self.files.fstat(gen.fd))
        if gen.final_size is not None:
            self._fingerprint(gen, gen.final_size)
            return gen.final_size
        size = self.files.fstat(gen.fd).size
        self._fingerprint(gen, size)
        gen.seen = max(gen.seen, size)
        return size

    def _fingerprint(self, gen: _Generation, size: int) -> None:
        """Fingerprint more of a file we hold, so its copies (compressed) are recognized."""
        if gen.handle is not None and gen.identity.fp_len < min(size, FINGERPRINT_BYTES):
            head = self._head(gen.fd, size)
            gen.identity = attrs.evolve(gen.identity, fp_len=len(head), fp_hash=fingerprint(head))
            self._mark(gen)

    def _read_lines(self, gen: _Generation, size: int) -> list[Piece]:
        while True:
            remaining = size - gen.pos
            if remaining <= 0:
                return []
            data = self.files.pread(gen.fd, min(self.chunk_size, remaining), gen.pos)
            if not data:
                return []
            pieces = self._lines(gen, data)
            if pieces or len(data) >= remaining:
                return pieces  # (or only an unfinished line is left)
            # Part of an over-long line was consumed; keep reading.

    def _lines(self, gen: _Generation, data: bytes) -> list[Piece]:
        start = gen.at(gen.pos)
        if self._long is not None:
            # Skipping the rest of an over-long line.
            nl = data.find(b"\n")
            if nl < 0:
                gen.pos += len(data)
                return []
            long_start, head = self._long
            self._long = None
            gen.pos += nl + 1
            piece = Piece(long_start, gen.at(gen.pos), head, rewritten=True)
            return [piece, *self._lines(gen, data[nl + 1 :])] if nl + 1 < len(data) else [piece]
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            if len(data) >= self.max_line:
                self._begin_long(gen, data)
            return []
        pieces = self._split_long(start, data[:cut])
        gen.pos += cut
        rest = data[cut:]
        if len(rest) >= self.max_line:
            self._begin_long(gen, rest)
        return pieces

    def _begin_long(self, gen: _Generation, data: bytes) -> None:
        self._long = (gen.at(gen.pos), self._cut_line(data))
        self.truncated_lines += 1
        gen.pos += len(data)

    def _cut_line(self, line: bytes) -> bytes:
        return line[: self.max_line - len(self.marker) - 1] + self.marker + b"\n"

    def _split_long(self, start: int, data: bytes) -> list[Piece]:
        """``data`` (whole lines) as raw pieces, with any over-long line rewritten."""
        limit = self.max_line
        if len(data) <= limit:
            return [Piece(start, start + len(data), data)]
        pieces: list[Piece] = []
        begin = pos = 0
        n = len(data)
        while pos < n:
            # The last LF within max_line bytes: every line up to it is short.
            nl = data.rfind(b"\n", pos, pos + limit)
            if nl >= 0:
                pos = nl + 1
                continue
            if pos > begin:
                pieces.append(Piece(start + begin, start + pos, data[begin:pos]))
            end = data.index(b"\n", pos) + 1
            pieces.append(Piece(start + pos, start + end, self._cut_line(data[pos:end]), True))
            self.truncated_lines += 1
            begin = pos = end
        if begin < n:
            pieces.append(Piece(start + begin, start + n, data[begin:]))
        return pieces

    def _advance(self, gen: _Generation, size: int) -> list[Piece]:
        """Finish ``gen`` (shipping an unfinished last line) and move to the next one."""
        pieces: list[Piece] = []
        if self._long is not None:
            long_start, head = self._long
            self._long = None
            gen.pos = size
            pieces.append(Piece(long_start, gen.at(size), head, rewritten=True))
        elif gen.pos < size:
            # The writer left an unfinished last line: ship it with an LF.
            tail = self.files.pread(gen.fd, size - gen.pos, gen.pos)
            start = gen.at(gen.pos)
            gen.pos = size
            line = self._cut_line(tail) if len(tail) >= self.max_line else tail + b"\n"
            pieces.append(Piece(start, gen.at(size), line, rewritten=True))
            self.completed_lines += 1
            self.log.warn(
                "{path} was rotated with an unfinished last line ({count} bytes); "
                "shipped it with an LF added",
                path=str(self.path),
                count=len(tail),
            )
        if gen.final_size is None:
            gen.final_size = gen.pos
            self._mark(gen)
        self._still = None
        self.cur += 1
        self.gens[self.cur].pos = 0
        self._resolve_bases()
        return pieces

    # -- rotations -------------------------------------------------------

    def observe(self, now: float = 0.0) -> None:
        """Notice rotations without reading lines (while nothing may be shipped).

        Opens (and so keeps readable) every new generation and records it, so
        a rotated file deleted later, or a crash, loses nothing that a restart
        cannot find again.
        """
        if not self.gens:
            self._open_at_path()
            return
        last = self.gens[-1]
        if last.lost:
            self._look_for_rotation(last, now)
        elif last.final_size is None:
            self._size(last)
            if self.gens[-1] is last and last.final_size is None:
                self._look_for_rotation(last, now)

    def _look_for_rotation(self, gen: _Generation, now: float) -> bool:
        """Is another file at the path (and the writer there)?  Opens what follows ``gen``."""
        if not self._writer_moved(gen, now):
            return False
        current = self._probe(self.path.name)
        fresh = self._unknown_files()
        if current is not None and current.readable:
            fresh.append(current)
        added = [g for g in map(self._generation_for, fresh) if g is not None]
        if not added:
            return False
        self.gens += added
        if not gen.lost and gen.final_size is None:
            # The writer has moved on: what the old file holds now is all it will hold.
            gen.final_size = self.files.fstat(gen.fd).size
            self._mark(gen)
        self.rotations += 1
        self.log.info(
            "{path} was rotated; {count} file(s) follow generation {seq}",
            path=str(self.path),
            count=len(added),
            seq=gen.seq,
        )
        self._resolve_bases()
        return True

    def _writer_moved(self, gen: _Generation, now: float) -> bool:
        """Another file is at the path, and it has data or ``gen`` has been still for
        ``rotate_wait`` (the writer may still be finishing the old file)."""
        st = self.files.stat(str(self.path))
        if (
            st is None
            or not st.regular
            or any(g.identity.same_inode(st) for g in self.gens if not g.lost)
        ):
            self._still = None
            return False
        if not gen.lost and st.size == 0:
            size = self.files.fstat(gen.fd).size
            if self._still is None or self._still[0] != size:
                self._still = (size, now)
                return False
            if now - self._still[1] < self.rotate_wait:
                return False
        self._still = None
        return True

    def _unknown_files(self, exclude: _Generation | None = None) -> list[Candidate]:
        """Rotated files in the directory that hold no generation we know, oldest first."""
        others = [g for g in self.gens if g is not exclude and not g.vanished]
        for gen in others:
            if gen.handle is not None:
                # Up to date, so that a compressed copy of it is recognized as such.
                self._fingerprint(gen, gen.final_size or self.files.fstat(gen.fd).size)
        known = [g.identity for g in others] + self.done
        held = {(g.identity.dev, g.identity.ino) for g in others if not g.lost}
        return unknown_rotations(known, self.path.name, self._candidates(), held)

    def _check_content(self, gen: _Generation, st: Stat) -> None:
        """Truncation (copytruncate), and the first content of the generation at the path."""
        fp_len = gen.identity.fp_len
        if fp_len == 0 and gen.pos == 0:
            # Nothing of it was read yet: were files rotated before what it holds now?
            if self._insert_rotated_before(gen, st):
                # The change is explained (the content moved): seen empty from now.
                gen.mtime = st.mtime_ns
                gen.identity = attrs.evolve(gen.identity, mtime_ns=st.mtime_ns)
                self._mark(gen)
                return
            if st.size <= gen.seen and st.mtime_ns != gen.mtime:
                # Written and truncated again between two looks, with no copy left.
                self._truncated(gen, st)
                return
        elif st.size < gen.pos or st.size < fp_len:
            self._truncated(gen, st)
            return
        changed = st.size != gen.seen or st.mtime_ns != gen.mtime
        if (fp_len < FINGERPRINT_BYTES and st.size > fp_len) or (fp_len and changed):
            head = self._head(gen.fd, st.size)
            if not gen.identity.content_matches(head):
                self._truncated(gen, st)
                return
            if len(head) > fp_len:
                gen.identity = identity_of(st, head, gen.identity.version)
                self._mark(gen)
        gen.mtime = st.mtime_ns

    def _insert_rotated_before(self, gen: _Generation, st: Stat) -> bool:
        """``gen`` was empty when opened and nothing of it was read, so what it
        holds was written later: rotated files we do not know, last modified
        before it (copytruncate's copies of it), go first."""
        own = self._head(gen.fd, st.size)
        fresh = [
            c
            for c in self._unknown_files()
            if not gen.identity.same_inode(c.stat)
            and c.stat.mtime_ns <= st.mtime_ns
            and not _same_start(own, c.head)  # (its own compressed copy)
        ]
        inserted = [g for g in map(self._generation_for, fresh) if g is not None]
        if not inserted:
            return False
        index = self.gens.index(gen)
        inserted[0].base, gen.base = gen.base, None
        # Generations are numbered in stream order: ``gen`` (nothing of it was
        # read) gives its number to the first file and takes the last one.
        seqs = sorted([gen.seq, *(g.seq for g in inserted)])
        for g, seq in zip([*inserted, gen], seqs, strict=True):
            g.seq = seq
        self.gens[index:index] = inserted
        for g in [*inserted, gen]:
            self._mark(g)
        self.log.info(
            "{count} rotated file(s) appeared before the content of {path}; shipping them first",
            count=len(inserted),
            path=str(self.path),
        )
        self._resolve_bases()
        return True

    def _truncated(self, gen: _Generation, st: Stat) -> None:
        """``gen``'s file was truncated in place: finish ``gen`` from its copy, if
        logrotate made one, and start a new generation at byte 0 of the file.
        Copies of content written after our last look (truncated more than once
        between two looks) are generations in between."""
        self.truncations += 1
        unknown = self._unknown_files(exclude=gen)
        copy = None
        if gen.identity.fp_len:
            copy = next(
                (c for c in unknown if gen.identity.copied_in(c) and (c.size or 0) >= gen.pos),
                None,
            )
        after_copy = unknown.index(copy) + 1 if copy is not None else 0
        between = [
            c
            for c in unknown[after_copy:]
            if c.stat.mtime_ns <= st.mtime_ns and not gen.identity.same_inode(c.stat)
        ]
        handle = gen.fd
        new = self._new_generation(
            identity_of(st, self._head(handle, st.size), gen.identity.version), handle, st.size, st
        )
        index = self.gens.index(gen)
        inserted = [g for g in map(self._generation_for, between) if g is not None]
        self.gens[index + 1 : index + 1] = [*inserted, new]
        how = self._finish_from(gen, copy)
        if index == self.cur and gen.handle is None:
            self._long = None
        self.log.warn(
            "{path} was truncated (copytruncate) at logical offset {offset}; {how}",
            path=str(self.path),
            offset=(gen.base or 0) + gen.pos,
            how=how,
        )
        self._mark(gen)
        self._resolve_bases()

    def _finish_from(self, gen: _Generation, copy: Candidate | None) -> str:
        """``gen`` goes on in ``copy`` (or is known to be lost); says which."""
        gen.handle = None
        if copy is not None and copy.readable:
            gen.handle = self.files.open(str(self.path.parent / copy.name))
            if gen.handle is not None:
                gen.identity = attrs.evolve(
                    gen.identity, dev=copy.stat.dev, ino=copy.stat.ino, version=copy.version
                )
                gen.final_size = copy.size
                return f"finishing its old content from {copy.name}"
        if copy is not None:
            gen.final_size = copy.size
            return f"its old content is only in {copy.name} (compressed): the rest is declared lost"
        # Bytes after what we read may have been there: count them as gone.
        gen.vanished = True
        gen.final_size = max(gen.pos, gen.seen) + 1
        return "no copy of its old content is left: the rest is declared lost"

    def _resolve_bases(self) -> None:
        """Give every generation whose start is now known its logical base.

        After a generation that is gone with an unknown end, the next one can
        only be placed once the master has named its mark (a rewind): one byte
        past anything the master can hold, so the jump is always a recorded
        gap, never a silent one.
        """
        for i in range(1, len(self.gens)):
            gen, prev = self.gens[i], self.gens[i - 1]
            if gen.base is not None:
                continue
            if prev.base is None:
                return
            if prev.final_size is None:
                if not prev.lost or not self.placed:
                    return
                gen.base = max(self.floor, prev.base + prev.pos) + 1
                prev.final_size = gen.base - prev.base
                self._mark(prev)
                self.log.warn(
                    "Generation {seq} of {path} is gone and its end is unknown; the stream "
                    "goes on at logical offset {offset} (the master records the gap)",
                    seq=prev.seq,
                    path=str(self.path),
                    offset=gen.base,
                )
            else:
                gen.base = prev.base + prev.final_size
            self._mark(gen)

    # -- acknowledgements, rewinds -------------------------------------------

    def release(self, logical: int) -> None:
        """Everything below ``logical`` is delivered: close generations that end there."""
        self.floor = max(self.floor, logical)
        while len(self.gens) > 1 and self.cur > 0:
            first = self.gens[0]
            if first.end is None or first.end > logical:
                break
            if not first.lost:
                # Fingerprint it fully while it is open, so its file is recognized
                # (and never shipped again) after the handle is closed.
                st = self.files.fstat(first.fd)
                head = self._head(first.fd, st.size)
                first.identity = identity_of(st, head, first.identity.version)
                self.files.close(first.fd)
            if first.identity.fp_len and not first.vanished:
                self.done.append(first.identity)
            self._mark(first, DONE)
            self.gens.pop(0)
            self.cur -= 1

    def rewind(self, logical: int) -> int:
        """Read again from ``logical``; returns where reading really restarts.

        Possible back to the first generation still open; earlier than that,
        or inside a generation that is gone, the bytes are lost and reading
        restarts at the next byte we have (the caller declares the gap).
        Later than what we read so far means the caller skips forward.
        """
        self._long = None
        self._still = None
        self.floor = max(self.floor, logical)
        self.placed = True
        self._resolve_bases()
        for i, gen in enumerate(self.gens):
            if gen.base is None:
                break
            if logical < gen.base:
                self.cur, gen.pos = i, 0
                return gen.base
            end = gen.end
            if end is not None and logical >= end and i < len(self.gens) - 1:
                continue
            if gen.lost:
                return self._after_lost(i, logical)
            size = self.files.fstat(gen.fd).size if gen.final_size is None else gen.final_size
            if logical - gen.at(0) > size:
                # Beyond what this file holds: read on from where we are.
                return self.logical
            self.cur = i
            gen.pos = logical - gen.at(0)
            return logical
        return self.logical

    def _after_lost(self, i: int, logical: int) -> int:
        """Reading restarts inside the lost generation ``i``: the next read
        declares what is gone of it from ``logical`` on."""
        gen = self.gens[i]
        self.cur = i
        gen.pos = max(0, logical - gen.at(0))
        return gen.at(gen.pos)

    def close(self) -> None:
        for gen in self.gens:
            if gen.handle is not None:
                self.files.close(gen.handle)
        self.gens = []
        self.cur = 0


def _same_start(a: bytes, b: bytes) -> bool:
    """Two heads of content that are the start of the same bytes."""
    return bool(a) and bool(b) and (a.startswith(b) or b.startswith(a))
