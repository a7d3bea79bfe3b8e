"""Reactor side of ingest: per-(worker, stream) sinks with group commit.

Connections hand accepted bytes to a :class:`StreamSink`; the sink keeps at
most one commit in flight (in the thread pool) and gathers everything that
arrives meanwhile into the next one, so the fsync rate adapts to the load
(one fsync per batch, never per line).  After a commit the sink tells its
listeners the new durable high-water mark; the acknowledged-mode connection
turns that into an ``ACK``.  Streams commit independently, so a slow or
failing stream never delays another worker.

The sink also deduplicates: data that ends at or below the accepted
high-water mark is dropped, which is what makes a re-sent batch harmless.

After each commit the feed builder (a separate process, see
:mod:`decnet.listener.feedproc`) is told the stream's new durable mirror end.

Two bounds keep a worker from costing the master without limit: a worker may
have at most ``max_streams_per_worker`` streams (those on disk count, so a
restart changes nothing; they all stay usable even above a lowered cap), and
at most ``max_open_streams`` streams keep their files open: the least
recently used are closed and reopened by their next commit.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from pathlib import Path
from typing import cast

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from decnet.errors import DecnetError
from decnet.fsutil import ensure_private_dir
from decnet.groupcommit import Batch, Committer
from decnet.listener import storage
from decnet.syslog.ackproto import ProtocolError
from decnet.threads import Runner, pool_runner

# A connection stops reading while its stream holds this much uncommitted data.
PENDING_LIMIT = 16 * 1024 * 1024
# Streams one worker may have (on disk and new together).
DEFAULT_MAX_STREAMS_PER_WORKER = 8
# Streams whose files stay open at once (2 descriptors each, in the listener and
# again in the feed process); the least recently used are closed beyond it.
DEFAULT_MAX_OPEN_STREAMS = 512


class TooManyStreams(DecnetError):
    """A worker asked for one stream more than ``--max-streams-per-worker`` allows."""


@attrs.frozen
class _Accepted:
    """What one call handed to a sink: bytes for the mirror, maybe a gap, the marks after it."""

    payload: bytes
    gap: tuple[int, int] | None  # an index record (mirror end, stream end) before the payload
    mirror_end: int
    stream_end: int
    moved: bool = False  # ``gap`` is a segment start after a move, not a gap


@attrs.frozen
class Committed:
    """One durable commit, as :attr:`Ingest.commit_observers` are told (the metrics, the
    per-worker state)."""

    worker: str
    stream: str
    lines: int
    bytes: int
    seconds: float  # from handing the batch to the thread pool to its durability
    end: int  # the stream's logical offset now durable (its high-water mark)
    at: float  # when it became durable (the ingest's clock)


class StreamSink:
    """Accepts bytes for one (worker, stream) and makes them durable in order."""

    log = Logger()

    def __init__(self, ingest: Ingest, worker: str, stream: str, files, recovered):
        self.ingest = ingest
        self.worker = worker
        self.stream = stream
        self.files = files
        self.committed_mirror = self.accepted_mirror = recovered.mirror_end
        self.committed_end = self.accepted_end = recovered.stream_end
        # Group commit: one commit in flight, everything accepted meanwhile in the next.
        self._commits: Committer[_Accepted] = Committer(
            self._commit, committed=self._committed, failed=self._commit_failed
        )
        self._drain_waiters: list[Callable[[], None]] = []
        self.commit_listeners: list[Callable[[int], None]] = []
        self.failure_listeners: list[Callable[[str], None]] = []
        self.failed: str | None = None
        self.commits = 0
        self._commit_started = 0.0
        self.gaps = 0
        self.moves = 0
        self.duplicates = 0

    # -- accepting data --------------------------------------------------

    def accept(self, start: int, end: int, payload: bytes) -> bool:
        """Take acknowledged-mode data spanning stream offsets ``[start, end)``.

        Returns ``False`` for a duplicate (already accepted; dropped).  A batch
        that overlaps the high-water mark only partly is a protocol error.
        A batch that starts above it is a gap the forwarder declared (its data
        is gone on the worker): recorded in the index and logged.
        """
        if end <= self.accepted_end:
            self.duplicates += 1
            return False
        if start < self.accepted_end:
            raise ProtocolError(
                f"DATA [{start}, {end}) overlaps the high-water mark {self.accepted_end}"
            )
        if start > self.accepted_end:
            self.gaps += 1
            self.log.warn(
                "Gap in {worker}/{stream}: bytes {start_gap}-{end_gap} never reached us "
                "(the worker no longer has them)",
                worker=self.worker,
                stream=self.stream,
                start_gap=self.accepted_end,
                end_gap=start,
            )
        gap = (self.accepted_mirror, start) if start > self.accepted_end else None
        self.accepted_mirror += len(payload)
        self.accepted_end = end
        self._add(payload, gap)
        return True

    def accept_gap(self, start: int, end: int) -> bool:
        """The forwarder declares stream offsets ``[start, end)`` gone on the worker.

        Recorded in the index (a record that moves ``stream_end`` but not
        ``mirror_end``) and acknowledged like data; the part at or below the
        high-water mark is already here and changes nothing.
        """
        if end <= self.accepted_end:
            self.duplicates += 1
            return False
        self.gaps += 1
        self.log.warn(
            "Gap in {worker}/{stream}: bytes {start_gap}-{end_gap} are gone on the worker "
            "(its forwarder declares them lost)",
            worker=self.worker,
            stream=self.stream,
            start_gap=max(start, self.accepted_end),
            end_gap=end,
        )
        self.accepted_end = end
        self._add(b"", (self.accepted_mirror, end))
        return True

    def start_segment(self, offset: int) -> bool:
        """The worker arrives from another listener with everything below ``offset``
        acknowledged there: this mirror's next segment starts at ``offset``.

        Recorded in the index as a "moved" record (not a gap: the bytes between are
        on the other listener) and made durable like data; nothing happens when this
        listener already has the stream up to ``offset``.
        """
        if offset <= self.accepted_end:
            return False
        self.moves += 1
        self.log.info(
            "Worker {worker} arrived on stream {stream} with offset {offset} acknowledged "
            "elsewhere; this listener had it up to {mark}: a new mirror segment starts at "
            "{offset} (bytes {mark}-{offset} are on another listener)",
            worker=self.worker,
            stream=self.stream,
            offset=offset,
            mark=self.accepted_end,
        )
        self.accepted_end = offset
        self._add(b"", (self.accepted_mirror, offset), moved=True)
        return True

    def append_plain(self, data: bytes) -> None:
        """Take plain RFC 5425 lines (already LF-terminated); offsets are mirror offsets."""
        self.accepted_mirror += len(data)
        self.accepted_end += len(data)
        self._add(data, None)

    def _add(self, payload: bytes, gap: tuple[int, int] | None, moved: bool = False) -> None:
        item = _Accepted(payload, gap, self.accepted_mirror, self.accepted_end, moved)
        self._commits.add(item, len(payload))

    @property
    def pending_bytes(self) -> int:
        """Accepted bytes not yet in a commit."""
        return self._commits.queue.pending_size

    @property
    def over_limit(self) -> bool:
        return self.pending_bytes >= PENDING_LIMIT

    def when_drained(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the uncommitted backlog is below the limit again."""
        self._drain_waiters.append(callback)

    def when_flushed(self) -> defer.Deferred:
        """Fires with the durable high-water mark once everything accepted so far is durable."""
        return self._commits.flush().addCallback(lambda _: self.committed_end)

    # -- committing ------------------------------------------------------

    def _commit(self, batch: Batch[_Accepted]) -> defer.Deferred:
        """One commit: the batch's bytes, its gap records and the new marks, durable together."""
        items = batch.items
        data = items[0].payload if len(items) == 1 else b"".join(i.payload for i in items)
        now_us = int(self.ingest.clock.seconds() * 1_000_000)
        marks = [(*i.gap, i.moved) for i in items if i.gap is not None]
        last = (items[-1].mirror_end, items[-1].stream_end)
        if [m[:2] for m in marks[-1:]] != [last]:
            marks.append((*last, False))
        records = [storage.IndexRecord(m, e, now_us, moved) for m, e, moved in marks]
        self._commit_started = now_us / 1_000_000
        self.ingest.touch(self)
        return self.ingest.run(self.files.commit, data, records)

    def _committed(self, batch: Batch[_Accepted]) -> None:
        last = batch.items[-1]
        self.commits += 1
        self.committed_mirror, self.committed_end = last.mirror_end, last.stream_end
        for listener in list(self.commit_listeners):
            listener(last.stream_end)
        if self.ingest.commit_observers:
            self._tell_observers(batch)
        if not self.over_limit:
            drained, self._drain_waiters = self._drain_waiters, []
            for callback in drained:
                callback()
        self.ingest.feed_kick(self)

    def _tell_observers(self, batch: Batch[_Accepted]) -> None:
        payloads = [i.payload for i in batch.items]
        now = self.ingest.clock.seconds()
        done = Committed(
            self.worker,
            self.stream,
            sum(p.count(b"\n") for p in payloads),
            sum(len(p) for p in payloads),
            now - self._commit_started,
            self.committed_end,
            now,
        )
        for observer in self.ingest.commit_observers:
            try:
                observer(done)
            except Exception:  # the metrics never stand between a commit and its ACK
                self.log.failure("A commit observer failed on {worker}", worker=self.worker)

    def _commit_failed(self, batch: Batch[_Accepted], failure: Failure) -> Exception:
        self.failed = f"commit failed: {failure.getErrorMessage()}"
        self.log.failure(
            "Could not make {worker}/{stream} durable; dropping its connections "
            "(they resume from the last durable mark)",
            failure,
            worker=self.worker,
            stream=self.stream,
        )
        for listener in list(self.failure_listeners):
            listener(self.failed)
        self.ingest.forget(self)
        return storage.IngestCorrupt(self.failed)


class Ingest:
    """All sinks of one ingest directory; opens (and recovers) streams on demand."""

    log = Logger()

    def __init__(
        self,
        directory: Path,
        clock: IReactorTime,
        run: Runner | None = None,
        *,
        feeds=None,
        publisher=None,
        max_streams_per_worker: int = DEFAULT_MAX_STREAMS_PER_WORKER,
        max_open_streams: int = DEFAULT_MAX_OPEN_STREAMS,
    ):
        self.directory = Path(directory)
        self.clock = clock
        # The real reactor is a clock and has a thread pool; tests pass both parts.
        self.run = run or pool_runner(cast(IReactorThreads, clock))
        # Who builds the JSON feeds (a FeedProcess, InlineFeeds in tests); None: no feed.
        self.feeds = feeds
        # Who publishes the mirrors into JetStream (a PublisherProcess); None: nobody.
        self.publisher = publisher
        self.max_streams_per_worker = max_streams_per_worker
        self.max_open_streams = max_open_streams
        self._sinks: dict[tuple[str, str], StreamSink] = {}
        self._opening: dict[tuple[str, str], list[defer.Deferred]] = {}
        # Each worker's streams (on disk when first asked, plus those created since).
        self._streams: dict[str, set[str]] = {}
        self._listing: dict[str, list[defer.Deferred]] = {}
        # Sinks whose files are open, least recently used first.
        self._open: collections.OrderedDict[tuple[str, str], StreamSink] = collections.OrderedDict()
        self.files_closed = 0
        # Told of each commit once it is durable (nothing is counted when empty).
        self.commit_observers: list[Callable[[Committed], None]] = []
        self._closing = False

    def prepare(self) -> None:
        """Create the ingest directory (0700).  Blocking; called once at start-up."""
        ensure_private_dir(self.directory)

    def start(self) -> None:
        """Start the feed builder (after privileges are dropped)."""
        if self.feeds is not None:
            self.feeds.start()
        if self.publisher is not None:
            self.publisher.start()

    def sink_for(self, worker: str, stream: str) -> defer.Deferred:
        """The sink of ``(worker, stream)``, recovering its files on first use.

        Fails with :class:`TooManyStreams` for a new stream beyond the worker's cap.
        """
        key = (worker, stream)
        if key in self._sinks:
            return defer.succeed(self._sinks[key])
        d: defer.Deferred = defer.Deferred()
        waiting = self._opening.setdefault(key, [])
        waiting.append(d)
        if len(waiting) == 1:
            files = storage.StreamFiles(self.directory / worker, stream)
            opened = self._streams_of(worker)
            opened.addCallback(self._claim_stream, worker, stream)
            opened.addCallback(lambda _: self.run(files.open))
            opened.addCallbacks(
                self._opened, self._open_failed, callbackArgs=(key, files), errbackArgs=(key,)
            )
        return d

    def _streams_of(self, worker: str) -> defer.Deferred:
        """Fires with the (live) set of ``worker``'s streams; read from disk once."""
        if worker in self._streams:
            return defer.succeed(self._streams[worker])
        d: defer.Deferred = defer.Deferred()
        waiting = self._listing.setdefault(worker, [])
        waiting.append(d)
        if len(waiting) == 1:
            listed = self.run(storage.list_streams, self.directory / worker)
            listed.addCallbacks(
                self._listed, self._list_failed, callbackArgs=(worker,), errbackArgs=(worker,)
            )
        return d

    def _listed(self, names: set[str], worker: str) -> None:
        streams = self._streams.setdefault(worker, set(names))
        for d in self._listing.pop(worker):
            d.callback(streams)

    def _list_failed(self, failure, worker: str) -> None:
        for d in self._listing.pop(worker):
            d.errback(failure)

    def _claim_stream(self, streams: set[str], worker: str, stream: str) -> None:
        # Checked and counted in one reactor turn: two new streams racing for
        # the last place cannot both get it.
        if stream in streams:
            return
        if len(streams) >= self.max_streams_per_worker:
            raise TooManyStreams(
                f"worker {worker!r} already has {len(streams)} streams; refusing a new one, "
                f"{stream!r} (--max-streams-per-worker)"
            )
        streams.add(stream)

    def touch(self, sink: StreamSink) -> None:
        """``sink`` is about to use its files: most recently used; close the least beyond the cap.

        A closed stream's files are reopened by its next commit (``StreamFiles``
        serialises its own calls, so a close still queued behind a commit is safe).
        """
        key = (sink.worker, sink.stream)
        self._open.pop(key, None)
        self._open[key] = sink
        while len(self._open) > self.max_open_streams:
            _, idle = self._open.popitem(last=False)
            self.files_closed += 1
            self._close_files(idle)

    def open_streams(self) -> int:
        """How many streams have (or are about to have) their files open."""
        return len(self._open)

    def _close_files(self, sink: StreamSink) -> None:
        d = self.run(sink.files.close)
        d.addErrback(
            lambda f: self.log.failure(
                "Closing {worker}/{stream}", f, worker=sink.worker, stream=sink.stream
            )
        )

    def _opened(self, recovered: storage.Recovered, key, files) -> None:
        worker, stream = key
        if recovered.cut_mirror_bytes or recovered.cut_index_bytes:
            self.log.info(
                "Recovered {worker}/{stream}: cut {mirror} unacknowledged mirror bytes and "
                "{index} bytes of torn index; high-water mark {offset}",
                worker=worker,
                stream=stream,
                mirror=recovered.cut_mirror_bytes,
                index=recovered.cut_index_bytes,
                offset=recovered.stream_end,
            )
        sink = StreamSink(self, worker, stream, files, recovered)
        self._sinks[key] = sink
        self.touch(sink)
        for d in self._opening.pop(key):
            d.callback(sink)
        self.feed_kick(sink)

    def _open_failed(self, failure, key) -> None:
        if failure.check(TooManyStreams):
            # An expected refusal: the connection says it, once.
            for d in self._opening.pop(key):
                d.errback(failure)
            return
        self.log.error(
            "Cannot open ingest files for {worker}/{stream}: {error}",
            worker=key[0],
            stream=key[1],
            error=failure.getErrorMessage(),
        )
        for d in self._opening.pop(key):
            d.errback(failure)

    def forget(self, sink: StreamSink) -> None:
        key = (sink.worker, sink.stream)
        if self._sinks.get(key) is sink:
            del self._sinks[key]
        if self._open.get(key) is sink:
            del self._open[key]
        self._close_files(sink)

    def sinks(self) -> list[StreamSink]:
        return list(self._sinks.values())

    # -- the JSON feed ---------------------------------------------------

    def feed_kick(self, sink: StreamSink) -> None:
        """Tell the feed builder how far ``sink``'s mirror is durable (and the publisher)."""
        if sink.failed or self._closing:
            return
        if self.feeds is not None:
            self.feeds.notify(sink.worker, sink.stream, sink.committed_mirror)
        if self.publisher is not None:
            self.publisher.notify(sink.worker, sink.stream)

    # -- shutdown --------------------------------------------------------

    @defer.inlineCallbacks
    def close(self):
        """Wait for in-flight commits, close every file, stop the feed builder."""
        flushes = [s.when_flushed() for s in self._sinks.values() if not s.failed]
        yield defer.DeferredList(flushes, consumeErrors=True)
        for sink in self._sinks.values():
            self.feed_kick(sink)
        self._closing = True
        for sink in list(self._sinks.values()):
            yield self.run(sink.files.close)
        self._sinks.clear()
        self._open.clear()
        if self.feeds is not None:
            yield self.feeds.close()
        if self.publisher is not None:
            yield self.publisher.close()
