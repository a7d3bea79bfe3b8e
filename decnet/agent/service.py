"""The agent daemon as a Twisted service: event log, engine, API listener, restore.

Start-up order: the event log's writer starts, the API listens (mTLS; a failed
bind is fatal), the bound port is written to ``--port-file`` when asked, and
the persisted desired state is re-applied so the deckies come back after a
restart or an update.  Shutdown stops the deckies, then flushes the event log.
"""

from __future__ import annotations

import os
from pathlib import Path

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.logger import Logger

from decnet import config
from decnet.agent.app import LIMITS, make_app, master_accept, updater_accept
from decnet.agent.controller import Controller
from decnet.agent.decoys.budget import (
    APIPriority,
    ConnectionBudget,
    TurnBudget,
    default_connection_budget,
    nofile_limit,
)
from decnet.agent.engine import ENGINES
from decnet.agent.eventlog import EventLog
from decnet.agent.state import DesiredState
from decnet.daemon import TLSPortService
from decnet.fsutil import ensure_private_dir
from decnet.httpapi import make_site
from decnet.pki import WorkerBundle
from decnet.systemd import SystemdService
from decnet.tls import BundleIdentity, IdentityWatcher, PeerPolicy, PolicyOptions, TLSIdentity


def tls_policy(bundle: WorkerBundle) -> PeerPolicy:
    """Who may complete a handshake with the agent: the pinned master, this host's updater.

    No revocation list (docs/Security.md): the master is pinned by fingerprint.
    """
    return PeerPolicy([master_accept(bundle.master_fingerprint), updater_accept(bundle.name)])


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
        event_clock=None,
        new_session_id=None,
        max_decoy_connections: int | None = None,
    ):
        super().__init__()
        self._reactor = reactor
        self.bundle = bundle
        self.state_dir = Path(state_dir)
        self.eventlog = EventLog(
            log_file, reactor, now=event_clock.seconds if event_clock else None
        )
        self.eventlog.setServiceParent(self)
        engine_kw = {"clock": event_clock} if event_clock else {}
        if max_decoy_connections is None:
            max_decoy_connections = default_connection_budget(nofile_limit())
        self.decoy_budget = ConnectionBudget(max_decoy_connections, reactor)
        self.decoy_turns = TurnBudget(event_clock or reactor)
        engine_kw["connection_budget"] = self.decoy_budget
        engine_kw["turn_budget"] = self.decoy_turns
        if new_session_id is not None:
            engine_kw["new_session_id"] = new_session_id
        self.engine = ENGINES[engine](reactor, self.eventlog.emit, self.state_dir, **engine_kw)
        self.store = DesiredState(self.state_dir / config.AGENT_STATE_FILE, reactor)
        self.controller = Controller(self.engine, self.store, reactor, host=bundle.name)
        app = make_app(
            self.controller, host=bundle.name, master_fingerprint=bundle.master_fingerprint
        )
        site = make_site(app.resource(), limits=LIMITS, reactor=reactor)
        tls_options = PolicyOptions(identity, tls_policy(bundle))
        self.api = TLSPortService(
            reactor,
            listen,
            tls_options,
            # While the master (or the updater) is being served, decoys get
            # less of each reactor turn.
            APIPriority(site, self.decoy_turns),
            port_file=port_file,
            label="the agent API",
        )
        self.api.setServiceParent(self)
        # A renewed certificate (`decnet-admin renew`) is presented from the next connection on.
        self.identity_watcher = IdentityWatcher(
            reactor, BundleIdentity(bundle, config.ROLE_WORKER, identity), [tls_options.reload]
        )
        self.identity_watcher.setServiceParent(self)
        self.systemd = SystemdService(reactor)
        self.systemd.setServiceParent(self)
        self.restored: defer.Deferred = defer.Deferred()

    def startService(self):
        ensure_private_dir(self.state_dir)
        self.log.info(
            "Decoys may hold {budget} sockets in all (RLIMIT_NOFILE {nofile})",
            budget=self.decoy_budget.limit,
            nofile=nofile_limit(),
        )
        super().startService()
        d = defer.ensureDeferred(self.controller.restore())
        d.addErrback(self._restore_failed)
        d.addBoth(lambda _: self.restored.callback(None))
        # Ready for systemd once the API listens and the deckies are back.
        d.addBoth(lambda _: self.systemd.ready(f"API on {self.api.description}"))

    def _restore_failed(self, failure):
        self.log.failure("Re-applying the desired state failed", failure)

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
