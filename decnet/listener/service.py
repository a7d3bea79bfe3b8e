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
from decnet.revocation import RevocationSet, RevocationWatcher
from decnet.systemd import SystemdService
from decnet.tls import Accept, PeerPolicy, PolicyOptions, TLSIdentity


def listener_options(identity: TLSIdentity, revocations: RevocationSet | None) -> PolicyOptions:
    """Server TLS options: workers of our CA only, not revoked; offers the ack protocol
    (version 2, where a worker may arrive from another listener, preferred)."""
    policy = PeerPolicy([Accept(config.ROLE_WORKER)], revocations=revocations)
    alpn = [config.ACK_ALPN_MOVES, config.ACK_ALPN]
    return PolicyOptions(identity, policy, acceptable_protocols=alpn)


class IngestService(Service):
    """Owns the :class:`Ingest`: creates its directory, closes files on stop."""

    def __init__(self, ingest: Ingest):
        self.ingest = ingest

    def privilegedStartService(self):
        super().privilegedStartService()
        self.ingest.prepare()

    def startService(self):
        super().startService()
        self.ingest.start()

    def stopService(self):
        super().stopService()
        return self.ingest.close()


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
        self.ingest = Ingest(
            ingest_dir,
            reactor,
            feeds=feeds,
            max_streams_per_worker=max_streams_per_worker,
            max_open_streams=max_open_streams,
        )
        self.factory = ListenerFactory(self.ingest, reactor, limits)
        self.revocations = revocations
        revocations.subscribe(self.factory.revoked)
        self.watcher = RevocationWatcher(revocations, reactor)
        IngestService(self.ingest).setServiceParent(self)
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
