"""The bytes a decoy connection received and has not parsed yet, with a work meter.

Every decoy parser reads its input through an :class:`Inbox`: one
``bytearray`` and a read offset.  Taking an item advances the offset (no copy
of the rest of the buffer); the consumed prefix is dropped once per batch of
work (:meth:`Inbox.compact`, O(1) amortised in CPython).  Positions given to
and returned by the methods are relative to the read offset, so a parser may
remember one (say, where its search for a line end should resume) across
calls as long as it consumes nothing in between.

The meter makes linearity testable without a stopwatch: ``scanned`` counts the
bytes a search looked at, ``copied`` the bytes copied out.  A linear parser
keeps ``work`` within a small multiple of ``received`` however the input is
chunked; one that rescans or copies the rest of its buffer for every item
does not.
"""

from __future__ import annotations

import re
import struct

TOO_LONG = object()
"""Returned by :meth:`Inbox.next_line` when no line end comes within the limit."""


class Inbox:
    """Unparsed input: a bytearray, a read offset and counters of the work done on it."""

    __slots__ = ("_buf", "_line_scan", "_pos", "copied", "received", "scanned")

    def __init__(self):
        self._buf = bytearray()
        self._pos = 0
        self._line_scan = 0  # relative: where next_line's search resumes
        self.received = 0
        self.scanned = 0
        self.copied = 0

    @property
    def work(self) -> int:
        """Bytes scanned plus bytes copied out since the start."""
        return self.scanned + self.copied

    def __len__(self) -> int:
        return len(self._buf) - self._pos

    def extend(self, data: bytes) -> None:
        self._buf += data
        self.received += len(data)

    def byte_at(self, i: int) -> int:
        """The byte at relative position ``i`` (an ``IndexError`` past the end)."""
        if i >= len(self):
            raise IndexError(i)
        return self._buf[self._pos + i]

    def find(self, sub: bytes, start: int = 0, end: int | None = None) -> int:
        """Relative index of ``sub`` at or after ``start`` (and ending by ``end``), or -1."""
        lo = self._pos + start
        hi = len(self._buf) if end is None else max(lo, min(len(self._buf), self._pos + end))
        i = self._buf.find(sub, lo, hi)
        self.scanned += (hi if i < 0 else i + len(sub)) - lo
        return -1 if i < 0 else i - self._pos

    def search(self, pattern: re.Pattern, start: int = 0) -> tuple[int, bytes] | None:
        """``(relative index, matched bytes)`` of ``pattern``'s first match, or ``None``."""
        lo = self._pos + start
        m = pattern.search(self._buf, lo)
        self.scanned += (len(self._buf) if m is None else m.end()) - lo
        if m is None:
            return None
        return m.start() - self._pos, m.group()

    def match(self, pattern: re.Pattern) -> int:
        """Length of ``pattern``'s match at the read offset (0 when it does not match)."""
        m = pattern.match(self._buf, self._pos)
        end = self._pos + 1 if m is None else m.end()
        self.scanned += end - self._pos
        return 0 if m is None else end - self._pos

    def count(self, sub: bytes, end: int) -> int:
        """Occurrences of ``sub`` in the next ``end`` bytes."""
        self.scanned += end
        return self._buf.count(sub, self._pos, self._pos + end)

    def view(self) -> tuple[bytearray, int, int]:
        """``(buffer, read offset, end)`` for a parser's own tight loop; read only.

        The parser reports what it consumed and looked at with :meth:`advance`.
        """
        return self._buf, self._pos, len(self._buf)

    def advance(self, n: int, scanned: int) -> None:
        """Consume ``n`` bytes after a loop over :meth:`view` that looked at ``scanned``."""
        self.scanned += scanned
        self.skip(n)

    def unpack_from(self, layout: struct.Struct, start: int = 0) -> tuple:
        """``layout.unpack_from`` at relative position ``start`` (enough bytes must be there)."""
        self.scanned += layout.size
        return layout.unpack_from(self._buf, self._pos + start)

    def peek(self, n: int) -> bytes:
        """Copy out the next ``n`` bytes (fewer if fewer are buffered) without consuming them."""
        data = bytes(self._buf[self._pos : self._pos + n])
        self.copied += len(data)
        return data

    def take(self, n: int) -> bytes:
        """Copy out and consume the next ``n`` bytes (fewer if fewer are buffered)."""
        n = min(n, len(self))
        data = bytes(self._buf[self._pos : self._pos + n])
        self.copied += n
        self.skip(n)
        return data

    def skip(self, n: int) -> None:
        """Consume the next ``n`` bytes without copying them."""
        n = min(n, len(self))
        self._pos += n
        self._line_scan = max(0, self._line_scan - n)

    def unread(self, data: bytes) -> None:
        """Put ``data`` back in front of the unparsed bytes (a parser handed out too much)."""
        self._buf[self._pos : self._pos] = data
        self._line_scan = 0

    def next_line(self, delimiter: bytes, limit: int):
        """The next line without its delimiter; ``None`` until one is complete.

        ``TOO_LONG`` when the line (delimiter excluded) would exceed ``limit``
        bytes.  A search that finds no delimiter resumes where it stopped next
        time, so a line trickling in a byte at a time is scanned once.
        """
        start = self._line_scan
        i = self.find(delimiter, start, limit + len(delimiter))
        if i < 0:
            pending = len(self)
            if pending >= limit + len(delimiter):
                return TOO_LONG
            self._line_scan = max(0, pending - len(delimiter) + 1)
            return None
        line = self.take(i)
        self.skip(len(delimiter))
        self._line_scan = 0
        return line

    def clear(self) -> None:
        """Drop everything buffered (the connection is closing)."""
        self._buf.clear()
        self._pos = 0
        self._line_scan = 0

    def compact(self) -> None:
        """Release the consumed prefix (cheap: CPython moves the bytearray's start)."""
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
