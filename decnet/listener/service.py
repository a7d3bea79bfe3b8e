"""The listener service: TLS port, ingest, revocation watcher, in one MultiService."""

from __future__ import annotations

import signal
from pathlib import Path

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from decnet import config
from decnet.fsutil import atomic_write
from decnet.listener.feedproc import FeedProcess
from decnet.listener.ingest import Ingest
from decnet.listener.protocol import ListenerFactory
from decnet.revocation import RevocationSet, RevocationWatcher
from decnet.tls import Accept, PeerPolicy, PolicyOptions, TLSIdentity, listen_tls


def listener_options(identity: TLSIdentity, revocations: RevocationSet | None) -> PolicyOptions:
    """Server TLS options: workers of our CA only, not revoked; offers the ack protocol."""
    policy = PeerPolicy([Accept(config.ROLE_WORKER)], revocations=revocations)
    return PolicyOptions(identity, policy, acceptable_protocols=[config.ACK_ALPN])


class TLSPortService(Service):
    """Listens on an endpoint string with TLS; a failed bind fails start-up.

    The bind happens in ``privilegedStartService`` and an error is raised
    synchronously (as ``strports.service`` does), so ``twistd`` exits instead
    of running a daemon that listens nowhere.  The bound port number is written
    to ``port_file`` when given (tests and sandboxes listen on port 0).
    """

    log = Logger()

    def __init__(self, reactor, description: str, options, factory, port_file: Path | None):
        self.reactor = reactor
        self.description = description
        self.options = options
        self.factory = factory
        self.port_file = port_file
        self.port = None

    def privilegedStartService(self):
        super().privilegedStartService()
        if self.port is not None:
            return
        result: list = []
        d = listen_tls(self.reactor, self.description, self.options, self.factory)
        d.addBoth(result.append)
        if not result:
            raise RuntimeError(f"listening on {self.description} did not complete synchronously")
        if isinstance(result[0], Failure):
            self.log.critical(
                "Cannot listen on {endpoint}: {error}",
                endpoint=self.description,
                error=result[0].getErrorMessage(),
            )
            result[0].raiseException()
        self.port = result[0]
        host = self.port.getHost()
        self.log.info(
            "Listening for workers on {endpoint} (port {port})",
            endpoint=self.description,
            port=host.port,
        )
        if self.port_file is not None:
            atomic_write(self.port_file, b"%d\n" % host.port)

    def startService(self):
        if self.port is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self):
        super().stopService()
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
        return None


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
        max_frame: int = config.DEFAULT_MAX_FRAME,
        max_connections: int = config.DEFAULT_MAX_CONNECTIONS,
        max_per_worker: int = config.DEFAULT_MAX_CONNECTIONS_PER_WORKER,
        idle_timeout: float = config.DEFAULT_IDLE_TIMEOUT,
        feed: bool = True,
        feed_encoders: int | None = None,
        sighup: bool = False,
    ):
        super().__init__()
        self.sighup = sighup
        self.reactor = reactor
        feeds = FeedProcess(reactor, ingest_dir, encoders=feed_encoders) if feed else None
        self.ingest = Ingest(ingest_dir, reactor, feeds=feeds)
        self.factory = ListenerFactory(
            self.ingest,
            reactor,
            max_frame=max_frame,
            max_connections=max_connections,
            max_per_worker=max_per_worker,
            idle_timeout=idle_timeout,
        )
        self.revocations = revocations
        revocations.subscribe(self.factory.revoked)
        self.watcher = RevocationWatcher(revocations, reactor)
        IngestService(self.ingest).setServiceParent(self)
        self.watcher.setServiceParent(self)
        self.port_service = TLSPortService(
            reactor, listen, listener_options(identity, revocations), self.factory, port_file
        )
        self.port_service.setServiceParent(self)
        self._old_hup = None

    def startService(self):
        super().startService()
        if self.sighup:
            self._old_hup = signal.signal(signal.SIGHUP, self._sighup)

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
        for proto in list(self.factory.connections):
            proto.transport.loseConnection()
        yield super().stopService()


def raise_nofile_limit() -> None:
    """Let one listener hold thousands of connections and stream files."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass
