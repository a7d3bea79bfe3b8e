"""Reactor side of the JSON feed: runs the feed process and keeps it told.

Ingest calls :meth:`FeedProcess.notify` after every commit with the stream's
durable mirror end; the feed process (:mod:`decnet.listener.feedworker`)
catches up in its own time and reports progress.  If it dies it is started
again (with backoff, :class:`decnet.process.Supervisor`) and told every target
again; its durable position makes that harmless.  Nothing here blocks the
reactor: the only I/O is a pipe.

:class:`InlineFeeds` does the same work synchronously in the caller; it blocks,
so it is only for tests on a fake clock and for tools.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from twisted.internet import defer
from twisted.internet.interfaces import IReactorProcess
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from decnet import process
from decnet.listener.feed import DEFAULT_MAX_OPEN_FEEDS, FeedBuilder
from decnet.listener.feedworker import decode_messages, encode_message

# Restart backoff of a feed process that died: 0.5 s doubling to 30 s, reset
# once it reports progress again.
RESTART = process.RestartPolicy(first=0.5, maximum=30.0)
# How long a stopping listener waits for the feed process to finish its step.
STOP_GRACE = 10.0

_log = Logger(namespace="decnet.listener.feed")


# What a feed builder report other than a position says, by its key:
# (level, text, the field that carries the report's detail).
_REPORTS = {
    "warn": (
        LogLevel.warn,
        "Rebuilding the JSON feed of {worker}/{stream} from the start: {why}",
        "why",
    ),
    "error": (
        LogLevel.error,
        "JSON feed of {worker}/{stream} stopped (the mirror goes on): {error}",
        "error",
    ),
}


def log_report(message: dict, positions: dict) -> None:
    """Turn one feed builder report into log events and a position update."""
    key = (message.get("worker"), message.get("stream"))
    if "pos" in message:
        positions[key] = message["pos"]
        return
    for kind, (level, text, field) in _REPORTS.items():
        if kind in message:
            _log.emit(level, text, worker=key[0], stream=key[1], **{field: message[kind]})
            return


class JsonLinesChild(process.ChildProtocol):
    """The pipes of a helper process that reports one JSON object per line on stdout.

    Each report goes to ``report``; its stderr is logged line by line; garbage
    on stdout kills it (its supervisor starts it again).  The feed process and
    the publisher process (:mod:`decnet.listener.publisherproc`) both use it.
    """

    def __init__(self, name: str, report: Callable[[dict], None], log: Logger = _log):
        super().__init__()
        self.name = name
        self.report = report
        self.log = log
        self._out = bytearray()
        self._err = bytearray()

    def outReceived(self, data: bytes) -> None:
        self._out += data
        try:
            messages = decode_messages(self._out)
        except ValueError:
            self.log.error("{name} sent garbage; restarting it", name=self.name)
            self.signal("KILL")
            return
        for message in messages:
            self.report(message)

    def errReceived(self, data: bytes) -> None:
        self._err += data
        end = self._err.rfind(b"\n") + 1
        if end:
            text = self._err[:end].decode("utf-8", "replace").rstrip("\n")
            del self._err[:end]
            self.log.error("{name}: {text}", name=self.name, text=text)

    def processEnded(self, reason: Failure) -> None:
        if self._err:
            self.errReceived(b"\n")
        super().processEnded(reason)


def helper_spec(name: str, argv: list[str]) -> process.ProcessSpec:
    """A helper process of the listener: our interpreter, three pipes, stopped by end of input."""
    return process.ProcessSpec(
        name,
        argv,
        env=process.child_env(same_python=True),
        child_fds={0: "w", 1: "r", 2: "r"},
        stop_by=process.CLOSE_STDIN,
        grace=STOP_GRACE,
    )


def supervise_helper(
    reactor: IReactorProcess,
    spec: process.ProcessSpec,
    report: Callable[[dict], None],
    observer: Callable[[process.SupervisorEvent], None],
    log: Logger = _log,
) -> process.Supervisor:
    """Start ``spec`` under a :class:`~decnet.process.Supervisor` (restarted with backoff)."""
    supervisor = process.Supervisor(
        reactor,
        spec,
        policy=RESTART,
        protocol=lambda: JsonLinesChild(spec.name, report, log),
        observer=observer,
    )
    supervisor.start()
    return supervisor


class FeedProcess:
    """Supervises ``python -m decnet.listener.feedworker <ingest-dir>``."""

    def __init__(
        self,
        reactor: IReactorProcess,
        directory: Path,
        *,
        encoders: int | None = None,
        max_open: int = DEFAULT_MAX_OPEN_FEEDS,
        executable: str = sys.executable,
    ):
        self.reactor = reactor
        self.directory = Path(directory)
        self.encoders = encoders
        self.max_open = max_open
        self.executable = executable
        self.targets: dict[tuple[str, str], int] = {}
        self.positions: dict[tuple[str, str], int] = {}
        self.supervisor: process.Supervisor | None = None
        self._closing = False

    def spec(self) -> process.ProcessSpec:
        """The feed process: our own interpreter, stopped by the end of its input."""
        argv = [self.executable, "-m", "decnet.listener.feedworker", str(self.directory)]
        if self.encoders is not None:
            argv += ["--encoders", str(self.encoders)]
        argv += ["--max-open", str(self.max_open)]
        return helper_spec("Feed process", argv)

    def start(self) -> None:
        if self.supervisor is not None or self._closing:
            return
        self.supervisor = supervise_helper(self.reactor, self.spec(), self._report, self._observe)

    def notify(self, worker: str, stream: str, mirror_end: int) -> None:
        """The mirror of ``worker/stream`` is durable up to ``mirror_end``."""
        key = (worker, stream)
        if mirror_end <= self.targets.get(key, -1):
            return
        self.targets[key] = mirror_end
        self._send(key)

    def lag(self, worker: str, stream: str) -> int:
        """Mirror bytes of ``worker/stream`` not in the feed yet (as last reported)."""
        key = (worker, stream)
        return self.targets.get(key, 0) - self.positions.get(key, 0)

    def _send(self, key: tuple[str, str]) -> None:
        supervisor = self.supervisor
        if supervisor is None or not supervisor.running or supervisor.child is None:
            return  # told every target when the next one starts
        transport = supervisor.child.transport
        if transport is not None:
            worker, stream = key
            transport.write(
                encode_message({"worker": worker, "stream": stream, "end": self.targets[key]})
            )

    def _observe(self, event: process.SupervisorEvent) -> None:
        if isinstance(event, process.Started):
            for key in self.targets:
                self._send(key)

    def _report(self, message: dict) -> None:
        if "pos" in message and self.supervisor is not None:
            self.supervisor.healthy()
        log_report(message, self.positions)

    def close(self) -> defer.Deferred[None]:
        """Let the feed process finish its step and exit (killed after STOP_GRACE)."""
        self._closing = True
        if self.supervisor is None:
            return defer.succeed(None)
        return self.supervisor.stop()


class InlineFeeds:
    """The feed builder run synchronously in the caller.  Blocks: tests and tools only."""

    def __init__(self, directory: Path, *, max_open: int = DEFAULT_MAX_OPEN_FEEDS):
        self.positions: dict[tuple[str, str], int] = {}
        self.builder = FeedBuilder(directory, self._report, max_open=max_open)

    def start(self) -> None:
        pass

    def _report(self, message: dict) -> None:
        log_report(message, self.positions)

    def notify(self, worker: str, stream: str, mirror_end: int) -> None:
        self.builder.target(worker, stream, mirror_end)
        while self.builder.step():
            pass

    def close(self) -> defer.Deferred:
        self.builder.close()
        return defer.succeed(None)
