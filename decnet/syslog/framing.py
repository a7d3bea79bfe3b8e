"""RFC 5425 §4.3 / RFC 6587 §3.4.1 octet counting: ``MSG-LEN SP SYSLOG-MSG``.

Sans-IO: :class:`OctetCountingDecoder` is fed whatever bytes a transport
delivered (one byte at a time or megabytes at once) and returns every complete
frame.  ``MSG-LEN`` is ``NONZERO-DIGIT *DIGIT``; anything else in the prefix,
a prefix with more digits than the largest allowed frame needs, or a frame
longer than the cap is a :class:`FramingError`.  The error carries the frames
that were complete before the bad prefix, so a caller that closes the
connection on error still keeps everything received before it.
"""

from __future__ import annotations

from decnet import config
from decnet.errors import DecnetError


class FramingError(DecnetError):
    """The byte stream is not valid octet-counted framing; close the connection.

    ``frames`` holds the frames completed by the same ``feed`` call before the
    error; ``offset`` is the stream position (bytes) of the offending prefix.
    """

    def __init__(self, message: str, frames: list[bytes] | None = None, offset: int = 0):
        super().__init__(message)
        self.frames = frames if frames is not None else []
        self.offset = offset


class MalformedPrefix(FramingError):
    """The length prefix is not ``NONZERO-DIGIT *DIGIT SP``."""


class FrameTooLarge(FramingError):
    """The announced frame is larger than the receiver's cap."""


_DIGITS = frozenset(b"0123456789")


def encode_frame(message: bytes) -> bytes:
    """One octet-counted frame.  Empty messages cannot be framed (MSG-LEN ≥ 1)."""
    if not message:
        raise ValueError("RFC 5425 frames carry at least one byte")
    return b"%d %s" % (len(message), message)


def encode_lines(lines: list[bytes]) -> bytes:
    """Frame many messages at once (the plain-mode hot path: one join, no per-frame write)."""
    return b"".join([b"%d %s" % (len(line), line) for line in lines])


class OctetCountingDecoder:
    """Incremental decoder with a hard frame cap.

    ``strip_lf`` removes one trailing LF inside a frame (stock senders such as
    rsyslog with some templates append it; a syslog message never needs it).
    After a :class:`FramingError` the decoder is dead: every later ``feed``
    raises the same error, because the stream cannot be resynchronised.
    """

    def __init__(self, max_frame: int = config.DEFAULT_MAX_FRAME, *, strip_lf: bool = True):
        if max_frame < 1:
            raise ValueError("max_frame must be positive")
        self.max_frame = max_frame
        self.strip_lf = strip_lf
        # A valid prefix has at most this many digits; more is refused at once
        # (a 20-digit "length" never makes us wait for more bytes).
        self.max_digits = len(str(max_frame))
        self._buf = b""
        self._consumed = 0  # stream offset of _buf[0]
        self.error: FramingError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame (0 at a frame boundary)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data``; return the frames it completed (possibly none)."""
        if self.error is not None:
            raise type(self.error)(str(self.error), [], self.error.offset)
        # The remainder is at most one partial frame; ``buf`` stays immutable
        # bytes so a frame is one slice (one copy), not a bytearray slice plus
        # a conversion.
        buf = self._buf + data if self._buf else bytes(data)
        frames: list[bytes] = []
        append = frames.append
        find = buf.find
        pos = 0
        end = len(buf)
        max_digits = self.max_digits
        max_frame = self.max_frame
        strip = self.strip_lf
        try:
            while pos < end:
                sp = find(b" ", pos, pos + max_digits + 1)
                if sp < 0:
                    # No space yet: fine only while what we have is a valid
                    # prefix that may still be completed.
                    self._check_partial_prefix(buf, pos, end)
                    break
                digits = buf[pos:sp]
                if not digits.isdigit() or buf[pos] == 0x30:
                    raise self._malformed(digits, pos)
                length = int(digits)
                if length > max_frame:
                    raise FrameTooLarge(
                        f"frame of {length} bytes exceeds the {max_frame}-byte cap",
                        offset=self._consumed + pos,
                    )
                stop = sp + 1 + length
                if stop > end:
                    break
                if strip and buf[stop - 1] == 0x0A:
                    append(buf[sp + 1 : stop - 1])
                else:
                    append(buf[sp + 1 : stop])
                pos = stop
        except FramingError as exc:
            exc.frames = frames
            self.error = exc
            self._buf = b""
            raise
        if pos:
            self._consumed += pos
            self._buf = buf[pos:] if pos < end else b""
        else:
            self._buf = buf
        return frames

    def _check_partial_prefix(self, buf: bytes, pos: int, end: int) -> None:
        head = bytes(buf[pos:end])
        if len(head) > self.max_digits or not all(b in _DIGITS for b in head):
            raise self._malformed(head, pos)
        if head[:1] == b"0":
            raise self._malformed(head, pos)

    def _malformed(self, prefix: bytes | bytearray, pos: int) -> MalformedPrefix:
        shown = bytes(prefix[:24])
        if not prefix:
            why = "empty length prefix"
        elif len(prefix) > self.max_digits and all(b in _DIGITS for b in prefix[: self.max_digits]):
            why = f"length prefix longer than {self.max_digits} digits"
        elif prefix[:1] == b"0":
            why = "length prefix starts with 0"
        else:
            why = "length prefix is not a decimal number"
        return MalformedPrefix(f"{why}: {shown!r}", offset=self._consumed + pos)
