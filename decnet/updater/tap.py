"""``twistd decnet-updater``: options, validation and the service tree.

::

    twistd --nodaemon --pidfile= decnet-updater --bundle DIR --install-dir DIR \\
        [--listen tcp:8766:interface=0.0.0.0] [--agent-url https://127.0.0.1:8765] \\
        [--agent-control systemd|spawn] [--health-timeout 30] [--keep 3]

The bundle must hold the updater identity (``decnet-admin enroll --updater``).
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import ClassVar

from hyperlink import URL
from twisted.application import service
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python import usage

from decnet import config, pki
from decnet.daemon import TLSPortService
from decnet.errors import DecnetError
from decnet.httpapi import make_site
from decnet.httpclient import PinnedClient
from decnet.options import positive_float, positive_int
from decnet.release import pin_running_release
from decnet.systemd import SystemdService
from decnet.tls import Accept, PeerPolicy, PolicyOptions, TLSIdentity
from decnet.updater import archive
from decnet.updater.agentctl import SpawnedAgent, SystemdAgent, agent_argv
from decnet.updater.app import build_app, upload_limits
from decnet.updater.engine import Updater
from decnet.updater.health import HealthProbe
from decnet.updater.installer import Installer
from decnet.updater.releases import ReleaseStore

SELF_RESTARTS = ("exec", "exit")


class Options(usage.Options):
    synopsis = "--bundle DIR --install-dir DIR [options]"
    longdesc = (
        "The DECNET updater: owns the agent's release directory, installs releases the "
        "master pushes over mutual TLS, and rolls back when a new release is not healthy. "
        "It accepts only the master certificate whose fingerprint is pinned in the bundle "
        "(every route), and this host's own worker and updater certificates (GET /health). "
        "It keeps no revocation list: the master's revoked.json never reaches workers, and "
        "for the master the pin is stricter. See docs/Security.md."
    )
    optParameters: ClassVar[list] = [
        ["bundle", None, None, "worker bundle directory (needs updater.crt and updater.key)"],
        ["listen", None, f"tcp:{config.UPDATER_PORT}:interface=0.0.0.0", "endpoint to listen on"],
        ["install-dir", None, config.DEFAULT_INSTALL_DIR, "the release directory it owns"],
        ["agent-url", None, config.DEFAULT_AGENT_URL, "where the local agent answers /health"],
        ["agent-control", None, "systemd", "how to restart the agent: systemd or spawn"],
        ["agent-unit", None, config.DEFAULT_AGENT_UNIT, "systemd unit of the agent"],
        ["agent-state-dir", None, None, "spawn: the agent's --state-dir"],
        ["agent-log-file", None, None, "spawn: the agent's --log-file"],
        [
            "agent-twistd-log",
            None,
            None,
            "spawn: the agent's own twistd log file (default: its output, kept by the updater)",
        ],
        [
            "health-timeout",
            None,
            config.DEFAULT_HEALTH_TIMEOUT,
            "seconds for a restarted agent to report the new release",
            positive_float,
        ],
        ["keep", None, config.DEFAULT_KEEP_RELEASES, "releases to keep", positive_int],
        [
            "install-timeout",
            None,
            config.DEFAULT_INSTALL_TIMEOUT,
            "seconds for venv + pip of one release",
            positive_float,
        ],
        [
            "max-upload",
            None,
            config.MAX_UPLOAD_BYTES,
            "largest tarball accepted, in bytes",
            positive_int,
        ],
        [
            "self-restart",
            None,
            None,
            "after update-self: exec (re-execute in place) or exit (let systemd restart us); "
            "default: exit with --agent-control systemd, exec with spawn",
        ],
    ]
    optFlags: ClassVar[list] = [
        ["no-compile", None, "do not byte-compile release venvs (faster installs)"]
    ]

    def postOptions(self):
        if not self["bundle"]:
            raise usage.UsageError("--bundle DIR is required (the enrolled worker bundle)")
        try:
            bundle = pki.WorkerBundle.load(self["bundle"])
        except DecnetError as exc:
            raise usage.UsageError(str(exc)) from None
        role = config.ROLE_UPDATER
        missing = [p for p in (bundle.cert_path(role), bundle.key_path(role)) if not p.exists()]
        if missing:
            raise usage.UsageError(
                f"the bundle has no updater identity ({', '.join(p.name for p in missing)} "
                "missing); enroll the host with `decnet-admin enroll --updater`"
            )
        self["bundle_obj"] = bundle
        if self["agent-control"] not in config.AGENT_CONTROLS:
            raise usage.UsageError(
                f"--agent-control must be one of {', '.join(config.AGENT_CONTROLS)}"
            )
        if self["self-restart"] is None:
            self["self-restart"] = "exit" if self["agent-control"] == "systemd" else "exec"
        if self["self-restart"] not in SELF_RESTARTS:
            raise usage.UsageError(f"--self-restart must be one of {', '.join(SELF_RESTARTS)}")
        try:
            url = URL.from_text(self["agent-url"])
        except Exception:
            raise usage.UsageError(f"--agent-url {self['agent-url']!r} is not a URL") from None
        if url.scheme != "https" or not url.host:
            raise usage.UsageError("--agent-url must be https://HOST:PORT")
        try:
            pki.parse_address(url.host)  # hyperlink keeps a CR or LF inside the host
        except DecnetError as exc:
            raise usage.UsageError(f"--agent-url: {exc}") from None
        self["agent_host"] = url.host
        self["agent_port"] = url.port or config.AGENT_PORT
        self["install-dir"] = str(Path(self["install-dir"]).absolute())


class UpdaterService(service.MultiService):
    """Listens (a failed bind stops twistd), then reconciles the release store and serves."""

    log = Logger()

    def __init__(self, reactor, updater: Updater, listen: str, options: PolicyOptions, site):
        super().__init__()
        self.reactor = reactor
        self.updater = updater
        self.port_service = TLSPortService(reactor, listen, options, site, label="the master")
        self.port_service.setServiceParent(self)
        self.systemd = SystemdService(reactor)
        self.systemd.setServiceParent(self)

    @property
    def port(self):
        return self.port_service.port

    def startService(self):
        super().startService()
        d = defer.ensureDeferred(self.updater.start())
        d.addCallbacks(self._started, self._start_failed)

    def _started(self, _):
        self.systemd.ready(f"serving on {self.port_service.description}")

    def _start_failed(self, failure):
        self.log.failure("The updater could not start; stopping", failure)
        if self.reactor.running:
            self.reactor.stop()

    async def _stop(self):
        await self.port_service.stopService()
        await self.updater.stop()
        await super().stopService()

    def stopService(self):
        return defer.ensureDeferred(self._stop())


def exec_restart(release_dir: Path) -> None:
    """Replace this process with twistd from ``release_dir``'s venv, same arguments."""
    twistd = str(Path(release_dir) / config.RELEASE_VENV_DIR / "bin" / "twistd")
    os.execv(twistd, [twistd, *sys.argv[1:]])  # noqa: S606 - fixed path, our own argv


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor

    pin_running_release()  # our own release: update-self's prune keeps it while we run
    bundle: pki.WorkerBundle = options["bundle_obj"]
    identity = TLSIdentity.from_bundle(bundle, config.ROLE_UPDATER)
    master = Accept(config.ROLE_MASTER, cn=config.MASTER_CN, fingerprint=bundle.master_fingerprint)
    local = (
        Accept(config.ROLE_WORKER, cn=bundle.name),
        Accept(config.ROLE_UPDATER, cn=config.UPDATER_CN_PREFIX + bundle.name),
    )
    tls_options = PolicyOptions(identity, PeerPolicy([master, *local]))

    worker_fp = pki.fingerprint(pki.load_cert(bundle.cert_path(config.ROLE_WORKER)))
    host, port = options["agent_host"], options["agent_port"]
    agent_client = PinnedClient(
        reactor,
        identity,
        address=host,
        port=port,
        accept=Accept(config.ROLE_WORKER, cn=bundle.name, fingerprint=worker_fp),
        timeout=5.0,
        # One connection per agent process (the pool drops it when the agent
        # restarts) instead of a handshake, and two log lines, per probe.
        persistent=True,
    )
    if options["agent-control"] == "spawn":
        interface = host.replace(":", "\\:")
        agent = SpawnedAgent(
            reactor,
            functools.partial(
                agent_argv,
                bundle=str(bundle.directory),
                listen=f"tcp:{port}:interface={interface}",
                state_dir=options["agent-state-dir"],
                log_file=options["agent-log-file"],
                twistd_log=options["agent-twistd-log"],
            ),
        )
    else:
        agent = SystemdAgent(reactor, options["agent-unit"])

    install_dir = Path(options["install-dir"])
    pool = reactor.getThreadPool()
    updater = Updater(
        clock=reactor,
        store=ReleaseStore(install_dir),
        self_store=ReleaseStore(install_dir / config.UPDATER_SELF_DIR),
        installer=Installer(
            reactor,
            timeout=options["install-timeout"],
            compile_bytecode=not options["no-compile"],
        ),
        agent=agent,
        probe=HealthProbe(reactor, agent_client),
        to_thread=lambda f, *a, **kw: deferToThreadPool(reactor, pool, f, *a, **kw),
        health_timeout=options["health-timeout"],
        keep=options["keep"],
        limits=archive.Limits(),
        restart_self=exec_restart if options["self-restart"] == "exec" else _exit_restart(reactor),
    )
    site = make_site(
        build_app(updater, master=master, local=local).resource(),
        limits=upload_limits(master, options["max-upload"]),
        reactor=reactor,
    )
    return UpdaterService(reactor, updater, options["listen"], tls_options, site)


def _exit_restart(reactor):
    def restart(release_dir: Path) -> None:
        Logger(namespace="decnet.updater").info(
            "Exiting so that systemd restarts the updater on {release}", release=release_dir.name
        )
        reactor.stop()

    return restart
