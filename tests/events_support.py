"""Ingest directories with real mirrors, feeds and an event index, for the events tests."""

from __future__ import annotations

from pathlib import Path

from decnet.events.index import EventIndex, index_path
from decnet.events.indexer import Indexer
from decnet.listener import storage
from decnet.listener.feed import FeedBuilder, read_feed
from decnet.syslog.rfc5424 import format_message


def event_line(
    i: int,
    *,
    decky: str = "web-01",
    service: str = "ssh",
    kind: str = "login",
    src: str = "203.0.113.9",
    user: str | None = "root",
    when: str = "2026-05-01T12:00:00.000001Z",
    extra: tuple[tuple[str, str], ...] = (),
) -> bytes:
    """One RFC 5424 line as the agent writes it (no LF)."""
    params = [("n", str(i)), ("src_ip", src), ("src_port", str(40000 + i))]
    if user is not None:
        params.append(("user", user))
    return format_message(
        facility=16,
        severity=5,
        timestamp=when,
        hostname=decky,
        app_name=service,
        procid="-",
        msgid=kind,
        structured_data=[("decnet@32473", [*params, *extra])],
        msg=None,
    )


def commit(ingest: Path, worker: str, lines: list[bytes], stream: str = "decnet") -> int:
    """Append ``lines`` to a worker's mirror as one durable commit; the mirror's new end."""
    files = storage.StreamFiles(ingest / worker, stream)
    recovered = files.open()
    data = b"".join(line + b"\n" for line in lines)
    end = recovered.mirror_end + len(data)
    files.commit(data, [storage.IndexRecord(end, end, 1_777_000_000_000_000)])
    files.close()
    return end


def build_feeds(ingest: Path) -> None:
    """Bring every feed up to its mirror (the feed process's work, inline)."""
    builder = FeedBuilder(ingest, lambda message: None)
    for worker in sorted(p.name for p in ingest.iterdir() if p.is_dir()):
        for stream in storage.list_streams(ingest / worker):
            files = storage.StreamFiles(ingest / worker, stream)
            builder.target(worker, stream, files.mirror_path.stat().st_size)
    while builder.step():
        pass
    builder.close()


def index_all(ingest: Path) -> Indexer:
    """Index every durable feed (the index process's work, inline); the indexer, closed."""
    indexer = Indexer(ingest)
    indexer.scan()
    while indexer.step() >= 0:
        pass
    indexer.close()
    return indexer


def ingest_with(ingest: Path, workers: dict[str, list[bytes]]) -> None:
    """Mirrors, feeds and the index for ``{worker: lines}``."""
    for worker, lines in workers.items():
        commit(ingest, worker, lines)
    build_feeds(ingest)
    index_all(ingest)


def feed_entries(ingest: Path, worker: str, stream: str = "decnet") -> list[dict]:
    return read_feed(storage.StreamFiles(ingest / worker, stream).feed_path)


def reader(ingest: Path) -> EventIndex:
    return EventIndex(index_path(ingest), readonly=True)
