"""Frame builders for the forwarder, pure: tailer pieces in, octet-counted bytes out."""

from __future__ import annotations

from decnet.forwarder.tail import Piece
from decnet.syslog import ackproto
from decnet.syslog.framing import encode_lines


def ack_frames(pieces: list[Piece], max_payload: int) -> list[bytes]:
    """``DATA`` frames (already octet-counted) for ``pieces``; each ≤ ``max_payload`` of lines.

    The list alternates length prefix, header and payload so a transport can
    write it without joining the (large) payloads again.
    """
    out: list[bytes] = []
    for piece in pieces:
        data = piece.data
        if piece.rewritten or len(data) <= max_payload:
            header = ackproto.data_header(piece.start, piece.end)
            out += [b"%d " % (len(header) + len(data)), header, data]
            continue
        pos, n = 0, len(data)
        while pos < n:
            cut = n if n - pos <= max_payload else data.rfind(b"\n", pos, pos + max_payload) + 1
            if cut <= pos:
                raise ValueError("a line longer than the frame reached ack_frames")
            header = ackproto.data_header(piece.start + pos, piece.start + cut)
            out += [b"%d " % (len(header) + cut - pos), header, data[pos:cut]]
            pos = cut
    return out


def plain_frames(pieces: list[Piece]) -> tuple[bytes, int, int]:
    """One buffer of RFC 5425 frames (one line each, LF removed); (bytes, lines, empty lines)."""
    lines: list[bytes] = []
    for piece in pieces:
        lines += piece.data[:-1].split(b"\n")
    empty = lines.count(b"")
    if empty:
        # MSG-LEN is at least 1: an empty line cannot be framed.
        lines = [line for line in lines if line]
    return encode_lines(lines), len(lines), empty
