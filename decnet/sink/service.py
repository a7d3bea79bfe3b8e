"""``twistd decnet-sink``: JetStream events into PostgreSQL, exactly once.

The consumer process (:mod:`decnet.sink.consumer`: asyncio and nats-py, never
here) hands over one batch of ``decnet.events.>`` messages at a time.  This
side writes the batch in one PostgreSQL transaction through the reactor's
thread pool (:class:`decnet.sink.store.SinkStore`, psycopg 3) and only after
the COMMIT tells the consumer to acknowledge it to JetStream.  The consumer
fetches nothing more meanwhile: a batch is the bound on memory.

Exactly once: a message is acknowledged only after its row is committed; a
message delivered again (a kill at any moment, a lost acknowledgement) meets
the primary key ``(worker, stream, stream_offset)`` and ``ON CONFLICT DO
NOTHING``.  PostgreSQL down or unreachable: the outage is logged once, the
same batch is retried with backoff (nothing acknowledged, so nothing lost), and
the recovery is logged once.  A message that can never be a row is kept in the
rejected table with its reason and acknowledged (see :mod:`decnet.sink.rows`).
"""

from __future__ import annotations

import base64
import binascii
import sys
from collections.abc import Callable

import attrs
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from decnet import process
from decnet.cli.output import printable
from decnet.listener.feedproc import helper_spec, supervise_helper
from decnet.listener.feedworker import encode_message
from decnet.listener.publisherproc import NatsOptions
from decnet.sink import consumer as consumer_defaults
from decnet.sink.rows import Message, Rejected
from decnet.sink.store import SchemaMismatch, SinkStore, StoreUnavailable
from decnet.threads import Runner

# Retry delays of a batch PostgreSQL did not take: first, doubling to the maximum.
RETRY_FIRST = 0.5
RETRY_MAX = 15.0

_log = Logger(namespace="decnet.sink")


@attrs.frozen
class SinkOptions:
    """Where the events come from and go (the tap's options, checked).

    ``nats`` is the listener's own description of a broker connection (the
    consumer takes the same connection arguments as the publisher).
    """

    nats: NatsOptions
    dsn: str
    durable: str = consumer_defaults.DEFAULT_DURABLE
    batch: int = consumer_defaults.DEFAULT_BATCH
    ack_wait: float = consumer_defaults.DEFAULT_ACK_WAIT

    def consumer_argv(self, executable: str) -> list[str]:
        argv = [executable, "-m", "decnet.sink.consumer", *self.nats.argv()]
        argv += ["--durable", self.durable, "--batch", str(self.batch)]
        return [*argv, "--ack-wait", f"{self.ack_wait:g}"]


def decode_batch(report: dict) -> tuple[str, list[Message]]:
    """A ``batch`` report of the consumer as messages (``ValueError`` if it is malformed)."""
    try:
        token = str(report["batch"])
        messages = [
            Message(
                subject=str(m["subject"]),
                headers={str(k): str(v) for k, v in dict(m["headers"]).items()},
                data=base64.b64decode(m["data"], validate=True),
                js_stream=str(m["stream"]),
                js_seq=int(m["seq"]),
            )
            for m in report["messages"]
        ]
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise ValueError(f"malformed batch report: {exc!r}") from None
    return token, messages


@attrs.define
class SinkCounts:
    """What the sink did since it started (the metrics read these)."""

    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
    batches: int = 0
    store_failures: int = 0
    store_up: bool = False
    broker: str = "starting"


class SinkService(Service):
    """Supervises the consumer process and writes its batches (see the module docstring)."""

    def __init__(
        self,
        reactor: IReactorProcess,
        clock: IReactorTime,
        options: SinkOptions,
        run: Runner,
        *,
        store: SinkStore | None = None,
        executable: str = sys.executable,
    ):
        self.reactor = reactor
        self.clock = clock
        self.options = options
        self.run = run
        self.store = store if store is not None else SinkStore(options.dsn)
        self.executable = executable
        self.counts = SinkCounts()
        self.supervisor: process.Supervisor | None = None
        self.current: str | None = None
        self._store_down_since: str | None = None
        self._retry = RETRY_FIRST
        self.fatal: Callable[[str], None] = self._stop_reactor

    def startService(self) -> None:
        super().startService()
        spec = helper_spec("Sink consumer process", self.options.consumer_argv(self.executable))
        self.supervisor = supervise_helper(self.reactor, spec, self.report, self._observe, _log)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        supervisor, self.supervisor = self.supervisor, None
        done = supervisor.stop() if supervisor is not None else defer.succeed(None)
        done.addBoth(lambda _: self.run(self.store.close))
        return done.addCallback(lambda _: None)

    def _observe(self, event: process.SupervisorEvent) -> None:
        if isinstance(event, process.Started):
            self.current = None  # a new consumer: batches of the old one are not ours to ack

    def report(self, message: dict) -> None:
        """One report of the consumer process."""
        if "batch" in message:
            try:
                token, messages = decode_batch(message)
            except ValueError as exc:
                _log.error("Sink consumer sent {what}; restarting it", what=str(exc))
                self._restart_consumer()
                return
            self.current = token
            self._retry = RETRY_FIRST
            self._write(token, messages)
        elif "ready" in message:
            if self.supervisor is not None:
                self.supervisor.healthy()
            _log.info("Consuming JetStream events: {ready}", ready=message["ready"])
        elif "broker" in message:
            self._broker(str(message["broker"]), message.get("error"))
        elif "fatal" in message:
            self.fatal(str(message["fatal"]))
        elif "warn" in message:
            _log.warn("Sink consumer: {text}", text=message["warn"])

    def _broker(self, state: str, error: object) -> None:
        previous, self.counts.broker = self.counts.broker, state
        if state == previous:
            return
        if state == "up":
            _log.info("JetStream broker reachable; consuming events")
        elif state == "waiting":
            _log.warn("Waiting for the JetStream stream and consumer: {error}", error=error)
        else:
            _log.warn(
                "JetStream broker {state}: {error}; nothing is lost, the sink waits",
                state=state,
                error=error,
            )

    def _write(self, token: str, messages: list[Message]) -> None:
        d = self.run(self.store.write, messages)
        d.addCallbacks(
            lambda result: self._written(token, messages, result),
            lambda failure: self._failed(token, messages, failure),
        )
        d.addErrback(lambda f: _log.failure("Sink batch handling failed", f))

    def _written(
        self, token: str, messages: list[Message], result: tuple[int, int, list[Rejected]]
    ) -> None:
        added, duplicates, rejected = result
        counts = self.counts
        counts.stored += added
        counts.duplicates += duplicates
        counts.rejected += len(rejected)
        counts.batches += 1
        if not counts.store_up:
            counts.store_up = True
            if self._store_down_since is not None:
                _log.info("PostgreSQL reachable again; storing resumes")
                self._store_down_since = None
        for one in rejected:
            _log.warn(
                "Rejected event {js_stream} #{js_seq} on {subject}: {reason} "
                "(kept in decnet_rejected_events)",
                js_stream=one.message.js_stream,
                js_seq=one.message.js_seq,
                subject=printable(one.message.subject, 200),
                reason=printable(one.reason),
            )
        self._ack(token)

    def _ack(self, token: str) -> None:
        if token == self.current:
            self.send({"ack": token})
        # (else its consumer is gone: the messages come again and are stored once)

    def send(self, message: dict) -> None:
        """One message to the consumer process (dropped when there is none)."""
        supervisor = self.supervisor
        if supervisor is None or supervisor.child is None:
            return
        transport = supervisor.child.transport
        if transport is not None:
            transport.write(encode_message(message))

    def _failed(self, token: str, messages: list[Message], failure: Failure) -> None:
        self.counts.store_failures += 1
        self.counts.store_up = False
        if failure.check(SchemaMismatch):
            self.fatal(failure.getErrorMessage())
            return
        failure.trap(StoreUnavailable)
        reason = failure.getErrorMessage()
        if self._store_down_since is None:
            self._store_down_since = reason
            _log.warn(
                "PostgreSQL unavailable: {reason}; retrying with backoff, "
                "nothing is acknowledged meanwhile",
                reason=reason,
            )
        delay, self._retry = self._retry, min(self._retry * 2, RETRY_MAX)
        self.clock.callLater(delay, self._again, token, messages)

    def _again(self, token: str, messages: list[Message]) -> None:
        if token == self.current and self.running:
            self._write(token, messages)

    def _restart_consumer(self) -> None:
        supervisor = self.supervisor
        if supervisor is not None and supervisor.child is not None:
            supervisor.child.signal("KILL")

    def _stop_reactor(self, reason: str) -> None:
        _log.critical("Stopping: {reason}", reason=reason)
        stop = getattr(self.reactor, "stop", None)
        if stop is not None and getattr(self.reactor, "running", False):
            stop()
