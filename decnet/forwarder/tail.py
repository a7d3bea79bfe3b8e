"""Follow a log file by path *and* identity, across rotations, in logical offsets.

The stream is the concatenation of every generation of the file (the file
that was at the path, then the one after a rotation, ...).  A **logical
offset** counts bytes of that concatenation, so it only grows: rotation,
copytruncate and delete-and-recreate all start a new generation whose first
byte has the logical offset where the previous generation stopped.

Identity is ``(st_dev, st_ino)`` plus a SHA-256 of the first bytes already
read (up to :data:`FINGERPRINT_BYTES`), so a new file that reuses an old inode
number is not mistaken for the old one when we come back after a restart.

Rules (``docs/Logging.md``):

* only whole lines are shipped, split on ``\\n`` alone (a ``\\r`` is data);
* a line longer than ``max_line`` bytes (LF included) is shipped cut to
  ``max_line`` with a marker, counted, and the stream goes on after it;
* on rename-and-create or delete-and-recreate, the old file is read to its end
  before the new one; we switch once the new file has data (the writer moved)
  or the old file has been still for ``rotate_wait`` seconds, and a last line
  the writer never finished is shipped with an LF added (counted);
* copytruncate (the file shrank below our position) starts again at byte 0
  of the same file; lines written between the copy and the truncate are lost
  by copytruncate itself.

Everything here blocks (``os`` calls); the forwarder runs it in a thread and
never calls into one :class:`Tailer` from two threads at once.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import attrs
from twisted.logger import Logger

from decnet import config

FINGERPRINT_BYTES = 1024
DEFAULT_CHUNK = 1024 * 1024
DEFAULT_ROTATE_WAIT = 5.0


@attrs.frozen
class FileIdentity:
    dev: int
    ino: int
    fp_len: int = 0
    fp_hash: str = ""

    def same_file(self, st: os.stat_result) -> bool:
        return (st.st_dev, st.st_ino) == (self.dev, self.ino)


@attrs.frozen
class TailPosition:
    """Where a stream stands: a file identity, its first byte's logical offset, a position."""

    identity: FileIdentity
    base: int
    pos: int

    @property
    def logical(self) -> int:
        return self.base + self.pos


@attrs.frozen
class Piece:
    """Data to ship for logical offsets ``[start, end)``.

    ``data`` is either the raw bytes (``len(data) == end - start``, whole
    lines) or one rewritten line (truncated, or given a missing LF).
    """

    start: int
    end: int
    data: bytes
    rewritten: bool = False

    @property
    def raw(self) -> bool:
        return not self.rewritten


def fingerprint_of(fd: int, length: int) -> str:
    return hashlib.sha256(os.pread(fd, length, 0)).hexdigest() if length else ""


class _Generation:
    """One file of the stream, open by descriptor."""

    def __init__(self, fd: int, identity: FileIdentity, base: int, pos: int = 0):
        self.fd = fd
        self.identity = identity
        self.base = base
        self.pos = pos  # next byte to read
        self.final_size: int | None = None  # set once we moved past this file

    @property
    def end(self) -> int | None:
        return None if self.final_size is None else self.base + self.final_size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Tailer:
    """Reads whole lines from a rotating file; see the module docstring."""

    log = Logger()

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        max_line: int = config.DEFAULT_MAX_LINE,
        chunk_size: int = DEFAULT_CHUNK,
        rotate_wait: float = DEFAULT_ROTATE_WAIT,
        marker: bytes = config.TRUNCATION_MARKER,
    ):
        if max_line < len(marker) + 2:
            raise ValueError("max_line is too small to hold the truncation marker")
        self.path = Path(path)
        self.max_line = max_line
        self.chunk_size = max(chunk_size, max_line + 1)
        self.rotate_wait = rotate_wait
        self.marker = marker
        self.gens: list[_Generation] = []
        self.cur = 0  # index in gens being read
        self.next_base = 0  # logical offset of a generation not opened yet
        self.truncated_lines = 0
        self.completed_lines = 0  # unfinished last lines given an LF at rotation
        self.rotations = 0
        self.truncations = 0
        self._long: tuple[int, bytes] | None = None  # (logical start, head) of a long line
        self._still_since: float | None = None

    # -- start-up --------------------------------------------------------

    def locate(self, saved: TailPosition | None) -> str:
        """Open the stream where ``saved`` says (or at the start); returns what happened."""
        self.close()
        if saved is None:
            self._open_path(0)
            return "starting at the beginning of the file" if self.gens else "waiting for the file"
        st = _stat(self.path)
        if st is not None and saved.identity.same_file(st):
            fd = _open_ro(self.path)
            if fd is not None and self._fingerprint_matches(fd, saved.identity):
                return self._resume(fd, saved, "resuming in the same file")
            if fd is not None:
                os.close(fd)
        rotated = self._find_rotated(saved.identity)
        if rotated is not None:
            fd = _open_ro(rotated)
            if fd is not None and self._fingerprint_matches(fd, saved.identity):
                return self._resume(fd, saved, f"resuming in rotated file {rotated.name}")
            if fd is not None:
                os.close(fd)
        self.next_base = saved.logical
        self._open_path(saved.logical)
        return (
            "the file we were reading is gone; starting the current file at logical offset "
            f"{saved.logical} (lines written to the old file after our position are lost)"
        )

    def _resume(self, fd: int, saved: TailPosition, what: str) -> str:
        size = os.fstat(fd).st_size
        gen = _Generation(fd, saved.identity, saved.base, saved.pos)
        self.gens, self.cur = [gen], 0
        if size < saved.pos:
            self._truncated(gen)
            return what + " (it was truncated meanwhile; starting it again at byte 0)"
        return what

    def _fingerprint_matches(self, fd: int, identity: FileIdentity) -> bool:
        if identity.fp_len == 0:
            return True
        if os.fstat(fd).st_size < identity.fp_len:
            return False
        return fingerprint_of(fd, identity.fp_len) == identity.fp_hash

    def _find_rotated(self, identity: FileIdentity) -> Path | None:
        try:
            entries = list(os.scandir(self.path.parent))
        except OSError:
            return None
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and identity.same_file(st):
                return Path(entry.path)
        return None

    def _open_path(self, base: int) -> bool:
        fd = _open_ro(self.path)
        if fd is None:
            return False
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return False
        self.gens.append(_Generation(fd, FileIdentity(st.st_dev, st.st_ino), base))
        self.cur = len(self.gens) - 1
        return True

    # -- reading ---------------------------------------------------------

    @property
    def logical(self) -> int:
        """Logical offset of the next byte to read."""
        if not self.gens:
            return self.next_base
        gen = self.gens[self.cur]
        return gen.base + gen.pos

    def read(self, now: float = 0.0) -> list[Piece]:
        """The next whole lines (possibly none).  ``now`` (seconds) drives ``rotate_wait``."""
        if not self.gens:
            if not self._open_path(self.next_base):
                return []
            self.log.info("Log file {path} appeared", path=str(self.path))
        while True:
            gen = self.gens[self.cur]
            if gen.final_size is not None:
                size = gen.final_size
            else:
                size = os.fstat(gen.fd).st_size
                if size < gen.pos:
                    self._truncated(gen)
            remaining = size - gen.pos
            if remaining <= 0:
                break
            data = os.pread(gen.fd, min(self.chunk_size, remaining), gen.pos)
            if not data:
                break
            pieces = self._lines(gen, data)
            if pieces:
                self._still_since = None
                return pieces
            if len(data) >= remaining:
                break  # only an unfinished line is left
            # Part of an over-long line was consumed; keep reading.
        # At the end of this generation (or only an unfinished line is left).
        if self.cur < len(self.gens) - 1:
            # Re-reading after a rewind: the next generation is already known.
            pieces, switched = self._advance(gen, size, now)
        else:
            pieces, switched = self._check_rotation(gen, size, now)
        if not pieces and switched:
            return self.read(now)  # the new generation may already have lines
        return pieces

    def _lines(self, gen: _Generation, data: bytes) -> list[Piece]:
        start = gen.base + gen.pos
        if self._long is not None:
            # Skipping the rest of an over-long line.
            nl = data.find(b"\n")
            if nl < 0:
                gen.pos += len(data)
                return []
            long_start, head = self._long
            self._long = None
            gen.pos += nl + 1
            piece = Piece(long_start, gen.base + gen.pos, head, rewritten=True)
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
        self._long = (gen.base + gen.pos, self._cut_line(data))
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

    def _truncated(self, gen: _Generation) -> None:
        self.truncations += 1
        self.log.warn(
            "{path} shrank below our position {pos} (copytruncate?); reading it again from "
            "byte 0 as a new generation at logical offset {offset}",
            path=str(self.path),
            pos=gen.pos,
            offset=gen.base + gen.pos,
        )
        gen.base += gen.pos
        gen.pos = 0
        gen.identity = attrs.evolve(gen.identity, fp_len=0, fp_hash="")
        self._long = None

    def _check_rotation(self, gen: _Generation, size: int, now: float) -> tuple[list[Piece], bool]:
        st = _stat(self.path)
        if st is not None and gen.identity.same_file(st):
            self._still_since = None
            return [], False
        if st is None or not stat.S_ISREG(st.st_mode):
            return [], False  # renamed or deleted, nothing new yet: keep reading the old file
        # Another file is at the path now.  Switch once the writer moved
        # there (it has data) or the old file has been still long enough.
        if st.st_size == 0:
            if self._still_since is None:
                self._still_since = now
                return [], False
            if now - self._still_since < self.rotate_wait:
                return [], False
        return self._advance(gen, size, now)

    def _advance(self, gen: _Generation, size: int, now: float) -> tuple[list[Piece], bool]:
        pieces: list[Piece] = []
        if gen.pos < size and self._long is None:
            # The writer left an unfinished last line: ship it with an LF.
            tail = os.pread(gen.fd, size - gen.pos, gen.pos)
            start = gen.base + gen.pos
            gen.pos = size
            line = self._cut_line(tail) if len(tail) >= self.max_line else tail + b"\n"
            pieces.append(Piece(start, gen.base + size, line, rewritten=True))
            self.completed_lines += 1
            self.log.warn(
                "{path} was rotated with an unfinished last line ({count} bytes); "
                "shipped it with an LF added",
                path=str(self.path),
                count=len(tail),
            )
        elif self._long is not None:
            long_start, head = self._long
            self._long = None
            gen.pos = size
            pieces.append(Piece(long_start, gen.base + size, head, rewritten=True))
        if gen.final_size is None:
            gen.final_size = gen.pos
        self._still_since = None
        if self.cur < len(self.gens) - 1:
            self.cur += 1
            self.gens[self.cur].pos = 0
            return pieces, True
        if self._open_path(gen.base + gen.final_size):
            self.rotations += 1
            self.log.info(
                "{path} was rotated; finished the old file at logical offset {offset}",
                path=str(self.path),
                offset=gen.base + gen.final_size,
            )
            return pieces, True
        return pieces, False

    # -- positions, acknowledgements, rewinds ----------------------------

    def position_at(self, logical: int) -> TailPosition | None:
        """The persistable position for ``logical`` (which must be a read position)."""
        for gen in reversed(self.gens):
            if gen.base <= logical and (gen.end is None or logical <= gen.end):
                pos = logical - gen.base
                identity = gen.identity
                fp_len = min(pos, FINGERPRINT_BYTES)
                if fp_len > identity.fp_len and gen.fd >= 0:
                    identity = attrs.evolve(
                        identity, fp_len=fp_len, fp_hash=fingerprint_of(gen.fd, fp_len)
                    )
                    gen.identity = identity
                return TailPosition(identity, gen.base, pos)
        return None

    def release(self, logical: int) -> None:
        """Everything below ``logical`` is delivered: close generations that end there."""
        while len(self.gens) > 1 and self.cur > 0:
            first = self.gens[0]
            if first.end is None or first.end > logical:
                break
            first.close()
            self.gens.pop(0)
            self.cur -= 1

    def rewind(self, logical: int) -> int:
        """Read again from ``logical``; returns where reading really restarts.

        Possible back to the first generation still open; earlier than that
        the bytes are gone (the caller reports the gap).  Later than what we
        read so far means the caller skips forward through the data.
        """
        self._long = None
        self._still_since = None
        for i, gen in enumerate(self.gens):
            end = gen.end
            if gen.base <= logical and (end is None or logical < end or i == len(self.gens) - 1):
                size = os.fstat(gen.fd).st_size if end is None else gen.final_size
                if logical - gen.base > size:
                    # Beyond what this file holds: read on from where we are.
                    return self.logical
                self.cur = i
                gen.pos = logical - gen.base
                return logical
        if self.gens:
            self.cur = 0
            self.gens[0].pos = 0
            return self.gens[0].base
        return self.next_base

    def close(self) -> None:
        for gen in self.gens:
            gen.close()
        self.gens = []
        self.cur = 0


def _stat(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def _open_ro(path: Path) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOATIME", 0))
    except PermissionError:
        try:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
    except OSError:
        return None
