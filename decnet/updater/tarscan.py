"""A pure scanner of raw (decompressed) tar headers, run before :mod:`tarfile` sees the bytes.

``tarfile`` reads a GNU long-name (``L``, ``K``) or pax (``x``, ``g``) header
*whole* (``fileobj.read(size)``) and keeps it on the member, and the caps of
:mod:`decnet.updater.archive` only count member contents: a 194 KB ``.tar.gz``
with a 200 MB name grew the updater by 572 MiB.  It also recurses once per
chained extended header.  :class:`TarHeaderScanner` is fed the same
decompressed bytes, in whatever pieces they arrive, keeps at most one header
(and one capped extended header) in memory, and raises
:class:`~decnet.errors.MalformedArchive` as soon as a header block shows a
problem, i.e. before ``tarfile`` allocates anything for it.

It follows ``tarfile``'s own rules for where the next header starts (the
``size`` field, a pax ``size`` record, data only for regular and unknown
types, a V7 ``"name/"`` regular file being a directory) so that both read the
same blocks as headers; anything it cannot follow exactly is refused:

* an extended header larger than ``max_header`` bytes;
* two extended headers of the same kind before one member (``tarfile`` would
  recurse), or one that is not followed by a member;
* a header with a bad checksum or a malformed size field;
* a pax record that is not ``"<len> <key>=<value>\\n"``, a ``size`` record that
  is not a decimal number, a ``size`` in a global header;
* sparse files (old GNU ``S`` members, pax ``GNU.sparse.*`` records), whose maps
  ``tarfile`` reads from further blocks.

The first all-zero block ends the archive, as it does for ``tarfile``; nothing
after it is looked at.
"""

from __future__ import annotations

import struct
import tarfile

from decnet import config
from decnet.errors import MalformedArchive

BLOCK = tarfile.BLOCKSIZE
_ZERO_BLOCK = bytes(BLOCK)
_PAX = (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE)  # per-member pax: one slot
_EXTENDED = {
    tarfile.XHDTYPE: "pax",
    tarfile.SOLARIS_XHDTYPE: "pax",
    tarfile.XGLTYPE: "global pax",
    tarfile.GNUTYPE_LONGNAME: "GNU long name",
    tarfile.GNUTYPE_LONGLINK: "GNU long link",
}

HEADER, EXTENDED, SKIP, DONE = "header", "extended", "skip", "done"


def padded(size: int) -> int:
    """``size`` rounded up to whole 512-byte blocks."""
    return -(-size // BLOCK) * BLOCK


def checksum_ok(block: bytes) -> bool:
    """The header checksum, unsigned or signed (as ``tarfile.calc_chksums`` accepts)."""
    stored = number(block[148:156], "checksum")
    unsigned = 256 + sum(struct.unpack_from("148B8x356B", block))
    signed = 256 + sum(struct.unpack_from("148b8x356b", block))
    return stored in (unsigned, signed)


def number(field: bytes, what: str) -> int:
    """A tar number field: NUL/space terminated octal, or GNU base-256 (``tarfile.nti``)."""
    if field[:1] in (b"\x80", b"\xff"):
        value = int.from_bytes(field[1:], "big")
        return value - 256 ** (len(field) - 1) if field[:1] == b"\xff" else value
    text = field.split(b"\0", 1)[0].strip()
    if not text:
        return 0
    if not all(0x30 <= c <= 0x37 for c in text):
        raise MalformedArchive(f"tar header has a malformed {what} field {field[:16]!r}")
    return int(text, 8)


class TarHeaderScanner:
    """Follows a tar stream header by header; :meth:`feed` raises on the first problem.

    Sans-IO: feed it the decompressed bytes in any pieces.  ``members`` counts
    the member headers seen (extended headers excluded), ``offset`` the bytes
    fed so far.
    """

    def __init__(self, max_header: int = config.MAX_RELEASE_HEADER_BYTES):
        self.max_header = max_header
        self.state = HEADER
        self.offset = 0
        self.members = 0
        self._block = bytearray()
        self._extended = bytearray()
        self._extended_type = b""
        self._extended_left = 0
        self._skip = 0
        self._chain: set[bytes] = set()  # extended header kinds since the last member
        self._pax_size: int | None = None

    @property
    def done(self) -> bool:
        """True once the end-of-archive block was seen."""
        return self.state == DONE

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        pos = 0
        while pos < len(view) and self.state != DONE:
            if self.state == SKIP:
                step = min(self._skip, len(view) - pos)
                self._skip -= step
                if self._skip == 0:
                    self.state = HEADER
            elif self.state == EXTENDED:
                step = min(self._extended_left, len(view) - pos)
                self._extended += view[pos : pos + step]
                self._extended_left -= step
                if self._extended_left == 0:
                    self._extended_done()
            else:
                step = min(BLOCK - len(self._block), len(view) - pos)
                self._block += view[pos : pos + step]
                if len(self._block) == BLOCK:
                    block, self._block = bytes(self._block), bytearray()
                    self._header(block, self.offset + step - BLOCK)
            pos += step
            self.offset += step

    # -- one header block ------------------------------------------------

    def _header(self, block: bytes, at: int) -> None:
        if block == _ZERO_BLOCK:
            if self._chain:
                raise MalformedArchive(f"extended tar header at byte {at} has no member after it")
            self.state = DONE
            return
        if not checksum_ok(block):
            raise MalformedArchive(f"tar header at byte {at} is corrupt (bad checksum)")
        kind = block[156:157]
        size = number(block[124:136], "size")
        if size < 0:
            raise MalformedArchive(f"tar header at byte {at} has a negative size")
        if kind in _EXTENDED:
            self._begin_extended(kind, size, at)
            return
        if kind == tarfile.GNUTYPE_SPARSE:
            raise MalformedArchive(f"member {_name(block)!r} is a sparse file: only files and dirs")
        if self._pax_size is not None:
            size = self._pax_size
        name = block[:100].split(b"\0", 1)[0]
        if kind == tarfile.AREGTYPE and name.endswith(b"/"):
            kind = tarfile.DIRTYPE  # tarfile.frombuf: a V7 directory
        self.members += 1
        self._chain.clear()
        self._pax_size = None
        has_data = kind in tarfile.REGULAR_TYPES or kind not in tarfile.SUPPORTED_TYPES
        self._skip = padded(size) if has_data else 0
        self.state = SKIP if self._skip else HEADER

    def _begin_extended(self, kind: bytes, size: int, at: int) -> None:
        what = _EXTENDED[kind]
        slot = tarfile.XHDTYPE if kind in _PAX else kind
        if slot in self._chain:
            raise MalformedArchive(f"two {what} headers for one member at byte {at}")
        if size > self.max_header:
            raise MalformedArchive(
                f"{what} header of {size} bytes at byte {at}: more than {self.max_header}"
            )
        self._chain.add(slot)
        self._extended_type = kind
        self._extended_left = size
        self._extended = bytearray()
        self._skip = padded(size) - size
        self.state = EXTENDED if size else (SKIP if self._skip else HEADER)
        if size == 0:
            self._extended_done()

    def _extended_done(self) -> None:
        kind, data = self._extended_type, bytes(self._extended)
        self._extended = bytearray()
        if kind in (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.XGLTYPE):
            self._pax_records(data, global_=kind == tarfile.XGLTYPE)
        self.state = SKIP if self._skip else HEADER

    def _pax_records(self, data: bytes, *, global_: bool) -> None:
        pos = 0
        while pos < len(data):
            space = data.find(b" ", pos, pos + 21)
            digits = data[pos:space] if space > pos else b""
            length = int(digits) if digits.isdigit() else 0
            end = pos + length
            if length <= len(digits) + 1 or end > len(data) or data[end - 1 : end] != b"\n":
                raise MalformedArchive(f"malformed pax record at byte {pos} of its header")
            key, eq, value = data[space + 1 : end - 1].partition(b"=")
            if not eq or not key:
                raise MalformedArchive(f"malformed pax record at byte {pos} of its header")
            if key.startswith(b"GNU.sparse."):
                raise MalformedArchive("a pax header describes a sparse file: only files and dirs")
            if key == b"size":
                if global_ or not value.isdigit():
                    raise MalformedArchive(f"pax size record {value[:24]!r} is not allowed here")
                self._pax_size = int(value)
            pos = end


def _name(block: bytes) -> str:
    return block[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
