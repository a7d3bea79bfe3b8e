"""The listener service: TLS port, ingest, revocation watcher, in one MultiService."""

from __future__ import annotations

import signal
from pathlib import Path

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.logger import Logger

from decnet import config
from decnet.daemon import TLSPortService
from decnet.listener import ingest
from decnet.listener.feedproc import FeedProcess
from decnet.listener.ingest import Ingest
from decnet.listener.protocol import DEFAULT_LIMITS, ConnectionLimits, ListenerFactory
from decnet.listener.publisherproc import NatsOptions, PublisherProcess, PublisherRefused
from decnet.listener.workers import StateFile, state_path
from decnet.revocation import RevocationSet, RevocationWatcher
from decnet.systemd import SystemdService
from decnet.threads import pool_runner
from decnet.tls import Accept, PeerPolicy, PolicyOptions, TLSIdentity


def listener_options(identity: TLSIdentity, revocations: RevocationSet | None) -> PolicyOptions:
    """Server TLS options: workers of our CA only, not revoked; offers the ack protocol
    (version 2, where a worker may arrive from another listener, preferred)."""
    policy = PeerPolicy([Accept(config.ROLE_WORKER)], revocations=revocations)
    alpn = [config.ACK_ALPN_MOVES, config.ACK_ALPN]
    return PolicyOptions(identity, policy, acceptable_protocols=alpn)


class IngestService(Service):
    """Owns the :class:`Ingest`: creates its directory, closes files on stop."""

    log = Logger()

    def __init__(self, ingest: Ingest, state_file: StateFile | None = None):
        self.ingest = ingest
        self.state_file = state_file

    def privilegedStartService(self):
        super().privilegedStartService()
        self.ingest.prepare()
        publisher = self.ingest.publisher
        if publisher is not None:
            # Before the reactor runs: a broker we cannot use stops the daemon here,
            # with its one-line reason, like a port we cannot bind.
            try:
                publisher.check()
            except PublisherRefused as exc:
                self.log.critical("Cannot publish into JetStream: {error}", error=str(exc))
                raise

    def startService(self):
        super().startService()
        self.ingest.start()
        if self.state_file is not None:
            self.state_file.start().addErrback(
                lambda f: self.log.failure("Starting the worker state file", f)
            )

    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
        yield self.ingest.close()
        if self.state_file is not None:
            yield self.state_file.stop()


class ListenerService(MultiService):
    """Everything ``twistd decnet-listener`` runs."""

    log = Logger()

    def __init__(
        self,
        reactor,
        *,
        identity: TLSIdentity,
        revocations: RevocationSet,
        ingest_dir: Path,
        listen: str,
        port_file: Path | None = None,
        limits: ConnectionLimits = DEFAULT_LIMITS,
        max_streams_per_worker: int = ingest.DEFAULT_MAX_STREAMS_PER_WORKER,
        max_open_streams: int = ingest.DEFAULT_MAX_OPEN_STREAMS,
        feed: bool = True,
        feed_encoders: int | None = None,
        publish: NatsOptions | None = None,
        ack_after: str = "local",
        sighup: bool = False,
    ):
        super().__init__()
        self.sighup = sighup
        self.reactor = reactor
        feeds = (
            FeedProcess(reactor, ingest_dir, encoders=feed_encoders, max_open=max_open_streams)
            if feed
            else None
        )
        self.publisher = (
            PublisherProcess(reactor, ingest_dir, publish) if publish is not None else None
        )
        self.ingest = Ingest(
            ingest_dir,
            reactor,
            feeds=feeds,
            publisher=self.publisher,
            max_streams_per_worker=max_streams_per_worker,
            max_open_streams=max_open_streams,
        )
        # Per-worker state: <ingest>/workers.json (decnet-admin hosts / check / top read it).
        self.worker_state = StateFile(state_path(ingest_dir), reactor, pool_runner(reactor))
        self.ingest.commit_observers.append(self.worker_state.states.on_commit)
        if ack_after == "broker" and self.publisher is None:
            raise ValueError("--ack-after broker needs --publish")
        broker = self.publisher.marks if ack_after == "broker" and self.publisher else None
        self.factory = ListenerFactory(
            self.ingest, reactor, limits, workers=self.worker_state.states, broker=broker
        )
        self.revocations = revocations
        revocations.subscribe(self.factory.revoked)
        self.watcher = RevocationWatcher(revocations, reactor)
        IngestService(self.ingest, self.worker_state).setServiceParent(self)
        self.watcher.setServiceParent(self)
        self.port_service = TLSPortService(
            reactor,
            listen,
            listener_options(identity, revocations),
            self.factory,
            port_file=port_file,
            label="workers",
            gate=self.factory.outside_tls,
        )
        self.port_service.setServiceParent(self)
        self.systemd = SystemdService(reactor)
        self.systemd.setServiceParent(self)
        self._old_hup = None

    def startService(self):
        super().startService()
        if self.sighup:
            self._old_hup = signal.signal(signal.SIGHUP, self._sighup)
        self.systemd.ready(f"listening for workers on {self.port_service.description}")

    def _sighup(self, signum, frame):
        self.reactor.callFromThread(self._reload)

    def _reload(self):
        self.log.info("SIGHUP: reloading the revocation list")
        return self.watcher.check()

    @defer.inlineCallbacks
    def stopService(self):
        if self._old_hup is not None:
            signal.signal(signal.SIGHUP, self._old_hup)
            self._old_hup = None
        # Stop accepting first, then let in-flight commits finish.
        yield self.port_service.stopService()
        yield self._final_acks()
        for proto in list(self.factory.connections):
            proto.transport.loseConnection()
        yield super().stopService()

    def _final_acks(self) -> defer.Deferred:
        """Stop reading, and let every stream's commits finish while its connection is
        still up, so each worker hears the ACK of everything this listener made durable:
        a worker that moves to another listener then starts its segment exactly there."""
        flushes = []
        for proto in list(self.factory.connections):
            proto.transport.pauseProducing()
            if proto.sink is not None and not proto.sink.failed:
                flushes.append(proto.sink.when_flushed())
        return defer.DeferredList(flushes, consumeErrors=True)


def raise_nofile_limit() -> None:
    """Let one listener hold thousands of connections and stream files."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass
