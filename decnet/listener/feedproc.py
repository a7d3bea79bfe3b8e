"""Reactor side of the JSON feed: runs the feed process and keeps it told.

Ingest calls :meth:`FeedProcess.notify` after every commit with the stream's
durable mirror end; the feed process (:mod:`decnet.listener.feedworker`)
catches up in its own time and reports progress.  If it dies it is started
again (with backoff) and told every target again; its durable position makes
that harmless.  Nothing here blocks the reactor: the only I/O is a pipe.

:class:`InlineFeeds` does the same work synchronously in the caller; it blocks,
so it is only for tests on a fake clock and for tools.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from twisted.internet import defer, error
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger

from decnet.listener.feed import DEFAULT_MAX_OPEN_FEEDS, FeedBuilder
from decnet.listener.feedworker import decode_messages, encode_message

# Restart backoff of a feed process that died: 0.5 s doubling to 30 s, reset
# once it reports progress again.
RESTART_FIRST = 0.5
RESTART_MAX = 30.0
# How long a stopping listener waits for the feed process to finish its step.
STOP_GRACE = 10.0

_log = Logger(namespace="decnet.listener.feed")

# systemd's hand-over variables are the listener's alone (NotifyAccess=main,
# socket activation): the feed process must never look like the service.
_SYSTEMD_ENV = (
    "NOTIFY_SOCKET",
    "WATCHDOG_PID",
    "WATCHDOG_USEC",
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
)


def _child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in _SYSTEMD_ENV}


def log_report(message: dict, positions: dict) -> None:
    """Turn one feed builder report into log events and a position update."""
    key = (message.get("worker"), message.get("stream"))
    if "pos" in message:
        positions[key] = message["pos"]
    elif "warn" in message:
        _log.warn(
            "Rebuilding the JSON feed of {worker}/{stream} from the start: {why}",
            worker=key[0],
            stream=key[1],
            why=message["warn"],
        )
    elif "error" in message:
        _log.error(
            "JSON feed of {worker}/{stream} stopped (the mirror goes on): {error}",
            worker=key[0],
            stream=key[1],
            error=message["error"],
        )


class _FeedChild(ProcessProtocol):
    def __init__(self, owner: FeedProcess):
        self.owner = owner
        self._out = bytearray()
        self._err = bytearray()

    def connectionMade(self):
        self.owner._child_started(self)

    def outReceived(self, data: bytes):
        self._out += data
        try:
            messages = decode_messages(self._out)
        except ValueError:
            _log.error("Feed process sent garbage; restarting it")
            self.transport.signalProcess("KILL")
            return
        for message in messages:
            self.owner._report(message)

    def errReceived(self, data: bytes):
        self._err += data
        end = self._err.rfind(b"\n") + 1
        if end:
            text = self._err[:end].decode("utf-8", "replace").rstrip("\n")
            del self._err[:end]
            _log.error("Feed process: {text}", text=text)

    def processEnded(self, reason):
        if self._err:
            self.errReceived(b"\n")
        self.owner._child_ended(self, reason)


class FeedProcess:
    """Supervises ``python -m decnet.listener.feedworker <ingest-dir>``."""

    log = Logger()

    def __init__(
        self,
        reactor,
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
        self._child: _FeedChild | None = None
        self._restart_call = None
        self._delay = RESTART_FIRST
        self._closing = False
        self._ended: list[defer.Deferred] = []
        self.starts = 0

    def start(self) -> None:
        if self._child is not None or self._closing:
            return
        self._restart_call = None
        self.starts += 1
        child = _FeedChild(self)
        self._child = child
        argv = [self.executable, "-m", "decnet.listener.feedworker", str(self.directory)]
        if self.encoders is not None:
            argv += ["--encoders", str(self.encoders)]
        argv += ["--max-open", str(self.max_open)]
        self.reactor.spawnProcess(
            child,
            self.executable,
            argv,
            env=_child_env(),
            childFDs={0: "w", 1: "r", 2: "r"},
        )

    def notify(self, worker: str, stream: str, mirror_end: int) -> None:
        """The mirror of ``worker/stream`` is durable up to ``mirror_end``."""
        key = (worker, stream)
        if mirror_end <= self.targets.get(key, -1):
            return
        self.targets[key] = mirror_end
        if self._child is not None and self._child.transport is not None:
            self._send(key)

    def lag(self, worker: str, stream: str) -> int:
        """Mirror bytes of ``worker/stream`` not in the feed yet (as last reported)."""
        key = (worker, stream)
        return self.targets.get(key, 0) - self.positions.get(key, 0)

    def _send(self, key) -> None:
        worker, stream = key
        self._child.transport.write(
            encode_message({"worker": worker, "stream": stream, "end": self.targets[key]})
        )

    def _child_started(self, child: _FeedChild) -> None:
        for key in self.targets:
            self._send(key)

    def _report(self, message: dict) -> None:
        if "pos" in message:
            self._delay = RESTART_FIRST
        log_report(message, self.positions)

    def _child_ended(self, child: _FeedChild, reason) -> None:
        if child is not self._child:
            return
        self._child = None
        if self._closing:
            waiters, self._ended = self._ended, []
            for d in waiters:
                d.callback(None)
            return
        status = reason.value
        code = getattr(status, "exitCode", None)
        self.log.error(
            "Feed process exited unexpectedly ({status}); restarting it in {delay:g}s",
            status=f"exit code {code}" if code is not None else reason.getErrorMessage(),
            delay=self._delay,
        )
        self._restart_call = self.reactor.callLater(self._delay, self.start)
        self._delay = min(self._delay * 2, RESTART_MAX)

    def close(self) -> defer.Deferred:
        """Let the feed process finish its step and exit (killed after STOP_GRACE)."""
        self._closing = True
        if self._restart_call is not None and self._restart_call.active():
            self._restart_call.cancel()
        child = self._child
        if child is None or child.transport is None:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._ended.append(d)
        child.transport.closeStdin()
        killer = self.reactor.callLater(STOP_GRACE, self._kill, child)

        def cancel_killer(result):
            if killer.active():
                killer.cancel()
            return result

        return d.addBoth(cancel_killer)

    def _kill(self, child: _FeedChild) -> None:
        self.log.warn("Feed process did not stop within {grace:g}s; killing it", grace=STOP_GRACE)
        try:
            child.transport.signalProcess("KILL")
        except error.ProcessExitedAlready:
            pass


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
