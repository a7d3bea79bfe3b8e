"""``twistd decnet-updater``: options and service construction.

::

    twistd --nodaemon --pidfile= decnet-updater --bundle DIR --install-dir DIR \\
        [--listen tcp:8766:interface=0.0.0.0] [--agent-url https://127.0.0.1:8765] \\
        [--agent-control systemd|spawn] [--health-timeout 30] [--keep 3] [--port-file FILE]

The bundle must hold the updater identity (``decnet-admin enroll --updater``).
The service and its restart policy live in :mod:`decnet.updater.service`.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, cast

from hyperlink import URL
from twisted.application.service import IService
from twisted.python import usage

from decnet import config, pki
from decnet.daemon import PORT_FILE_OPTION, DaemonOptions, keywords, load_bundle
from decnet.errors import DecnetError
from decnet.interfaces import IDecnetReactor
from decnet.metrics import attach_metrics, metrics_epilog, metrics_options
from decnet.options import positive_float, positive_int
from decnet.updater.service import SELF_RESTARTS, LocalAgent


def _settle_renewal(directory: str | None) -> None:
    """Finish a certificate renewal a crash cut short, before the bundle is read (start-up)."""
    if not directory:
        return
    from decnet.pki import WorkerBundle
    from decnet.updater import renewal

    try:
        renewal.settle(WorkerBundle.load(directory))
    except (DecnetError, OSError):
        pass  # load_bundle() names what is wrong with the bundle


class Options(DaemonOptions):
    endpoint_options = ("listen",)
    synopsis = "--bundle DIR --install-dir DIR [options]"
    longdesc = (
        "The DECNET updater: owns the agent's release directory, installs releases the "
        "master pushes over mutual TLS, and rolls back when a new release is not healthy. "
        "It accepts only the master certificate whose fingerprint is pinned in the bundle "
        "(every route), and this host's own worker and updater certificates (GET /health). "
        "It keeps no revocation list: the master's revoked.json never reaches workers, and "
        "for the master the pin is stricter. See docs/Security.md.  " + metrics_epilog("updater")
    )
    optParameters: ClassVar[list] = [
        ["bundle", None, None, "worker bundle directory (needs updater.crt and updater.key)"],
        ["listen", None, f"tcp:{config.UPDATER_PORT}:interface=0.0.0.0", "endpoint to listen on"],
        ["install-dir", None, config.DEFAULT_INSTALL_DIR, "the release directory it owns"],
        ["agent-url", None, config.DEFAULT_AGENT_URL, "where the local agent answers /health"],
        ["agent-control", None, "systemd", "how to restart the agent: systemd or spawn"],
        ["agent-unit", None, config.DEFAULT_AGENT_UNIT, "systemd unit of the agent"],
        [
            "forwarder-unit",
            None,
            config.DEFAULT_FORWARDER_UNIT,
            "systemd: the forwarder's unit, started once a release is current and healthy "
            "(it runs from that release); '' for none",
        ],
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
        PORT_FILE_OPTION,
        *metrics_options("updater"),
    ]
    optFlags: ClassVar[list] = [
        ["no-compile", None, "do not byte-compile release venvs (faster installs)"]
    ]

    def postOptions(self) -> None:
        _settle_renewal(self["bundle"])
        load_bundle(
            self,
            config.ROLE_UPDATER,
            required="--bundle DIR is required (the enrolled worker bundle)",
        )
        if self["agent-control"] not in config.AGENT_CONTROLS:
            raise usage.UsageError(
                f"--agent-control must be one of {', '.join(config.AGENT_CONTROLS)}"
            )
        if self["self-restart"] is None:
            self["self-restart"] = "exit" if self["agent-control"] == "systemd" else "exec"
        if self["self-restart"] not in SELF_RESTARTS:
            raise usage.UsageError(f"--self-restart must be one of {', '.join(SELF_RESTARTS)}")
        self["agent-host"], self["agent-port"] = agent_address(self["agent-url"])
        self["install-dir"] = str(Path(self["install-dir"]).absolute())
        # The agent runs from its release directory: a relative path must mean ours.
        for name in ("agent-state-dir", "agent-log-file", "agent-twistd-log"):
            if self[name]:
                self[name] = str(Path(self[name]).absolute())


def agent_address(text: str) -> tuple[str, int]:
    """``--agent-url``'s host and port: an ``https://`` URL whose host is an address."""
    try:
        url = URL.from_text(text)
    except ValueError:  # hyperlink's URLParseError
        raise usage.UsageError(f"--agent-url {text!r} is not a URL") from None
    if url.scheme != "https" or not url.host:
        raise usage.UsageError("--agent-url must be https://HOST:PORT")
    try:
        pki.parse_address(url.host)  # hyperlink keeps a CR or LF inside the host
    except DecnetError as exc:
        raise usage.UsageError(f"--agent-url: {exc}") from None
    return url.host, url.port or config.AGENT_PORT


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from decnet.release import pin_running_release
    from decnet.updater.metrics import updater_registry
    from decnet.updater.service import UpdaterService

    pin_running_release()  # our own release: update-self's prune keeps it while we run
    typed = cast(IDecnetReactor, reactor)  # (the global reactor provides them all)
    service = UpdaterService(
        typed,
        bundle=options["bundle-obj"],
        install_dir=Path(options["install-dir"]),
        agent=LocalAgent(
            host=options["agent-host"],
            port=options["agent-port"],
            control=options["agent-control"],
            unit=options["agent-unit"],
            state_dir=options["agent-state-dir"],
            log_file=options["agent-log-file"],
            twistd_log=options["agent-twistd-log"],
            forwarder_unit=options["forwarder-unit"],
        ),
        compile_bytecode=not options["no-compile"],
        restart=options["self-restart"],
        **keywords(
            options, "identity listen port-file health-timeout keep install-timeout max-upload"
        ),
    )
    attach_metrics(
        service,
        reactor,
        options,
        lambda: updater_registry(service.updater, typed, options["identity"]),
    )
    return service
