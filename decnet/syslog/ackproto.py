"""The acknowledged protocol (``decnet-syslog/1``): messages, sans-IO.

Negotiated with TLS ALPN; a peer that does not offer it speaks plain RFC 5425.
Every message travels in one octet-counted frame (``framing.encode_frame``) in
either direction; the first byte names the message.  All numbers are ASCII
decimal without leading zeros.  ``docs/Logging.md`` has the state machine.

=========  =========  ==================================================
message    direction  body
=========  =========  ==================================================
HELLO      F → L      ``H 1 <stream>``: protocol version, stream name;
                      in version 2 (ALPN ``decnet-syslog/2``)
                      ``H 2 <stream> <acked>``: also the offset below
                      which a listener has acknowledged the stream
                      (this one or another: the worker may have moved)
RESUME     L → F      ``R <offset>``: the stream's durable high-water mark
DATA       F → L      ``D <start> <end> <lines>``: whole lines that span
                      stream offsets ``[start, end)``
GAP        F → L      ``G <start> <end>``: stream offsets ``[start, end)``
                      are gone on the worker (a rotated file was deleted
                      or compressed before it was shipped)
ACK        L → F      ``A <offset>``: everything below is durable
ERROR      L → F      ``E <reason>``: sent before the listener closes
STATUS     F → L      ``S <end>``: the stream's end on the worker (how far
                      the forwarder's files reach), for the listener's
                      log lag; informational, never acknowledged
=========  =========  ==================================================

A listener older than STATUS refuses ``S`` as an unknown message (ERROR, then
it closes): upgrade the listener before the forwarders (``docs/Logging.md``).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import attrs

from decnet.errors import DecnetError

VERSION = 1
VERSION_MOVES = 2  # HELLO carries the worker's acknowledged offset
MAX_OFFSET = 2**63 - 1
STREAM_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


class ProtocolError(DecnetError):
    """A message that is not valid ``decnet-syslog/1``; the connection is closed."""


@attrs.frozen
class Hello:
    stream: str
    version: int = VERSION
    # Version 2: everything below this offset was acknowledged by some listener.
    acked: int | None = None


@attrs.frozen
class Resume:
    offset: int


@attrs.frozen
class Data:
    start: int
    end: int
    payload: bytes


@attrs.frozen
class Gap:
    start: int
    end: int


@attrs.frozen
class Ack:
    offset: int


@attrs.frozen
class Error:
    reason: str


@attrs.frozen
class Status:
    end: int


Message = Hello | Resume | Data | Gap | Ack | Error | Status

#: What a listener older than STATUS answers to ``S`` (its ERROR reason contains this).
UNKNOWN_STATUS = "unknown message type b'S'"


def validate_stream_name(name: str) -> str:
    """Stream names are file names under the ingest dir: lowercase, no slashes, ≤ 64."""
    if not isinstance(name, str) or not STREAM_NAME_RE.fullmatch(name) or ".." in name:
        raise ProtocolError(
            f"invalid stream name {name!r}: use 1-64 characters of a-z, 0-9, '.', '_', '-'"
        )
    return name


def encode_hello(stream: str, acked: int | None = None) -> bytes:
    """Version 1 HELLO, or with ``acked`` the version 2 one (``decnet-syslog/2`` only)."""
    name = validate_stream_name(stream).encode("ascii")
    if acked is None:
        return b"H %d %s" % (VERSION, name)
    return b"H %d %s %d" % (VERSION_MOVES, name, acked)


def encode_resume(offset: int) -> bytes:
    return b"R %d" % offset


def data_header(start: int, end: int) -> bytes:
    """``D start end `` — the payload follows directly (saves one copy of it)."""
    return b"D %d %d " % (start, end)


def encode_data(start: int, end: int, payload: bytes) -> bytes:
    return data_header(start, end) + payload


def encode_gap(start: int, end: int) -> bytes:
    return b"G %d %d" % (start, end)


def encode_ack(offset: int) -> bytes:
    return b"A %d" % offset


def encode_status(end: int) -> bytes:
    return b"S %d" % end


def encode_error(reason: str) -> bytes:
    return b"E " + reason.encode("utf-8", "replace")[:512]


def _number(raw: bytes, what: str) -> int:
    if not raw.isdigit() or (len(raw) > 1 and raw[0] == 0x30) or len(raw) > 19:
        raise ProtocolError(f"{what} is not a decimal offset: {raw[:24]!r}")
    value = int(raw)
    if value > MAX_OFFSET:
        raise ProtocolError(f"{what} out of range")
    return value


def _span(start: int, end: int, what: str) -> None:
    if end <= start:
        raise ProtocolError(f"{what} end {end} is not after start {start}")


def _two_fields(body: bytes, usage: str) -> tuple[bytes, bytes]:
    parts = body.split(b" ")
    if len(parts) != 2:
        raise ProtocolError(usage)
    return parts[0], parts[1]


def _decode_data(body: bytes) -> Data:
    # The payload may hold spaces: only the two numbers are split off, each
    # searched for within its longest valid length.
    sp1 = body.find(b" ", 0, 21)
    sp2 = body.find(b" ", sp1 + 1, sp1 + 22) if sp1 >= 0 else -1
    if sp2 < 0:
        raise ProtocolError("DATA header is incomplete")
    start = _number(body[:sp1], "DATA start")
    end = _number(body[sp1 + 1 : sp2], "DATA end")
    payload = body[sp2 + 1 :]
    _span(start, end, "DATA")
    if not payload or payload[-1:] != b"\n":
        raise ProtocolError("DATA payload must be whole lines ending in LF")
    return Data(start, end, payload)


def _decode_gap(body: bytes) -> Gap:
    first, second = _two_fields(body, "GAP must be 'G <start> <end>'")
    start, end = _number(first, "GAP start"), _number(second, "GAP end")
    _span(start, end, "GAP")
    return Gap(start, end)


def _decode_hello(body: bytes) -> Hello:
    parts = body.split(b" ")
    version = _number(parts[0], "HELLO version") if len(parts) in (2, 3) else None
    if version == VERSION_MOVES and len(parts) == 3:
        acked: int | None = _number(parts[2], "HELLO acknowledged offset")
    elif version == VERSION and len(parts) == 2:
        acked = None
    elif version == VERSION_MOVES:
        raise ProtocolError("HELLO version 2 must be 'H 2 <stream> <acknowledged offset>'")
    elif version in (VERSION, None):
        raise ProtocolError("HELLO must be 'H <version> <stream>'")
    else:
        raise ProtocolError(f"unsupported protocol version {version}")
    try:
        stream = parts[1].decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("stream name is not ASCII") from None
    return Hello(validate_stream_name(stream), version, acked)


_DECODERS: dict[bytes, Callable[[bytes], Message]] = {
    b"D ": _decode_data,
    b"G ": _decode_gap,
    b"A ": lambda body: Ack(_number(body, "ACK offset")),
    b"R ": lambda body: Resume(_number(body, "RESUME offset")),
    b"H ": _decode_hello,
    b"E ": lambda body: Error(body.decode("utf-8", "replace")),
    b"S ": lambda body: Status(_number(body, "STATUS end")),
}


def decode(frame: bytes) -> Message:
    """Decode one frame body; raise :class:`ProtocolError` for anything malformed.

    The first two bytes (the letter and a space) choose the message; a bare
    ``E`` is an ERROR without a reason.
    """
    decoder = _DECODERS.get(b"E " if frame == b"E" else frame[:2])
    if decoder is None:
        raise ProtocolError(f"unknown message type {frame[:1]!r}")
    return decoder(frame[2:])
