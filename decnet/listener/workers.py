"""What the listener knows about each worker, persisted as ``<ingest>/workers.json``.

:class:`WorkerStates` is the bookkeeping, pure: the listener's protocol and
ingest tell it what happens (a worker connected, a commit made lines durable,
a STATUS arrived, a connection was refused) with the time, and it keeps, per
worker:

* when it last connected and disconnected, when data last became durable, and
  how many connections it has open now;
* per stream: the mode, the durable high-water mark, and the end the
  forwarder last reported (``S <end>``, acknowledged mode), so the log lag is
  ``reported end - high-water mark``; plain RFC 5425 has no STATUS, so its lag
  is unknown (``null``);
* lines and bytes made durable today (UTC), and the last error attributed to it.

Its size is bounded: workers are authenticated certificates of our CA, streams
are the ones the ingest admitted (``--max-streams-per-worker``), and an error
reason is cut to :data:`MAX_REASON` characters.

:class:`StateFile` writes the document atomically (:func:`decnet.fsutil.atomic_write`:
temporary file, fsync, rename, fsync of the directory) in the thread pool,
one write in flight, at most one per :data:`WRITE_INTERVAL` seconds however
busy the listener is (changes meanwhile are merged into the next write), and
every :data:`HEARTBEAT` seconds even when nothing changed, so a reader can tell
a live listener from a stopped one (``written_at``).  ``decnet-admin hosts``,
``check`` and ``top`` read it with :func:`read_state` and :func:`log_health`.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from decnet.fsutil import PRIVATE_FILE_MODE, atomic_write
from decnet.groupcommit import Batch, Committer
from decnet.threads import Runner

if TYPE_CHECKING:
    from decnet.listener.ingest import Committed

STATE_FILE = "workers.json"
FORMAT = 1
WRITE_INTERVAL = 1.0  # seconds between two writes of the state file, at least
HEARTBEAT = 30.0  # seconds between two writes when nothing changed
MAX_REASON = 300  # characters of an error reason kept
MAX_STATE_BYTES = 16 * 1024 * 1024  # a reader refuses a bigger file (it is not ours)

ACK = "ack"
PLAIN = "plain"


def utc_day(now: float) -> str:
    return datetime.datetime.fromtimestamp(now, datetime.UTC).date().isoformat()


@attrs.define
class StreamState:
    mode: str
    high_water: int = 0
    reported_end: int | None = None
    reported_at: float | None = None

    def snapshot(self) -> tuple:
        return (self.mode, self.high_water, self.reported_end, self.reported_at)


def _lag(mode: str, high_water: int, reported_end: int | None) -> int | None:
    """Bytes the worker has and the master does not yet have durably; None: unknown."""
    if mode != ACK or reported_end is None:
        return None
    return max(0, reported_end - high_water)


@attrs.define
class WorkerState:
    connections: int = 0
    last_connected: float | None = None
    last_disconnected: float | None = None
    last_data: float | None = None
    day: str | None = None
    lines_today: int = 0
    bytes_today: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    streams: dict[str, StreamState] = attrs.field(factory=dict)

    def snapshot(self) -> tuple:
        """The values, copied cheaply on the reactor; :func:`worker_doc` makes the JSON of it."""
        return (
            self.connections,
            self.last_connected,
            self.last_disconnected,
            self.last_data,
            self.day,
            self.lines_today,
            self.bytes_today,
            self.last_error,
            self.last_error_at,
            tuple((name, s.snapshot()) for name, s in self.streams.items()),
        )


_WORKER_FIELDS = (
    "connections",
    "last_connected",
    "last_disconnected",
    "last_data",
    "day",
    "lines_today",
    "bytes_today",
    "last_error",
    "last_error_at",
)
_STREAM_FIELDS = ("mode", "high_water", "reported_end", "reported_at")


def worker_doc(snapshot: tuple) -> dict[str, Any]:
    """One worker's entry of ``workers.json`` from :meth:`WorkerState.snapshot` (pure)."""
    doc = dict(zip(_WORKER_FIELDS, snapshot[:-1], strict=True))
    doc["connected"] = doc["connections"] > 0
    streams = {}
    for name, values in sorted(snapshot[-1]):
        streams[name] = dict(zip(_STREAM_FIELDS, values, strict=True))
        streams[name]["lag"] = _lag(*values[:3])
    doc["streams"] = streams
    lags = [s["lag"] for s in streams.values()]
    known = [lag for lag in lags if lag is not None]
    doc["lag"] = sum(known) if known and len(known) == len(lags) else None
    return doc


Snapshot = list[tuple[str, tuple]]


def document_of(snapshot: Snapshot, now: float) -> dict[str, Any]:
    """The whole ``workers.json`` document (pure; runs in the thread pool)."""
    return {
        "format": FORMAT,
        "written_at": now,
        "workers": {name: worker_doc(w) for name, w in sorted(snapshot)},
    }


class WorkerStates:
    """Per-worker state, updated by the listener; ``changed()`` is called after each change."""

    def __init__(self, changed: Any = None) -> None:
        self.workers: dict[str, WorkerState] = {}
        self.changed = changed or (lambda: None)
        self.status_ignored = 0
        # Snapshots of the workers unchanged since the last snapshot(), and the changed ones.
        self._snapshots: dict[str, tuple] = {}
        self._dirty: set[str] = set()

    def _worker(self, worker: str) -> WorkerState:
        """``worker``'s state, to be changed (every change goes through here)."""
        state = self.workers.get(worker)
        if state is None:
            state = self.workers[worker] = WorkerState()
        self._dirty.add(worker)
        return state

    def connected(self, worker: str, now: float) -> None:
        state = self._worker(worker)
        state.connections += 1
        state.last_connected = now
        self.changed()

    def disconnected(self, worker: str, now: float) -> None:
        state = self._worker(worker)
        state.connections = max(0, state.connections - 1)
        state.last_disconnected = now
        self.changed()

    def stream(self, worker: str, stream: str, mode: str, high_water: int) -> None:
        """A connection attached to ``stream`` (admitted by the ingest) at ``high_water``."""
        state = self._worker(worker).streams.get(stream)
        if state is None:
            self._worker(worker).streams[stream] = StreamState(mode, high_water)
        else:
            state.mode, state.high_water = mode, high_water
        self.changed()

    def on_commit(self, done: Committed) -> None:
        """An :attr:`Ingest.commit_observers <decnet.listener.ingest.Ingest>` entry."""
        self.committed(done.worker, done.stream, done.end, done.lines, done.bytes, done.at)

    def committed(
        self, worker: str, stream: str, high_water: int, lines: int, size: int, now: float
    ) -> None:
        """``lines`` lines (``size`` bytes) of ``stream`` are durable up to ``high_water``."""
        state = self._worker(worker)
        day = utc_day(now)
        if state.day != day:
            state.day, state.lines_today, state.bytes_today = day, 0, 0
        state.lines_today += lines
        state.bytes_today += size
        if size:
            state.last_data = now
        known = state.streams.get(stream)
        if known is not None:
            known.high_water = max(known.high_water, high_water)
        self.changed()

    def status(self, worker: str, stream: str, end: int, accepted: int, now: float) -> str | None:
        """A STATUS: the worker's ``stream`` ends at ``end``; ``accepted``: data received so far.

        Returns why it was ignored, or ``None``.  An end below what the worker
        already sent (``accepted``) cannot be true: it is ignored and recorded
        as the worker's last error, and the last credible report stays.
        """
        known = self._worker(worker).streams.get(stream)
        if known is None:
            return None
        if end < accepted:
            self.status_ignored += 1
            reason = f"STATUS end {end} of stream {stream!r} is below what it sent ({accepted})"
            self.error(worker, reason + "; ignored", now)
            return reason
        known.reported_end, known.reported_at = end, now
        self.changed()
        return None

    def error(self, worker: str, reason: str, now: float) -> None:
        state = self._worker(worker)
        state.last_error, state.last_error_at = reason[:MAX_REASON], now
        self.changed()

    def snapshot(self) -> Snapshot:
        """Every worker's values; only those changed since the last call are copied again."""
        for name in self._dirty:
            self._snapshots[name] = self.workers[name].snapshot()
        self._dirty.clear()
        return list(self._snapshots.items())

    def document(self, now: float) -> dict[str, Any]:
        return document_of(self.snapshot(), now)

    def load(self, doc: dict[str, Any]) -> None:
        """Carry over a previous run's times, counters and streams (not its connections).

        What this run already recorded (a worker that connected before the
        file was read) wins over the file.
        """
        for name, w in (doc.get("workers") or {}).items():
            if isinstance(w, dict):
                self._load_worker(self._worker(str(name)), w)

    @staticmethod
    def _load_worker(state: WorkerState, w: dict[str, Any]) -> None:
        for key in ("last_connected", "last_disconnected", "last_data"):
            old, mine = _number(w.get(key)), getattr(state, key)
            setattr(state, key, mine if old is None or (mine is not None and mine > old) else old)
        if state.day is None and isinstance(w.get("day"), str):
            state.day = w["day"]
            state.lines_today = int(_number(w.get("lines_today")) or 0)
            state.bytes_today = int(_number(w.get("bytes_today")) or 0)
        if state.last_error is None and isinstance(w.get("last_error"), str):
            state.last_error = w["last_error"][:MAX_REASON]
            state.last_error_at = _number(w.get("last_error_at"))
        for sname, s in (w.get("streams") or {}).items():
            stream = _stream_of(s)
            if stream is not None:
                state.streams.setdefault(str(sname), stream)


def _stream_of(s: object) -> StreamState | None:
    if not isinstance(s, dict) or s.get("mode") not in (ACK, PLAIN):
        return None
    return StreamState(
        s["mode"],
        int(_number(s.get("high_water")) or 0),
        _int_or_none(s.get("reported_end")),
        _number(s.get("reported_at")),
    )


def _number(value: object) -> float | None:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# -- the file ----------------------------------------------------------------------------


def read_state(path: Path) -> dict[str, Any] | None:
    """The state document at ``path``, or ``None`` if there is none (blocking).

    Raises ``ValueError`` for a file that is not a state document.
    """
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_STATE_BYTES + 1)
    except FileNotFoundError:
        return None
    if len(data) > MAX_STATE_BYTES:
        raise ValueError(f"{path} is larger than {MAX_STATE_BYTES} bytes")
    doc = json.loads(data)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{path} is not a worker state file of format {FORMAT}")
    if not isinstance(doc.get("workers"), dict) or _number(doc.get("written_at")) is None:
        raise ValueError(f"{path} is not a worker state file of format {FORMAT}")
    return doc


def _recover(path: Path) -> dict[str, Any] | None:
    """Remove what a killed writer left (its temporary files); the last whole state (blocking)."""
    for leftover in path.parent.glob(f".{path.name}.tmp-*"):
        leftover.unlink(missing_ok=True)
    return read_state(path)


def _encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, ensure_ascii=True).encode("ascii") + b"\n"


class StateWriter:
    """Writes snapshots to the state file (blocking, one call at a time: the writer's lane).

    Each worker's JSON is made again only when its snapshot changed, so a write
    costs what changed, not the size of the fleet.  The bytes are those of
    ``_encode(document_of(snapshot, now))``.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fragments: dict[str, tuple[tuple, bytes]] = {}

    def _fragment(self, name: str, snap: tuple) -> bytes:
        cached = self._fragments.get(name)
        if cached is None or cached[0] is not snap:
            body = {name: worker_doc(snap)}
            text = json.dumps(body, sort_keys=True, ensure_ascii=True)[1:-1]
            cached = self._fragments[name] = (snap, text.encode("ascii"))
        return cached[1]

    def encode(self, snapshot: Snapshot, now: float) -> bytes:
        parts = b", ".join(self._fragment(name, snap) for name, snap in sorted(snapshot))
        head = b'{"format": %d, "workers": {' % FORMAT
        return head + parts + b'}, "written_at": ' + json.dumps(now).encode() + b"}\n"

    def write(self, snapshot: Snapshot, now: float) -> None:
        atomic_write(self.path, self.encode(snapshot, now), PRIVATE_FILE_MODE)


class StateFile:
    """Keeps ``<ingest>/workers.json`` up to date with a :class:`WorkerStates` (see above)."""

    log = Logger()

    def __init__(self, path: Path, clock: IReactorTime, run: Runner) -> None:
        self.path = Path(path)
        self.clock = clock
        self.run = run
        self.states = WorkerStates(self.changed)
        self._writer = StateWriter(self.path)
        self.writes = 0
        self._timer: IDelayedCall | None = None
        self._heartbeat: IDelayedCall | None = None
        self._last_write = -WRITE_INTERVAL
        self._committer: Committer[None] = Committer(
            self._write, committed=self._written, failed=self._failed
        )
        self.running = False

    def start(self) -> defer.Deferred:
        """Load the previous run's state (in the pool), then write on every change."""
        d = self.run(_recover, self.path)
        d.addCallbacks(self._loaded, self._load_failed)
        return d

    def _loaded(self, doc: dict[str, Any] | None) -> None:
        if doc is not None:
            self.states.load(doc)
        self.running = True
        self.changed()

    def _load_failed(self, failure: Failure) -> None:
        self.log.warn(
            "Cannot read the previous worker state {path} ({error}); starting afresh",
            path=str(self.path),
            error=failure.getErrorMessage(),
        )
        self._loaded(None)

    def changed(self) -> None:
        """Something changed: write within :data:`WRITE_INTERVAL` seconds."""
        if not self.running or (self._timer is not None and self._timer.active()):
            return
        delay = max(0.0, self._last_write + WRITE_INTERVAL - self.clock.seconds())
        self._timer = self.clock.callLater(delay, self._due)

    def _due(self) -> None:
        self._timer = None
        self._committer.add(None)

    def _write(self, batch: Batch[None]) -> defer.Deferred:
        # Only a copy of the values is taken on the reactor; the JSON is made in the pool.
        now = self.clock.seconds()
        self._last_write = now
        return self.run(self._writer.write, self.states.snapshot(), now)

    def _written(self, batch: Batch[None]) -> None:
        self.writes += 1
        self._arm_heartbeat()

    def _failed(self, batch: Batch[None], failure: Failure) -> None:
        self.log.warn(
            "Cannot write the worker state {path}: {error} (retrying with the next change)",
            path=str(self.path),
            error=failure.getErrorMessage(),
        )
        self._arm_heartbeat()

    def _arm_heartbeat(self) -> None:
        if self._heartbeat is not None and self._heartbeat.active():
            self._heartbeat.cancel()
        if self.running:
            self._heartbeat = self.clock.callLater(HEARTBEAT, self.changed)

    def stop(self) -> defer.Deferred:
        """Write once more (everything up to now), then stop."""
        if not self.running:
            return defer.succeed(None)
        for call in (self._timer, self._heartbeat):
            if call is not None and call.active():
                call.cancel()
        self._timer = self._heartbeat = None
        self._committer.add(None)
        self.running = False
        return self._committer.flush()


def state_path(ingest_dir: str | os.PathLike) -> Path:
    return Path(ingest_dir) / STATE_FILE


# -- reading it (decnet-admin) -------------------------------------------------------------

#: A state file older than this was written by a listener that is not running any more.
LISTENER_SILENT = 2 * HEARTBEAT + 5.0

NO_STATE = "no listener state"
NEVER = "never"
CONNECTED = "connected"
SEEN = "seen"


@attrs.frozen
class LogHealth:
    """One worker's log pipeline as the listener's state file tells it."""

    state: str  # NO_STATE, NEVER, CONNECTED, SEEN
    last_seen: float | None = None
    lag: int | None = None  # bytes; None: unknown (plain mode, no STATUS yet, no state)
    stale: bool = False  # not seen for longer than --stale (or never)
    last_error: str | None = None
    listener_silent: bool = False  # the state file has not been rewritten for a while

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


def _seen_times(w: dict[str, Any]) -> list[float]:
    keys = ("last_connected", "last_disconnected", "last_data")
    return [t for t in (_number(w.get(k)) for k in keys) if t is not None]


def log_health(
    doc: dict[str, Any] | None, worker: str, now: float, stale_after: float
) -> LogHealth:
    """What the state document ``doc`` (:func:`read_state`) says about ``worker`` at ``now``.

    A worker connected when the file was last written counts as seen then; a
    file not rewritten for :data:`LISTENER_SILENT` seconds (its listener
    stopped) no longer vouches for any connection.
    """
    if doc is None:
        return LogHealth(NO_STATE)
    written = _number(doc.get("written_at")) or 0.0
    silent = now - written > LISTENER_SILENT
    w = doc["workers"].get(worker)
    if not isinstance(w, dict):
        return LogHealth(NEVER, stale=True, listener_silent=silent)
    times = _seen_times(w)
    connected = w.get("connected") is True
    if connected:
        times.append(written)
    last_seen = max(times) if times else None
    lag = w.get("lag")
    lag = lag if isinstance(lag, int) and not isinstance(lag, bool) and lag >= 0 else None
    error = w.get("last_error") if isinstance(w.get("last_error"), str) else None
    live = connected and not silent  # connected as of a recent write: seen now
    return LogHealth(
        CONNECTED if live else (SEEN if last_seen is not None else NEVER),
        last_seen,
        lag,
        not live and (last_seen is None or now - last_seen > stale_after),
        error,
        silent,
    )
