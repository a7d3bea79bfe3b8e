"""The JetStream publisher process: ``python -m decnet.listener.publisher INGEST_DIR ...``.

asyncio and nats-py live only in this process, never in the listener's (see
:mod:`decnet.listener.publisherproc` for the reactor side).  It publishes the
durable mirror of every (worker, stream) under the ingest directory, and the
JSON feed built from it, into one JetStream stream; what it publishes is
decided by :mod:`decnet.listener.publishing` (pure), this module only moves
bytes.

Pipes, one JSON object per line (the feed process's encoding):

* listener → publisher: ``{"worker": W, "stream": S}``: ``W/S`` has new durable
  commits (the index is the truth; the message only says "look now");
* publisher → listener: ``{"ready": {...}}`` once the broker and the stream
  are usable; ``{"worker", "stream", "confirmed": N}`` each time JetStream has
  stored everything of ``W/S`` up to the commit end ``N``;
  ``{"broker": "down", "error": ...}`` / ``{"broker": "up"}`` on a change;
  ``{"warn": ..., "worker", "stream"}`` for one stream's trouble;
  ``{"fatal": ...}`` just before it exits non-zero.

The publisher keeps no position of its own: for each subject it reads the
last message and goes on after its ``Decnet-End`` (a logical offset, for raw
messages and events alike), on start and after any error.  Every message names the subject's
last sequence (``Nats-Expected-Last-Subject-Sequence``), so a second
publisher racing on the same stream is refused and re-reads.

Exit status: 0 when its input closed (stop), 2 for a configuration the broker
refuses (wrong credentials, a stream with another configuration, a message
limit above the broker's), 3 when no broker could be reached at start.
It also keeps ``<ingest-dir>/.publisher-state.json`` (atomically replaced):
whether the broker is reachable, since when, and the last error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from decnet.listener import publishing as pub
from decnet.listener import storage
from decnet.listener.feedworker import encode_message

EXIT_CONFIG = 2
EXIT_UNREACHABLE = 3
STATE_FILE = ".publisher-state.json"
# Mirror bytes read per publishing round of one stream, and raw rounds
# under way at once over all streams: together they bound the memory
# of a publisher that catches up thousands of streams after an outage.
READ_LIMIT = 2 * 1024 * 1024
MAX_ROUNDS = 64
# Feed bytes read per events round of one stream, and events in flight at once
# per stream (one window: see publishing.settle_window).
EVENTS_READ_LIMIT = 1024 * 1024
EVENT_WINDOW = 256
# Event windows in flight at once over all streams.  Events cost the publisher and the
# servers CPU per message (one per line), raw messages per 500 KiB; on shared cores,
# events in flight for every stream at once starved the raw messages that forwarders
# wait for (bench/scaleout.py: one window at a time, raw 0.30x -> 0.46x of a listener
# alone and publish lag p99 343 -> 190 ms, events as fast as before, ~16,000/s; two
# windows: p99 432 ms).
EVENT_ROUNDS = 1
# After a worker moved here, how long the events below its new segment are left to
# the listener that received them (it publishes them while it lives) before this
# one goes on without them (they stay in the raw subject; a warning names them).
MOVE_EVENTS_WAIT = 30.0
# How long one publish may wait for its PubAck before the broker counts as down.
PUBLISH_TIMEOUT = 5.0
# Retry delays after an error: first, doubling to the maximum.
RETRY_FIRST = 0.2
RETRY_MAX = 5.0
# How long a JetStream that does not answer is waited for at start.
STARTUP_PATIENCE = 20.0
# Seconds allowed for connecting beyond the attempts themselves.
CONNECT_GRACE = 5.0
# How long a publisher whose listener went away may take to finish what is in flight.
CLOSE_GRACE = 5.0
# Streams are looked at this often even without a notification (the feed
# has no notification of its own).
POLL_INTERVAL = 0.25


class Fatal(Exception):
    """Stop with ``code`` and this one-line reason."""

    def __init__(self, reason: str, code: int = EXIT_CONFIG):
        super().__init__(reason)
        self.code = code


class BrokerDown(Exception):
    """The broker did not answer (timeout, no connection, no responders)."""


def _now_text() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Reporter:
    """Reports to the listener (stdout) and keeps the state file."""

    def __init__(self, directory: Path, out: int = 1):
        self.directory = directory
        self.out = out
        self.broker = "starting"
        self.error: str | None = None
        self.since = _now_text()

    def send(self, message: dict) -> None:
        try:
            os.write(self.out, encode_message(message))
        except BrokenPipeError:
            raise SystemExit(0) from None  # the listener is gone

    def broker_state(self, state: str, error: str | None = None) -> None:
        if state == self.broker:
            return
        self.broker, self.error, self.since = state, error, _now_text()
        self.send({"broker": state, **({"error": error} if error else {})})
        self.write_state()

    def write_state(self) -> None:
        """``<ingest-dir>/.publisher-state.json``, replaced atomically."""
        state = {"broker": self.broker, "since": self.since, "error": self.error}
        path = self.directory / STATE_FILE
        tmp = path.with_name(path.name + ".tmp")
        if not self.directory.is_dir():
            return  # (a check before the listener made its ingest directory)
        try:
            tmp.write_text(json.dumps(state) + "\n")
            os.replace(tmp, path)
        except OSError as exc:
            self.send({"warn": f"cannot write {path}: {exc}"})


def tls_context(ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """The client TLS context for the broker (``None`` when no option asks for TLS)."""
    if not (ca or cert):
        return None
    context = ssl.create_default_context(cafile=ca)
    if cert:
        context.load_cert_chain(cert, key)
    return context


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """A NATS child's connection arguments (what ``publisherproc.NatsOptions`` passes)."""
    parser.add_argument("--servers", required=True, type=lambda v: [s for s in v.split(",") if s])
    parser.add_argument("--creds")
    parser.add_argument("--tls-ca")
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument("--stream", default=pub.DEFAULT_STREAM)


def connect_options(args: argparse.Namespace, name: str, client: Any) -> dict[str, Any]:
    """nats-py's connect options for a DECNET child process (the publisher, the sink).

    Each server is tried once per attempt, so the caller sees an unreachable broker
    and reports it; once connected it sets ``max_reconnect_attempts`` to -1.
    ``client`` has the three callbacks; TLS and credentials come from ``args``
    (what :class:`decnet.listener.publisherproc.NatsOptions` passes on the command line).
    """
    options: dict[str, Any] = {
        "servers": args.servers,
        "allow_reconnect": True,
        "max_reconnect_attempts": 1,
        "reconnect_time_wait": 0.5,
        "connect_timeout": 3,
        "error_cb": client._error_cb,
        "disconnected_cb": client._disconnected,
        "reconnected_cb": client._reconnected,
        "name": name,
    }
    context = tls_context(args.tls_ca, args.tls_cert, args.tls_key)
    if context is not None:
        options["tls"] = context
    if args.creds:
        options["user_credentials"] = args.creds
    return options


def find_event_start(path: Path, feed_len: int, after: int) -> int:
    """Byte position in a feed of the first line whose ``mirror_offset`` exceeds ``after``.

    The feed's lines are in ``mirror_offset`` order: a binary search over line
    starts (a few small reads of a large feed).  Blocking.
    """
    if after < 0:
        return 0
    with open(path, "rb") as feed:

        def line_from(pos: int) -> tuple[int, int] | None:
            """(start, offset) of the first line starting at or after ``pos``."""
            if pos:
                feed.seek(pos - 1)
                head = feed.read(1 << 16)
                lf = head.find(b"\n")
                while lf < 0 and len(head) and pos - 1 + len(head) < feed_len:
                    more = feed.read(1 << 16)
                    if not more:
                        break
                    head += more
                    lf = head.find(b"\n")
                if lf < 0:
                    return None
                pos = pos + lf
            if pos >= feed_len:
                return None
            feed.seek(pos)
            line = feed.readline(min(feed_len - pos, 1 << 24))
            return pos, pub.feed_line_span(line.rstrip(b"\n"))[0]

        lo, hi = 0, feed_len
        while lo < hi:
            mid = (lo + hi) // 2
            found = line_from(mid)
            if found is None or found[1] > after:
                hi = mid
            else:
                lo = found[0] + 1
        found = line_from(lo)
        return feed_len if found is None else found[0]


class StreamJob:
    """Publishing of one (worker, stream): raw batches, then events."""

    def __init__(self, owner: Publisher, worker: str, stream: str):
        self.owner = owner
        self.worker = worker
        self.stream = stream
        self.files = storage.StreamFiles(owner.directory / worker, stream)
        self.raw_subject = pub.raw_subject(worker, stream)
        self.events_subject = pub.events_subject(worker, stream)
        self.raw_seq = pub.SubjectSequence()
        self.ev_seq = pub.SubjectSequence()
        self.cursor: pub.Cursor | None = None
        self.ev_cursor: pub.Cursor | None = None
        self.event_pos = 0  # (the feed position of ev_cursor's line)
        self.ev_repair: list[tuple[bytes, dict[str, str]]] = []
        self.move_seen: dict[int, float] = {}  # a move's offset → when it was first waited for
        self.wake = asyncio.Event()
        self.wake.set()
        self.confirmed = -1
        self.warned: str | None = None

    async def run(self) -> None:
        """Raw batches and events in two loops: a backlog of events never delays a batch."""
        loops = [self._loop(self.publish_raw, self.wake, self._forget_raw, self.owner.rounds)]
        if self.owner.events:
            events = self._loop(
                self.publish_events, asyncio.Event(), self._forget_events, self.owner.event_rounds
            )
            loops.append(events)
        await asyncio.gather(*loops)

    async def _loop(
        self,
        step: Callable[[], Awaitable[bool]],
        wake: asyncio.Event,
        forget: Callable[[], None],
        rounds: asyncio.Semaphore,
    ) -> None:
        delay = RETRY_FIRST
        while not self.owner.closing:
            try:
                async with rounds:
                    busy = await step()
            except pub.PublishError as exc:
                forget()
                self._warn(str(exc))
                await asyncio.sleep(RETRY_MAX)
                continue
            except BrokerDown as exc:
                forget()
                self.owner.reporter.broker_state("down", str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            except Exception as exc:
                # Nothing a round expects (a disk read failing, a bug): said, and tried
                # again; never the end of this stream's publishing (in broker mode its
                # forwarder would wait for an acknowledgement for ever).
                forget()
                self._warn(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(RETRY_MAX)
                continue
            delay = RETRY_FIRST
            if busy:
                self.warned = None
            if not busy:
                wake.clear()
                try:
                    await asyncio.wait_for(wake.wait(), POLL_INTERVAL)
                except TimeoutError:
                    pass

    def _forget_raw(self) -> None:
        """After any error: the position is read from the broker again."""
        self.raw_seq.fenced()
        self.cursor = None

    def _forget_events(self) -> None:
        self.ev_seq.fenced()
        self.ev_cursor = None

    def _warn(self, text: str) -> None:
        if text != self.warned:
            self.warned = text
            self.owner.reporter.send({"warn": text, "worker": self.worker, "stream": self.stream})

    # -- raw -------------------------------------------------------------------

    def _locate(self, end: int) -> tuple[pub.Cursor, storage.IndexRecord | None]:
        """Where the broker's ``end`` falls in this mirror, and the index record before
        that cursor: a binary search of the index file, a few records read.  Blocking."""
        try:
            with storage.IndexFile(self.files.index_path) as index:
                cursor = pub.locate(end, index.__getitem__, len(index))
                return cursor, index[cursor.record - 1] if cursor.record else None
        except storage.IngestCorrupt as exc:
            raise pub.PublishError(str(exc)) from None

    async def _sync_raw(self) -> pub.Cursor:
        seq, headers = await self.owner.last_message(self.raw_subject)
        end = pub.header_end(headers) if seq else 0
        cursor, before = await asyncio.to_thread(self._locate, end)
        self.raw_seq.learned(seq)
        self.cursor = cursor
        if before is not None and before.stream_end == cursor.offset:
            self._confirm(cursor.offset)
        elif not cursor.record:
            self._confirm(0)
        return cursor

    def _confirm(self, end: int) -> None:
        if end > self.confirmed or (end == 0 and self.confirmed < 0):
            self.confirmed = end
            self.owner.reporter.send(
                {"worker": self.worker, "stream": self.stream, "confirmed": end}
            )

    def _read_round(self, cursor: pub.Cursor) -> tuple[list[storage.IndexRecord], bytes]:
        if not self.files.index_path.exists():
            return [], b""
        records = storage.read_records(
            self.files.index_path, cursor.record, cursor.mirror + READ_LIMIT
        )
        if not records:
            return [], b""
        end = records[-1].mirror_end
        with open(self.files.mirror_path, "rb") as mirror:
            mirror.seek(cursor.mirror)
            data = mirror.read(end - cursor.mirror)
        return records, data

    async def publish_raw(self) -> bool:
        cursor = self.cursor if self.cursor is not None else await self._sync_raw()
        records, data = await asyncio.to_thread(self._read_round, cursor)
        pieces = pub.plan_raw(cursor, records, data, self.owner.payload_limit)
        if not pieces:
            awaited = pub.waiting_for_move(cursor, records)
            if awaited is not None:
                self.cursor = None  # (the next round reads the broker's mark again)
                self._warn(
                    f"waiting for the broker to reach offset {awaited} of "
                    f"{self.worker}/{self.stream} (the worker moved here: the bytes below it "
                    f"are another listener's to publish)"
                )
                return False
        for piece in pieces:
            headers = pub.raw_headers(self.worker, self.stream, piece, self.raw_seq.expected())
            payload = data[piece.mirror_start - cursor.mirror : piece.mirror_end - cursor.mirror]
            seq = await self.owner.publish(self.raw_subject, payload, headers)
            if seq is None:
                self.raw_seq.fenced()
                self.cursor = None
                self.owner.fenced(self.raw_subject)
                return True
            self.raw_seq.published(seq)
            self.cursor = piece.after
            if piece.exact:
                self._confirm(piece.end)
        return bool(pieces)

    # -- events ----------------------------------------------------------------

    def _feed_len(self) -> int:
        try:
            with open(self.files.feed_pos_path, "rb") as f:
                raw = f.read(128)
        except FileNotFoundError:
            return 0
        size = storage.FEED_SLOT.size
        return storage.best_feed_position([raw[0:size], raw[64 : 64 + size]]).feed_len

    async def _sync_events(self) -> pub.Cursor:
        seq, headers = await self.owner.last_message(self.events_subject)
        end = pub.header_end(headers) if seq else 0
        cursor, _ = await asyncio.to_thread(self._locate, end)
        feed_len = await asyncio.to_thread(self._feed_len)
        pos = 0
        if cursor.mirror and feed_len:
            path = self.files.feed_path
            pos = await asyncio.to_thread(find_event_start, path, feed_len, cursor.mirror - 1)
        self.ev_seq.learned(seq)
        self.ev_cursor, self.event_pos = cursor, pos
        return cursor

    def _read_events(self, cursor: pub.Cursor, pos: int):
        """The feed's next lines (at most a window) and the index records they need."""
        feed_len = self._feed_len()
        if feed_len <= pos:
            return [], []
        with open(self.files.feed_path, "rb") as feed:
            feed.seek(pos)
            chunk = feed.read(min(feed_len - pos, EVENTS_READ_LIMIT))
            if b"\n" not in chunk:
                # An entry longer than one read: read it whole (lines are capped by
                # --max-frame, an entry by 6 bytes per byte of its line).
                chunk += feed.readline(feed_len - pos - len(chunk))
        lines = []
        for line in pub.split_lines(chunk)[0][:EVENT_WINDOW]:
            lines.append((*pub.feed_line_span(line), line))
        if not lines:
            return [], []
        until = lines[-1][0] + lines[-1][1] + 1
        return lines, storage.read_records(self.files.index_path, cursor.record, until)

    async def publish_events(self) -> bool:
        """One window of up to EVENT_WINDOW events, all in flight at once."""
        await self._repair_events()
        cursor = self.ev_cursor if self.ev_cursor is not None else await self._sync_events()
        lines, records = await asyncio.to_thread(self._read_events, cursor, self.event_pos)
        items = pub.plan_events(cursor, records, lines, EVENT_WINDOW)
        if not items:
            return self._past_move(cursor, records) if lines else False
        self.move_seen.clear()
        limit = self.owner.payload_limit
        large = next((i for i, item in enumerate(items) if len(item.line) > limit), None)
        if large == 0:
            return self._skip_event(items[0])
        items = items[:large]  # (the large one starts the next window)
        expected: int | None = self.ev_seq.expected()  # (the first event only)
        window = []
        for item in items:
            window.append((item.line, pub.event_headers(self.worker, self.stream, item, expected)))
            expected = None
        outcomes = await self.owner.publish_window(self.events_subject, window)
        settled = pub.settle_window(outcomes)
        self._learn_events([o for o in outcomes if isinstance(o, int)])
        # A hole left by a leader change: published again with the Msg-Id alone (no fence:
        # it may come after a later event), before anything else, even after an error.
        self.ev_repair = [
            (items[i].line, pub.event_headers(self.worker, self.stream, items[i]))
            for i in settled.repair
        ]
        if settled.done:
            self.ev_cursor = items[settled.done - 1].after
            self.event_pos += sum(len(item.line) + 1 for item in items[: settled.done])
        await self._repair_events()
        if settled.fenced:
            self._forget_events()
            self.owner.fenced(self.events_subject)
            return True
        if settled.failure is not None:
            if settled.failure.down:
                raise BrokerDown(settled.failure.text)
            raise pub.PublishError(settled.failure.text)
        return True

    def _skip_event(self, item: pub.EventItem) -> bool:
        """An event larger than --nats-max-msg allows (JetStream would refuse it for ever):
        left out, loudly (its line is in the raw subject); the events after it go on."""
        self.owner.reporter.send(
            {
                "warn": f"the event of {self.worker}/{self.stream} at offset {item.start} is "
                f"{len(item.line)} bytes, more than --nats-max-msg allows "
                f"({self.owner.payload_limit} with room for headers); it is not published "
                f"(its line is in the raw subject)",
                "worker": self.worker,
                "stream": self.stream,
            }
        )
        self.ev_cursor = item.after
        self.event_pos += len(item.line) + 1
        return True

    def _past_move(self, cursor: pub.Cursor, records: list[storage.IndexRecord]) -> bool:
        """At a move (the worker arrived from another listener), the events below its
        offset are that listener's: wait for the broker's events to reach it, then go
        on from it all the same after MOVE_EVENTS_WAIT (that listener is gone)."""
        awaited = pub.waiting_for_move(cursor, records)
        if awaited is None:
            return False
        now = time.monotonic()
        since = self.move_seen.setdefault(awaited, now)
        if now - since < MOVE_EVENTS_WAIT:
            self.ev_cursor = None  # (the next round reads the broker's last event again)
            self._warn(
                f"waiting for the events of {self.worker}/{self.stream} to reach offset "
                f"{awaited} (the worker moved here: the events below it are another "
                f"listener's to publish)"
            )
            return False
        number, moved = next((cursor.record + i, r) for i, r in enumerate(records) if r.moved)
        self.owner.reporter.send(
            {
                "warn": f"the events of {self.worker}/{self.stream} from offset {cursor.offset} "
                f"to {awaited} did not reach the broker within {MOVE_EVENTS_WAIT:.0f} s of the "
                f"worker moving here; their bytes are in the raw subject; events go on "
                f"from {awaited}",
                "worker": self.worker,
                "stream": self.stream,
            }
        )
        self.ev_cursor = pub.Cursor(number + 1, moved.mirror_end, moved.stream_end)
        del self.move_seen[awaited]
        return True

    async def _repair_events(self) -> None:
        while self.ev_repair:
            line, headers = self.ev_repair[0]
            seq = await self.owner.publish(self.events_subject, line, headers)
            del self.ev_repair[0]
            self._learn_events([seq] if seq else [])

    def _learn_events(self, stored: list[int]) -> None:
        """The subject's last sequence after our events were stored (a duplicate names an
        older one: the last stays the largest)."""
        if stored and self.ev_seq.known:
            self.ev_seq.learned(max([*stored, self.ev_seq.expected()]))


class Publisher:
    """One broker connection, the stream, and a :class:`StreamJob` per (worker, stream)."""

    def __init__(self, args: argparse.Namespace, reporter: Reporter):
        self.args = args
        self.directory: Path = args.ingest_dir
        self.reporter = reporter
        self.events = not args.no_events
        self.payload_limit = 0
        self.nc: Any = None
        self.js: Any = None
        self.jobs: dict[tuple[str, str], StreamJob] = {}
        self.tasks: set[asyncio.Task] = set()
        self.rounds = asyncio.Semaphore(MAX_ROUNDS)
        self.event_rounds = asyncio.Semaphore(EVENT_ROUNDS)
        self.last_error: str | None = None
        # The broker's refusal of our credentials, if it said so on any attempt (a later
        # attempt may only see the connection reset that follows it).
        self.refused: str | None = None
        self.closing = False
        # PubAcks of a window: one inbox subscription, a future per message
        # (nats-py's publish_async drops an error reply, so it is not used).
        self.reply_prefix: str | None = None
        self.reply_count = 0
        self.replies: dict[str, asyncio.Future] = {}

    async def _error_cb(self, exc: Exception) -> None:
        self.last_error = str(exc) or type(exc).__name__
        if _is_auth_refusal(self.last_error):
            self.refused = self.last_error

    async def _disconnected(self) -> None:
        if not self.closing:
            self.reporter.broker_state("down", self.last_error or "disconnected")

    async def _reconnected(self) -> None:
        self.reporter.broker_state("up")

    async def connect(self) -> None:
        import nats
        import nats.errors

        if self.args.creds:
            self._check_creds(self.args.creds)
        # Each server once at start: an unreachable broker is an error then.
        options = connect_options(self.args, "decnet-listener-publisher", self)
        # nats-py retries a broker whose certificate we do not trust without end: the
        # attempts it was given (each server twice, connect_timeout each) get a deadline.
        patience = CONNECT_GRACE + 2 * (options["connect_timeout"] + 0.5) * len(self.args.servers)
        try:
            self.nc = await asyncio.wait_for(nats.connect(**options), patience)
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            reason = self.last_error or str(exc) or type(exc).__name__
            where = ",".join(_without_userinfo(url) for url in self.args.servers)
            if self.refused is not None or _is_auth_refusal(reason):
                refusal = self.refused or reason
                raise Fatal(f"the broker at {where} refused our credentials: {refusal}") from None
            raise Fatal(f"cannot reach the broker at {where}: {reason}", EXIT_UNREACHABLE) from None
        # Connected once: from now on reconnect for ever (the listener holds
        # its acknowledgements meanwhile).
        self.nc.options["max_reconnect_attempts"] = -1
        self.js = self.nc.jetstream(timeout=PUBLISH_TIMEOUT)
        self.payload_limit = pub.payload_limit(self.args.max_msg, self.nc.max_payload)

    @staticmethod
    def _check_creds(path: str) -> None:
        """A file nats-py could not read stops here with one line, not a traceback."""
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read(1 << 16)
        except OSError as exc:
            raise Fatal(f"--nats-creds {path}: cannot read it: {exc.strerror}") from None
        problem = pub.creds_problem(text)
        if problem is not None:
            raise Fatal(f"--nats-creds {path} is not a NATS credentials file: {problem}")

    async def api(self, subject: str, body: dict | None = None) -> dict:
        import nats.errors

        try:
            msg = await self.nc.request(
                "$JS.API." + subject,
                json.dumps(body).encode() if body is not None else b"",
                timeout=PUBLISH_TIMEOUT,
            )
        except nats.errors.NoRespondersError:
            raise Fatal("the broker has no JetStream (start nats-server with -js)") from None
        except (nats.errors.TimeoutError, TimeoutError) as exc:
            raise BrokerDown(f"JetStream API {subject}: no answer ({exc})") from None
        return json.loads(msg.data)

    async def ensure_stream(self) -> None:
        name = self.args.stream
        wanted = pub.stream_config(name, self.args.replicas, self.args.max_msg)
        info = await self.api("STREAM.INFO." + name)
        if "error" in info:
            if info["error"].get("err_code") != 10059:  # stream not found
                raise Fatal(f"JetStream refused STREAM.INFO {name}: {info['error']}")
            created = await self.api("STREAM.CREATE." + name, wanted)
            if "error" in created:
                raise Fatal(f"cannot create JetStream stream {name}: {created['error']}")
            return
        differences = pub.config_differences(info.get("config", {}), wanted)
        if differences:
            raise Fatal(
                f"JetStream stream {name} exists with another configuration ("
                + "; ".join(differences)
                + "); it is left unchanged: fix it by hand or choose another --nats-stream"
            )

    async def last_message(self, subject: str) -> tuple[int, dict[str, str] | None]:
        """``(sequence, headers)`` of the subject's last message; ``(0, None)`` if none."""
        import nats.errors
        import nats.js.errors

        try:
            msg = await self.js.get_last_msg(self.args.stream, subject)
        except nats.js.errors.NotFoundError:
            return 0, None
        except (nats.errors.TimeoutError, TimeoutError, nats.js.errors.ServiceUnavailableError):
            raise BrokerDown(f"reading the last message of {subject}: no answer") from None
        except nats.errors.ConnectionClosedError:
            raise BrokerDown("the broker connection is closed") from None
        return int(msg.seq), msg.headers

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str]) -> int | None:
        """The stream sequence JetStream stored the message at; ``None`` if fenced out."""
        import nats.errors
        import nats.js.errors

        try:
            ack = await self.js.publish(subject, payload, headers=headers)
        except nats.js.errors.APIError as exc:
            if exc.err_code in pub.FENCED_CODES:
                return None
            if exc.code in (503, 408):
                raise BrokerDown(f"publishing on {subject}: {exc.description}") from None
            raise pub.PublishError(f"JetStream refused a message on {subject}: {exc}") from None
        except (
            nats.errors.TimeoutError,
            TimeoutError,
            nats.errors.ConnectionClosedError,
            nats.errors.OutboundBufferLimitError,
            nats.js.errors.NoStreamResponseError,
        ) as exc:
            raise BrokerDown(f"publishing on {subject}: {type(exc).__name__}") from None
        except nats.errors.MaxPayloadError as exc:
            raise pub.PublishError(f"a message on {subject} is too large: {exc}") from None
        self.reporter.broker_state("up")
        return int(ack.seq)

    async def publish_window(
        self, subject: str, items: list[tuple[bytes, dict[str, str]]]
    ) -> list[pub.Outcome]:
        """Publish ``items`` back to back, then wait (PUBLISH_TIMEOUT) for every PubAck.

        One outcome per item, in order (see :func:`publishing.settle_window`).
        """
        import nats.errors

        if self.reply_prefix is None:
            prefix = self.nc.new_inbox()
            await self.nc.subscribe(prefix + ".*", cb=self._on_reply)
            self.reply_prefix = prefix
        futures: list[asyncio.Future] = []
        failure: pub.Failure | None = None
        loop = asyncio.get_running_loop()
        for payload, headers in items:
            self.reply_count += 1
            inbox = f"{self.reply_prefix}.{self.reply_count}"
            future = self.replies[inbox] = loop.create_future()
            try:
                await self.nc.publish(subject, payload, reply=inbox, headers=headers)
            except (nats.errors.Error, OSError) as exc:
                del self.replies[inbox]
                failure = pub.Failure(True, f"publishing on {subject}: {type(exc).__name__}")
                break
            futures.append(future)
        try:
            if futures:
                await asyncio.wait(futures, timeout=PUBLISH_TIMEOUT)
        finally:
            for future in futures:
                future.cancel()  # (no-op when answered)
            for inbox in [i for i, f in self.replies.items() if f.done()]:
                del self.replies[inbox]
        outcomes = [_outcome(subject, future) for future in futures]
        if failure is not None:
            outcomes += [failure] * (len(items) - len(futures))
        if any(isinstance(o, int) for o in outcomes):
            self.reporter.broker_state("up")
        return outcomes

    async def _on_reply(self, msg: Any) -> None:
        future = self.replies.get(msg.subject)
        if future is not None and not future.done():
            future.set_result(msg)

    def fenced(self, subject: str) -> None:
        self.reporter.send({"fenced": subject})

    def job(self, worker: str, stream: str) -> StreamJob:
        key = (worker, stream)
        job = self.jobs.get(key)
        if job is None:
            job = self.jobs[key] = StreamJob(self, worker, stream)
            task = asyncio.ensure_future(job.run())
            self.tasks.add(task)
            task.add_done_callback(self._job_ended)
        return job

    def _job_ended(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.reporter.send({"warn": f"a stream job died: {task.exception()!r}"})

    def notify(self, worker: str, stream: str) -> None:
        self.job(worker, stream).wake.set()

    def scan(self) -> None:
        """A job for every stream on disk (published from where the broker stands)."""
        try:
            workers = [p for p in self.directory.iterdir() if p.is_dir()]
        except FileNotFoundError:
            return
        for worker_dir in sorted(workers):
            for stream in sorted(storage.list_streams(worker_dir)):
                self.job(worker_dir.name, stream)

    async def close(self) -> None:
        self.closing = True
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.nc is not None:
            try:
                await self.nc.close()
            except Exception as exc:  # closing is best effort at exit
                self.reporter.send({"warn": f"closing the broker connection: {exc}"})


def _outcome(subject: str, future: asyncio.Future) -> pub.Outcome:
    """One PubAck (or its absence) as a window outcome."""
    import nats.js.errors

    if future.cancelled():
        return pub.Failure(True, f"publishing on {subject}: no PubAck in {PUBLISH_TIMEOUT} s")
    msg = future.result()
    if msg.headers and msg.headers.get("Status") == "503":
        return pub.Failure(True, f"publishing on {subject}: no stream answers")
    try:
        answer = json.loads(msg.data)
        if "error" in answer:
            nats.js.errors.APIError.from_error(answer["error"])  # (raises the typed error)
        return int(answer["seq"])
    except nats.js.errors.APIError as exc:
        if exc.err_code in pub.FENCED_CODES:
            return None
        if exc.code in (503, 408):
            return pub.Failure(True, f"publishing on {subject}: {exc.description}")
        return pub.Failure(False, f"JetStream refused a message on {subject}: {exc}")
    except (ValueError, KeyError, TypeError):
        return pub.Failure(True, f"publishing on {subject}: an unreadable PubAck")


async def _read_input(publisher: Publisher, stdin: int) -> None:
    """Notifications from the listener until its end of the pipe closes."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(stdin, "rb", 0)
    )
    while True:
        line = await reader.readline()
        if not line:
            return
        try:
            message = json.loads(line)
            publisher.notify(str(message["worker"]), str(message["stream"]))
        except (ValueError, KeyError, TypeError):
            publisher.reporter.send({"warn": "ignored a malformed notification"})


async def _set_up(publisher: Publisher) -> None:
    """Connect and set up the stream; a JetStream that does not answer yet gets a while.

    (A cluster that just lost or started a node elects its meta leader first.)
    """
    await publisher.connect()
    deadline = time.monotonic() + STARTUP_PATIENCE
    while True:
        try:
            await publisher.ensure_stream()
            return
        except BrokerDown:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(RETRY_MAX / 5)


async def serve(args: argparse.Namespace, reporter: Reporter) -> int:
    publisher = Publisher(args, reporter)
    try:
        await _set_up(publisher)
    except pub.PublishError as exc:
        raise Fatal(str(exc)) from None
    except BrokerDown as exc:
        raise Fatal(f"the broker does not answer: {exc}", EXIT_UNREACHABLE) from None
    finally:
        if publisher.nc is not None and publisher.payload_limit == 0:
            await publisher.close()
    reporter.broker_state("up")
    ready = {
        "ready": {
            "servers": args.servers,
            "stream": args.stream,
            "max_payload": publisher.nc.max_payload,
            "payload_limit": publisher.payload_limit,
        }
    }
    reporter.send(ready)
    if args.check:
        await publisher.close()
        return 0
    publisher.scan()
    try:
        await _read_input(publisher, args.stdin)
    finally:
        # Its listener is gone: what is in flight gets CLOSE_GRACE, then the process
        # ends whatever still runs (it keeps no position of its own: nothing is lost).
        asyncio.get_running_loop().call_later(CLOSE_GRACE, _end_now)
        await publisher.close()
    return 0


def _end_now() -> None:
    sys.stderr.write(
        f"publisher: still busy {CLOSE_GRACE:g} s after its listener went away; ending\n"
    )
    sys.stderr.flush()
    os._exit(0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m decnet.listener.publisher",
        description="Publish the listener's durable mirrors and feeds into NATS JetStream "
        "(started by `twistd decnet-listener --publish`; see docs/Scale-Out.md).",
        epilog="example: python -m decnet.listener.publisher /var/lib/decnet/ingest "
        "--servers nats://10.0.0.5:4222,nats://10.0.0.6:4222 --stream DECNET --replicas 3",
    )
    parser.add_argument("ingest_dir", type=Path)
    add_connection_arguments(parser)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--max-msg", type=int, default=pub.DEFAULT_MAX_MSG)
    parser.add_argument("--no-events", action="store_true")
    parser.add_argument(
        "--check",
        action="store_true",
        help="connect, set up or check the stream, report, exit (0: usable)",
    )
    parser.add_argument("--stdin", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Its life is the listener's: it stops when its stdin closes, not on a
    # Ctrl-C meant for the listener's terminal.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    reporter = Reporter(args.ingest_dir)
    try:
        return asyncio.run(serve(args, reporter))
    except Fatal as exc:
        reporter.broker_state("refused" if exc.code == EXIT_CONFIG else "down", str(exc))
        reporter.send({"fatal": str(exc), "code": exc.code})
        sys.stderr.write(f"publisher: {exc}\n")
        return exc.code


def _is_auth_refusal(reason: str) -> bool:
    return "authorization" in reason.lower() or "authentication" in reason.lower()


def _without_userinfo(url: str) -> str:
    """``nats://user:password@host:port`` as ``nats://host:port``: a password is never logged."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url.rpartition("@")[2]
    return f"{scheme}://{rest.rpartition('@')[2]}"


if __name__ == "__main__":
    sys.exit(main())
