"""Feed lines and JetStream-shaped messages for the sink tests."""

from __future__ import annotations

from pathlib import Path

from decnet.listener import publishing, storage
from decnet.sink.rows import Message
from tests.events_support import ingest_with


def feed_lines(ingest: Path, worker: str, stream: str = "decnet") -> list[bytes]:
    """The feed lines of one stream, as published (no LF)."""
    data = storage.StreamFiles(ingest / worker, stream).feed_path.read_bytes()
    return data.split(b"\n")[:-1]


def message_of(
    line: bytes, worker: str, seq: int, stream: str = "decnet", js_stream: str = "DECNET"
) -> Message:
    """The message the publisher sends for one feed line."""
    try:  # (one listener, no gap: the logical offset is the mirror's)
        offset, length = publishing.feed_line_span(line)
    except publishing.PublishError:
        offset, length = 0, 0
    item = publishing.EventItem(offset, offset + length + 1, line, publishing.Cursor())
    return Message(
        subject=publishing.events_subject(worker, stream),
        headers=publishing.event_headers(worker, stream, item, seq - 1),
        data=line,
        js_stream=js_stream,
        js_seq=seq,
    )


def messages_for(ingest: Path, workers: dict[str, list[bytes]]) -> list[Message]:
    """Mirrors, feeds and the SQLite index for ``workers``; their events as messages."""
    ingest_with(ingest, workers)
    out: list[Message] = []
    for worker in workers:
        for line in feed_lines(ingest, worker):
            out.append(message_of(line, worker, len(out) + 1))
    return out
