"""Reactor side of the JetStream publisher: runs the publisher process, keeps the broker's marks.

Ingest tells :meth:`PublisherProcess.notify` after every commit; the publisher
process (:mod:`decnet.listener.publisher`, asyncio and nats-py) publishes in
its own time and reports, per (worker, stream), the commit end up to which
JetStream has stored everything (``confirmed``).  In broker mode
(``--ack-after broker``) the listener acknowledges a forwarder only up to that
mark, and names it in RESUME (:class:`BrokerMarks`).

If the process dies it is started again with backoff
(:class:`decnet.process.Supervisor`, like the feed process); it reads its
position from the broker, so that is harmless.  While the broker is
unreachable nothing is confirmed: forwarders keep their data (their window
bounds what is in flight) and the outage is logged once, cleared once, and
written to ``<ingest-dir>/.publisher-state.json`` by the publisher.

:meth:`PublisherProcess.check` runs the same program with ``--check`` once at
start-up, before the reactor runs: an unreachable broker, refused credentials,
a stream with another configuration or a message limit above the broker's
stop the daemon with that one line instead of a listener that never acknowledges.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorProcess
from twisted.logger import Logger

from decnet import process
from decnet.errors import DecnetError
from decnet.listener import publishing
from decnet.listener.feedproc import helper_spec, supervise_helper
from decnet.listener.feedworker import decode_messages, encode_message

# The start-up check: connect, set up the stream, give up after this long.
CHECK_TIMEOUT = 30.0

_log = Logger(namespace="decnet.listener.publisher")


class PublisherRefused(DecnetError):
    """The start-up check failed: the one-line reason is the message."""


@attrs.frozen
class NatsOptions:
    """How to reach the broker and what to publish into (the ``--nats-*`` options)."""

    servers: tuple[str, ...]
    creds: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    stream: str = publishing.DEFAULT_STREAM
    replicas: int = 1
    max_msg: int = publishing.DEFAULT_MAX_MSG
    events: bool = True

    def argv(self) -> list[str]:
        argv = ["--servers", ",".join(self.servers), "--stream", self.stream]
        argv += ["--replicas", str(self.replicas), "--max-msg", str(self.max_msg)]
        for flag, value in (
            ("--creds", self.creds),
            ("--tls-ca", self.tls_ca),
            ("--tls-cert", self.tls_cert),
            ("--tls-key", self.tls_key),
        ):
            if value:
                argv += [flag, value]
        if not self.events:
            argv.append("--no-events")
        return argv


class BrokerMarks:
    """Per (worker, stream): the commit end JetStream has confirmed; who waits for it."""

    def __init__(self) -> None:
        self.marks: dict[tuple[str, str], int] = {}
        self._waiters: dict[tuple[str, str], list[tuple[int, defer.Deferred[int]]]] = {}
        self._listeners: dict[tuple[str, str], list[Callable[[int], None]]] = {}

    def mark(self, worker: str, stream: str) -> int | None:
        return self.marks.get((worker, stream))

    def confirmed(self, worker: str, stream: str, end: int) -> None:
        key = (worker, stream)
        if end <= self.marks.get(key, -1):
            return
        self.marks[key] = end
        # (Those listening before this mark: a waiter below may add one that must not hear it.)
        listeners = list(self._listeners.get(key, ()))
        waiting = self._waiters.get(key, [])
        ready = [(o, d) for o, d in waiting if end >= o]
        self._waiters[key] = [(o, d) for o, d in waiting if end < o]
        for _, d in ready:
            d.callback(end)
        for listener in listeners:
            listener(end)

    def when_reaches(self, worker: str, stream: str, offset: int) -> defer.Deferred[int]:
        """Fires with the broker's mark once it is at least ``offset``."""
        key = (worker, stream)
        have = self.marks.get(key, -1)
        if have >= offset:
            return defer.succeed(have)
        d: defer.Deferred[int] = defer.Deferred(lambda d: self._cancel(key, d))
        self._waiters.setdefault(key, []).append((offset, d))
        return d

    def _cancel(self, key: tuple[str, str], d: defer.Deferred[int]) -> None:
        self._waiters[key] = [(o, w) for o, w in self._waiters.get(key, []) if w is not d]

    def listen(self, worker: str, stream: str, listener: Callable[[int], None]) -> None:
        self._listeners.setdefault((worker, stream), []).append(listener)

    def unlisten(self, worker: str, stream: str, listener: Callable[[int], None]) -> None:
        listeners = self._listeners.get((worker, stream), [])
        if listener in listeners:
            listeners.remove(listener)


class PublisherProcess:
    """Supervises ``python -m decnet.listener.publisher <ingest-dir> ...``."""

    def __init__(
        self,
        reactor: IReactorProcess,
        directory: Path,
        options: NatsOptions,
        *,
        executable: str = sys.executable,
    ):
        self.reactor = reactor
        self.directory = Path(directory)
        self.options = options
        self.executable = executable
        self.marks = BrokerMarks()
        self.broker = "starting"
        self.supervisor: process.Supervisor | None = None
        self._closing = False
        self._known: set[tuple[str, str]] = set()

    def argv(self, *extra: str) -> list[str]:
        return [
            self.executable,
            "-m",
            "decnet.listener.publisher",
            str(self.directory),
            *self.options.argv(),
            *extra,
        ]

    def check(self) -> dict:
        """Run the publisher's start-up check.  Blocking: before the reactor runs only.

        Returns its ``ready`` report; raises :class:`PublisherRefused` with its
        one-line reason when the broker cannot be used.
        """
        try:
            done = subprocess.run(
                self.argv("--check"),
                capture_output=True,
                timeout=CHECK_TIMEOUT,
                env=process.child_env(same_python=True),
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise PublisherRefused(
                f"the broker check did not finish within {CHECK_TIMEOUT:g}s "
                f"({','.join(self.options.servers)})"
            ) from None
        reports = decode_messages(bytearray(done.stdout))
        if done.returncode != 0:
            fatal = [r["fatal"] for r in reports if "fatal" in r]
            text = fatal[-1] if fatal else done.stderr.decode("utf-8", "replace").strip()
            raise PublisherRefused(text or f"the publisher check exited {done.returncode}")
        ready = [r["ready"] for r in reports if "ready" in r]
        return ready[-1] if ready else {}

    def start(self) -> None:
        if self.supervisor is not None or self._closing:
            return
        spec = helper_spec("Publisher process", self.argv())
        self.supervisor = supervise_helper(self.reactor, spec, self.report, self._observe, _log)

    def notify(self, worker: str, stream: str) -> None:
        """``worker/stream`` has new durable commits (or a forwarder waits for its mark)."""
        self._known.add((worker, stream))
        self._send(worker, stream)

    def _send(self, worker: str, stream: str) -> None:
        supervisor = self.supervisor
        if supervisor is None or not supervisor.running or supervisor.child is None:
            return  # every known stream is told again when the next one starts
        transport = supervisor.child.transport
        if transport is not None:
            transport.write(encode_message({"worker": worker, "stream": stream}))

    def _observe(self, event: process.SupervisorEvent) -> None:
        if isinstance(event, process.Started):
            for worker, stream in self._known:
                self._send(worker, stream)

    def report(self, message: dict) -> None:
        """One report of the publisher process (see :mod:`decnet.listener.publisher`)."""
        if "confirmed" in message:
            try:
                worker, stream = str(message["worker"]), str(message["stream"])
                end = int(message["confirmed"])
            except (KeyError, TypeError, ValueError):
                _log.error("Publisher process sent a malformed report; ignored")
                return
            self.marks.confirmed(worker, stream, end)
        elif "broker" in message:
            self._broker(str(message["broker"]), message.get("error"))
        elif "ready" in message:
            if self.supervisor is not None:
                self.supervisor.healthy()
            _log.info("Publishing into JetStream: {ready}", ready=message["ready"])
        else:
            self._other(message)

    def _broker(self, state: str, error: object) -> None:
        previous, self.broker = self.broker, state
        if state == previous:
            return
        if state == "up" and previous == "starting":
            _log.info("JetStream broker reachable")
        elif state == "up":
            _log.info("JetStream broker reachable again; acknowledging resumes")
        else:
            _log.warn(
                "JetStream broker {state}: {error}; "
                "forwarders are not acknowledged until it is back",
                state=state,
                error=error,
            )

    def _other(self, message: dict) -> None:
        if "fatal" in message:
            _log.error("Publisher process stopped: {error}", error=message["fatal"])
        elif "fenced" in message:
            _log.warn(
                "Another publisher wrote on {subject}; re-reading the broker's position",
                subject=message["fenced"],
            )
        elif "warn" in message:
            _log.warn(
                "Publishing {worker}/{stream}: {text}",
                worker=message.get("worker", "-"),
                stream=message.get("stream", "-"),
                text=message["warn"],
            )

    def close(self) -> defer.Deferred[None]:
        """Let the publisher finish what it is publishing and exit (killed after STOP_GRACE)."""
        self._closing = True
        if self.supervisor is None:
            return defer.succeed(None)
        return self.supervisor.stop()
