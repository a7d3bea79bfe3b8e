"""The raw tar header scanner, byte by byte, and in agreement with tarfile on good archives."""

import io
import tarfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from decnet.errors import MalformedArchive
from decnet.updater.tarscan import BLOCK, TarHeaderScanner, padded

CAP = 4096


def header(name: bytes, kind: bytes, size: int, *, chksum_delta: int = 0) -> bytes:
    """One ustar header block with a correct (or deliberately wrong) checksum."""
    block = bytearray(BLOCK)
    block[: len(name)] = name
    block[100:108] = b"0000644\0"
    block[108:116] = block[116:124] = b"0000000\0"
    block[124:136] = b"%011o\0" % size if size < 8**11 else b"\x80" + size.to_bytes(11, "big")
    block[136:148] = b"00000000000\0"
    block[148:156] = b" " * 8
    block[156:157] = kind
    block[257:265] = b"ustar\x0000"
    block[148:156] = b"%06o\0 " % (sum(block) + chksum_delta)
    return bytes(block)


def member(name: bytes, data: bytes = b"", kind: bytes = b"0") -> bytes:
    return header(name, kind, len(data)) + data + bytes(padded(len(data)) - len(data))


def extended(kind: bytes, content: bytes) -> bytes:
    return member(b"././@LongLink", content, kind)


def pax(*records: tuple[bytes, bytes], kind: bytes = b"x") -> bytes:
    body = b""
    for key, value in records:
        tail = b" %s=%s\n" % (key, value)
        length = len(tail) + 1
        while len(str(length)) + len(tail) != length:
            length += 1
        body += str(length).encode() + tail
    return extended(kind, body)


END = bytes(2 * BLOCK)


def scan_bytewise(data: bytes, cap: int = CAP) -> TarHeaderScanner:
    scanner = TarHeaderScanner(cap)
    for i in range(len(data)):
        scanner.feed(data[i : i + 1])
    return scanner


def refusal_offset(data: bytes, cap: int = CAP) -> int:
    """Feed one byte at a time; the number of bytes fed when the scanner refused."""
    scanner = TarHeaderScanner(cap)
    for i in range(len(data)):
        try:
            scanner.feed(data[i : i + 1])
        except MalformedArchive:
            return i + 1
    raise AssertionError("not refused")


def tarfile_archive(entries, fmt) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=fmt) as tar:
        for name, kind, data in entries:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.SYMTYPE:
                info.linkname = "target/" + name
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return raw.getvalue()


# -- good archives go through, whatever the chunking ----------------------


@pytest.mark.parametrize(
    "fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=str
)
def test_an_archive_written_by_tarfile_passes_one_byte_at_a_time(fmt):
    entries = [
        ("pkg", tarfile.DIRTYPE, b""),
        ("pkg/" + "n" * 90 + "/" + "m" * 90 + ".py", tarfile.REGTYPE, b"x" * 700),
        ("pkg/empty.py", tarfile.REGTYPE, b""),
        ("pkg/link", tarfile.SYMTYPE, b""),
    ]
    if fmt != tarfile.USTAR_FORMAT:
        entries.append(("pkg/" + "é" * 150 + ".py", tarfile.REGTYPE, b"y" * 1024))
    data = tarfile_archive(entries, fmt)
    scanner = scan_bytewise(data)
    assert scanner.done and scanner.members == len(entries)


names = st.text(alphabet="abcdefghij/é_", min_size=1, max_size=300).filter(
    lambda n: not n.startswith("/") and "//" not in n
)
entry = st.tuples(
    names,
    st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE]),
    st.binary(max_size=1500),
)


@settings(max_examples=60, deadline=None)
@given(
    entries=st.lists(entry, max_size=6),
    fmt=st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]),
    cuts=st.lists(st.integers(min_value=1, max_value=3000), max_size=20),
)
def test_the_scanner_counts_the_same_members_as_tarfile_however_the_bytes_arrive(
    entries, fmt, cuts
):
    data = tarfile_archive(entries, fmt)
    scanner = TarHeaderScanner(CAP)
    pos = 0
    for cut in [*cuts, len(data)]:
        scanner.feed(data[pos : pos + cut])
        pos += cut
    scanner.feed(data[pos:])
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        expected = len(tar.getmembers())
    assert scanner.done and scanner.members == expected


def test_a_pax_size_record_moves_the_next_header_like_tarfile_does():
    """The header says 0 bytes, the pax record 1024: the data holds what looks like a header
    of a 10 GiB long name, which must be skipped as data, not refused."""
    decoy = header(b"././@LongLink", b"L", 10 * 1024**3)
    data = decoy + bytes(BLOCK)
    archive = pax((b"size", b"1024")) + header(b"file", b"0", 0) + data + member(b"after") + END
    scanner = scan_bytewise(archive)
    assert scanner.done and scanner.members == 2
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as tar:
        assert [m.name for m in tar.getmembers()] == ["file", "after"]


def test_data_that_looks_like_a_hostile_header_is_skipped_as_data():
    decoy = header(b"././@LongLink", b"L", 10 * 1024**3)
    scanner = scan_bytewise(member(b"a.tar", decoy) + member(b"b") + END)
    assert scanner.done and scanner.members == 2


def test_a_v7_directory_has_no_data_blocks_as_in_tarfile():
    archive = header(b"olddir/", b"\0", 512) + member(b"next") + END
    scanner = scan_bytewise(archive)
    assert scanner.done and scanner.members == 2


def test_nothing_after_the_end_of_the_archive_is_looked_at():
    scanner = scan_bytewise(member(b"a") + END + b"garbage" * 100)
    assert scanner.done and scanner.members == 1


def test_a_global_header_then_a_pax_header_then_a_member_is_fine():
    archive = pax((b"comment", b"git"), kind=b"g") + pax((b"path", b"p" * 300)) + member(b"x")
    scanner = scan_bytewise(archive + END)
    assert scanner.done and scanner.members == 1


# -- hostile headers are refused at their last byte, before any content -------


@pytest.mark.parametrize("kind", [b"L", b"K", b"x", b"g", b"X"])
def test_an_oversized_extended_header_is_refused_as_soon_as_its_header_block_is_complete(kind):
    hostile = header(b"././@LongLink", kind, 200 * 1024 * 1024)
    archive = member(b"first", b"z" * 600) + hostile + b"a" * 4096
    at = refusal_offset(archive)
    assert at == len(member(b"first", b"z" * 600)) + BLOCK
    with pytest.raises(MalformedArchive, match=r"header of 209715200 bytes at byte 1536"):
        TarHeaderScanner(CAP).feed(archive)


def test_an_extended_header_at_the_cap_is_accepted_and_one_byte_more_is_not():
    path = b"p" * (CAP - 40)
    ok = pax((b"path", path))
    assert len(ok) <= padded(CAP) + BLOCK
    assert scan_bytewise(ok + member(b"x") + END).members == 1
    with pytest.raises(MalformedArchive, match="more than 4096"):
        TarHeaderScanner(CAP).feed(extended(b"L", b"n" * (CAP + 1)) + member(b"x"))
    TarHeaderScanner(CAP).feed(extended(b"L", b"n" * CAP) + member(b"x"))


@pytest.mark.parametrize(
    ("first", "second"),
    [(b"L", b"L"), (b"K", b"K"), (b"x", b"x"), (b"x", b"X"), (b"g", b"g")],
)
def test_two_extended_headers_of_one_kind_for_one_member_are_refused(first, second):
    archive = extended(first, b"a\0") + extended(second, b"b\0") + member(b"x")
    if first in b"xXg":
        archive = pax((b"path", b"a"), kind=first) + pax((b"path", b"b"), kind=second)
    with pytest.raises(MalformedArchive, match=r"two .* headers for one member"):
        TarHeaderScanner(CAP).feed(archive + member(b"x"))


def test_a_long_chain_of_long_names_is_refused_at_the_second():
    """tarfile recurses once per chained extended header (RecursionError at ~1000)."""
    chain = extended(b"L", b"n\0") * 2000
    assert refusal_offset(chain) == len(extended(b"L", b"n\0")) + BLOCK


def test_an_extended_header_with_no_member_after_it_is_refused():
    with pytest.raises(MalformedArchive, match="no member after it"):
        TarHeaderScanner(CAP).feed(extended(b"L", b"name\0") + END)


def test_a_bad_checksum_is_refused():
    with pytest.raises(MalformedArchive, match="bad checksum"):
        TarHeaderScanner(CAP).feed(member(b"ok") + header(b"bad", b"0", 0, chksum_delta=1))


@pytest.mark.parametrize("field", [b"-0000000001\0", b"0000000008\0 ", b"1_0\0        "])
def test_a_malformed_size_field_is_refused(field):
    block = bytearray(header(b"f", b"0", 0))
    block[124:136] = field.ljust(12, b"\0")
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    with pytest.raises(MalformedArchive, match="size"):
        TarHeaderScanner(CAP).feed(bytes(block))


def test_a_negative_base256_size_is_refused():
    block = bytearray(header(b"f", b"0", 0))
    block[124:136] = b"\xff" * 12
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    with pytest.raises(MalformedArchive, match="negative"):
        TarHeaderScanner(CAP).feed(bytes(block))


@pytest.mark.parametrize(
    "body",
    [b"garbage", b"5 a=b\n", b"9 key=value\n", b"12 novalue\n", b"0 =\n", b"11 path=ab"],
)
def test_a_malformed_pax_record_is_refused(body):
    with pytest.raises(MalformedArchive, match="malformed pax record"):
        TarHeaderScanner(CAP).feed(extended(b"x", body) + member(b"x"))


@pytest.mark.parametrize(
    ("records", "kind", "message"),
    [
        (((b"GNU.sparse.map", b"0,10"),), b"x", "sparse"),
        (((b"GNU.sparse.major", b"1"),), b"x", "sparse"),
        (((b"size", b"12x"),), b"x", "size record"),
        (((b"size", b"10"),), b"g", "size record"),
    ],
)
def test_pax_records_the_scanner_cannot_follow_are_refused(records, kind, message):
    with pytest.raises(MalformedArchive, match=message):
        TarHeaderScanner(CAP).feed(pax(*records, kind=kind) + member(b"x"))


def test_an_old_gnu_sparse_member_is_refused():
    with pytest.raises(MalformedArchive, match="'holes' is a sparse file"):
        TarHeaderScanner(CAP).feed(header(b"holes", b"S", 100))
