"""The updater daemon as a Twisted service: the API port, the release store, the agent.

Start-up order: the API listens (mTLS; a failed bind is fatal) and the bound
port is written to ``--port-file`` when asked; then the release store is
reconciled (a half-done update is repaired) and systemd hears READY.  Shutdown
closes the port, then lets the updater finish and stop the agent it spawned.

After ``update-self`` the updater restarts onto its new release by its restart
policy (:data:`SELF_RESTARTS`): ``exec`` replaces the process in place, ``exit``
stops the reactor and leaves the restart to systemd.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

import attrs
from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorCore, IReactorThreads
from twisted.logger import Logger
from twisted.python.failure import Failure

from decnet import config, pki
from decnet.daemon import TLSPortService
from decnet.httpapi import make_site
from decnet.httpclient import PinnedClient
from decnet.interfaces import IDecnetReactor
from decnet.systemd import SystemdService
from decnet.threads import pool_runner, serial_runner
from decnet.tls import (
    Accept,
    BundleIdentity,
    IdentityWatcher,
    PeerPolicy,
    PolicyOptions,
    TLSIdentity,
)
from decnet.updater import archive
from decnet.updater.agentctl import SpawnedAgent, SystemdAgent, agent_argv
from decnet.updater.app import build_app, upload_limits
from decnet.updater.engine import Updater
from decnet.updater.health import HealthProbe
from decnet.updater.installer import Installer
from decnet.updater.releases import ReleaseStore
from decnet.updater.renewal import Renewer

# How the updater restarts onto a new release of itself (``--self-restart``).
SELF_RESTARTS = ("exec", "exit")


def exec_restart(release_dir: Path) -> None:
    """Replace this process with twistd from ``release_dir``'s venv, same arguments."""
    twistd = str(Path(release_dir) / config.RELEASE_VENV_DIR / "bin" / "twistd")
    os.execv(twistd, [twistd, *sys.argv[1:]])  # noqa: S606 - fixed path, our own argv


def exit_restart(reactor: IReactorCore) -> Callable[[Path], None]:
    """Stop the reactor: systemd (``Restart=``) starts the updater again, from ``current``."""

    def restart(release_dir: Path) -> None:
        Logger(namespace="decnet.updater").info(
            "Exiting so that systemd restarts the updater on {release}", release=release_dir.name
        )
        reactor.stop()

    return restart


def self_restart(policy: str, reactor: IReactorCore) -> Callable[[Path], None]:
    """The restart after ``update-self`` for a ``--self-restart`` policy."""
    return exec_restart if policy == "exec" else exit_restart(reactor)


@attrs.frozen
class LocalAgent:
    """This host's agent as the updater reaches and restarts it (the ``--agent-*`` options)."""

    host: str
    port: int
    control: str = "systemd"
    unit: str = config.DEFAULT_AGENT_UNIT
    state_dir: str | None = None
    log_file: str | None = None
    twistd_log: str | None = None
    forwarder_unit: str = config.DEFAULT_FORWARDER_UNIT  # "" for none
    systemctl: str = "systemctl"  # systemd: the systemctl it runs (tests: a stand-in)


def accepted_peers(bundle: pki.WorkerBundle) -> tuple[Accept, tuple[Accept, ...]]:
    """The pinned master (every route), and this host's worker and updater (``/health``)."""
    master = Accept(config.ROLE_MASTER, cn=config.MASTER_CN, fingerprint=bundle.master_fingerprint)
    local = (
        Accept(config.ROLE_WORKER, cn=bundle.name),
        Accept(config.ROLE_UPDATER, cn=config.UPDATER_CN_PREFIX + bundle.name),
    )
    return master, local


def agent_control(reactor: IDecnetReactor, bundle: pki.WorkerBundle, agent: LocalAgent):
    """The agent's restarter: ``systemctl`` on its unit, or a child process we supervise."""
    if agent.control != "spawn":
        companions = (agent.forwarder_unit,) if agent.forwarder_unit else ()
        return SystemdAgent(reactor, agent.unit, companions=companions, systemctl=agent.systemctl)
    interface = agent.host.replace(":", "\\:")
    return SpawnedAgent(
        reactor,
        functools.partial(
            agent_argv,
            bundle=str(bundle.directory),
            listen=f"tcp:{agent.port}:interface={interface}",
            state_dir=agent.state_dir,
            log_file=agent.log_file,
            twistd_log=agent.twistd_log,
        ),
        twistd_log=agent.twistd_log,
    )


def agent_health_client(
    reactor, identity: TLSIdentity, bundle: pki.WorkerBundle, agent: LocalAgent
) -> PinnedClient:
    """A client for the agent's ``/health``, pinned to this host's worker certificate."""
    worker_fp = pki.fingerprint(pki.load_cert(bundle.cert_path(config.ROLE_WORKER)))
    return PinnedClient(
        reactor,
        identity,
        address=agent.host,
        port=agent.port,
        accept=Accept(config.ROLE_WORKER, cn=bundle.name, fingerprint=worker_fp),
        timeout=5.0,
        # One connection per agent process (the pool drops it when the agent
        # restarts) instead of a handshake, and two log lines, per probe.
        persistent=True,
    )


def identity_watchers(
    reactor: IDecnetReactor,
    bundle: pki.WorkerBundle,
    identity: TLSIdentity,
    server: PolicyOptions,
    health: PinnedClient,
) -> list[IdentityWatcher]:
    """Renewed certificates picked up without a restart (``decnet-admin renew``).

    The updater's own: its API and its probe of the agent present it.  The
    agent's (``worker``): the probe pins the new one once the agent shows it.
    """

    def repin_agent(new: TLSIdentity) -> None:
        health.reload(accept=attrs.evolve(health.accept, fingerprint=new.identity.fingerprint))

    def own(new: TLSIdentity) -> None:
        health.reload(identity=new)

    worker = pki.load_cert(bundle.cert_path(config.ROLE_WORKER))
    worker_identity = attrs.evolve(identity, cert=worker, identity=pki.identity_of(worker))
    return [
        IdentityWatcher(
            reactor, BundleIdentity(bundle, config.ROLE_UPDATER, identity), [server.reload, own]
        ),
        IdentityWatcher(
            reactor,
            BundleIdentity(bundle, config.ROLE_WORKER, worker_identity, certificate_only=True),
            [repin_agent],
        ),
    ]


class UpdaterService(service.MultiService):
    """Everything ``twistd decnet-updater`` runs.

    Listens (a failed bind stops twistd), then reconciles the release store and serves.
    """

    log = Logger()

    def __init__(
        self,
        reactor: IDecnetReactor,
        *,
        bundle: pki.WorkerBundle,
        identity: TLSIdentity,
        listen: str,
        install_dir: Path,
        agent: LocalAgent,
        port_file: Path | None = None,
        health_timeout: float = config.DEFAULT_HEALTH_TIMEOUT,
        keep: int = config.DEFAULT_KEEP_RELEASES,
        install_timeout: float = config.DEFAULT_INSTALL_TIMEOUT,
        compile_bytecode: bool = True,
        max_upload: int = config.MAX_UPLOAD_BYTES,
        restart: str = "exit",
    ):
        super().__init__()
        self.reactor = reactor
        to_thread = pool_runner(IReactorThreads(reactor))
        health = agent_health_client(reactor, identity, bundle, agent)
        self.updater = Updater(
            clock=reactor,
            store=ReleaseStore(install_dir),
            self_store=ReleaseStore(install_dir / config.UPDATER_SELF_DIR),
            installer=Installer(
                reactor,
                timeout=install_timeout,
                compile_bytecode=compile_bytecode,
                to_thread=to_thread,
            ),
            agent=agent_control(reactor, bundle, agent),
            probe=HealthProbe(reactor, health),
            to_thread=to_thread,
            health_timeout=health_timeout,
            keep=keep,
            limits=archive.Limits(),
            restart_self=self_restart(restart, IReactorCore(reactor)),
        )
        master, local = accepted_peers(bundle)
        tls_options = PolicyOptions(identity, PeerPolicy([master, *local]))
        self.watchers = identity_watchers(reactor, bundle, identity, tls_options, health)
        for watcher in self.watchers:
            watcher.setServiceParent(self)
        renewer = Renewer(
            bundle, serial_runner(reactor), [watcher.check for watcher in self.watchers]
        )
        site = make_site(
            build_app(
                self.updater,
                master=master,
                local=local,
                bundle_dir=bundle.directory,
                run=to_thread,
                renewer=renewer,
                stop_forwarder=self.updater.agent.stop_companions,
            ).resource(),
            limits=upload_limits(master, max_upload),
            reactor=reactor,
        )
        self.port_service = TLSPortService(
            reactor,
            listen,
            tls_options,
            site,
            port_file=port_file,
            label="the master",
        )
        self.port_service.setServiceParent(self)
        self.systemd = SystemdService(reactor)
        self.systemd.setServiceParent(self)

    @property
    def port(self):
        return self.port_service.port

    def startService(self) -> None:
        super().startService()
        d = defer.ensureDeferred(self.updater.start())
        d.addCallbacks(self._started, self._start_failed)

    def _started(self, _: object) -> None:
        self.systemd.ready(f"serving on {self.port_service.description}")

    def _start_failed(self, failure: Failure) -> None:
        self.log.failure("The updater could not start; stopping", failure)
        core = IReactorCore(self.reactor)
        if core.running:
            core.stop()

    async def _stop(self) -> None:
        await defer.maybeDeferred(self.port_service.stopService)
        await self.updater.stop()
        await super().stopService()

    def stopService(self) -> defer.Deferred:
        return defer.ensureDeferred(self._stop())
