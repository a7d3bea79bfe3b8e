"""The agent daemon as a Twisted service: event log, engine, API listener, restore.

Start-up order: the event log's writer starts, the API listens (mTLS; a failed
bind is fatal), the bound port is written to ``--port-file`` when asked, and
the persisted desired state is re-applied so the deckies come back after a
restart or an update.  Shutdown stops the deckies, then flushes the event log.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from decnet import config
from decnet.agent.app import make_app, master_accept, updater_accept
from decnet.agent.controller import Controller
from decnet.agent.engine import ENGINES
from decnet.agent.eventlog import EventLog
from decnet.agent.state import DesiredState
from decnet.fsutil import atomic_write, ensure_private_dir
from decnet.httpapi import make_site
from decnet.pki import WorkerBundle
from decnet.revocation import RevocationSet, RevocationWatcher
from decnet.tls import PeerPolicy, PolicyOptions, TLSIdentity, listen_tls


def tls_policy(bundle: WorkerBundle, revocations=None) -> PeerPolicy:
    """Who may complete a handshake with the agent: the pinned master, this host's updater."""
    return PeerPolicy(
        [master_accept(bundle.master_fingerprint), updater_accept(bundle.name)],
        revocations=revocations,
    )


class APIListener(Service):
    """Listens for the API on an endpoint string with our TLS policy."""

    log = Logger()

    def __init__(self, reactor, endpoint: str, options, site, *, on_listening, on_fatal):
        self._reactor = reactor
        self.endpoint = endpoint
        self.options = options
        self.site = site
        self.on_listening = on_listening
        self.on_fatal = on_fatal
        self.port = None
        self.ready: defer.Deferred = defer.Deferred()

    def startService(self):
        super().startService()
        d = listen_tls(self._reactor, self.endpoint, self.options, self.site)
        d.addCallback(self._listening)
        d.addErrback(self._failed)

    def _listening(self, port):
        self.port = port
        host = port.getHost()
        self.log.info("Agent API listening on {host}:{port}", host=host.host, port=host.port)
        d = defer.maybeDeferred(self.on_listening, port)
        d.addCallback(lambda _: self.ready.callback(port))
        return d

    def _failed(self, failure):
        self.log.critical(
            "Cannot listen on {endpoint}: {error}",
            endpoint=self.endpoint,
            error=failure.getErrorMessage(),
        )
        self.on_fatal(f"cannot listen on {self.endpoint}")

    def stopService(self):
        super().stopService()
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None


class AgentService(MultiService):
    """Everything ``twistd decnet-agent`` runs."""

    log = Logger()

    def __init__(
        self,
        reactor,
        *,
        bundle: WorkerBundle,
        identity: TLSIdentity,
        listen: str,
        state_dir: str | os.PathLike,
        log_file: str | os.PathLike,
        port_file: str | os.PathLike | None = None,
        engine: str = "builtin",
        on_fatal: Callable[[str], None] | None = None,
        event_clock=None,
        new_session_id=None,
        revocations: str | os.PathLike | None = None,
    ):
        super().__init__()
        self._reactor = reactor
        self.bundle = bundle
        self.state_dir = Path(state_dir)
        self.port_file = Path(port_file) if port_file else None
        self.on_fatal = on_fatal or self._stop_reactor
        self.eventlog = EventLog(
            log_file, reactor, now=event_clock.seconds if event_clock else None
        )
        self.eventlog.setServiceParent(self)
        engine_kw = {"clock": event_clock} if event_clock else {}
        if new_session_id is not None:
            engine_kw["new_session_id"] = new_session_id
        self.engine = ENGINES[engine](reactor, self.eventlog.emit, self.state_dir, **engine_kw)
        self.store = DesiredState(self.state_dir / config.AGENT_STATE_FILE, reactor)
        self.controller = Controller(self.engine, self.store, reactor, host=bundle.name)
        app = make_app(
            self.controller, host=bundle.name, master_fingerprint=bundle.master_fingerprint
        )
        site = make_site(app.resource(), max_body=config.AGENT_MAX_BODY, reactor=reactor)
        revoked = None
        if revocations is not None:
            revoked = RevocationSet(revocations)
            RevocationWatcher(revoked, reactor).setServiceParent(self)
        self.api = APIListener(
            reactor,
            listen,
            PolicyOptions(identity, tls_policy(bundle, revoked)),
            site,
            on_listening=self._listening,
            on_fatal=self.on_fatal,
        )
        self.api.setServiceParent(self)
        self.restored: defer.Deferred = defer.Deferred()

    def startService(self):
        ensure_private_dir(self.state_dir)
        super().startService()
        d = defer.ensureDeferred(self.controller.restore())
        d.addErrback(self._restore_failed)
        d.addBoth(lambda _: self.restored.callback(None))

    def _restore_failed(self, failure):
        self.log.failure("Re-applying the desired state failed", failure)

    def _listening(self, port):
        if self.port_file is None:
            return None
        data = f"{port.getHost().port}\n".encode()
        return deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), atomic_write, self.port_file, data
        )

    @defer.inlineCallbacks
    def stopService(self):
        # Stop accepting API calls, stop the deckies (their disconnect events
        # are logged), then let the event log flush and close.
        yield self.api.stopService()
        try:
            yield defer.ensureDeferred(self.controller.stop())
        except Exception:
            self.log.failure("Stopping the deckies failed")
        yield MultiService.stopService(self)

    def _stop_reactor(self, reason: str) -> None:
        self.log.critical("Agent cannot run ({reason}); stopping", reason=reason)
        # twistd exits 0 when the reactor stops; a supervisor must see a failure.
        self._reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
        # twistd starts the application before the reactor runs: stop once it does.
        self._reactor.callWhenRunning(self._reactor.stop)
