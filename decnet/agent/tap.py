"""``twistd decnet-agent``: options and service construction.

    twistd decnet-agent --bundle DIR [--listen tcp:8765:interface=0.0.0.0]
        [--state-dir /var/lib/decnet/agent] [--log-file /var/log/decnet/decnet.log]
        [--port-file FILE] [--max-decoy-connections N]

An enrolled bundle is mandatory: the agent has no unauthenticated mode.
"""

from __future__ import annotations

from typing import ClassVar

from twisted.application.service import IService
from twisted.python import usage

from decnet import config
from decnet.agent.decoys.budget import (
    FD_RESERVE_MIN,
    default_connection_budget,
    fd_reserve,
    nofile_limit,
)
from decnet.agent.engine import ENGINES
from decnet.daemon import PORT_FILE_OPTION, DaemonOptions, keywords, load_bundle
from decnet.metrics import attach_metrics, metrics_epilog, metrics_options


class Options(DaemonOptions):
    endpoint_options = ("listen",)
    synopsis = "--bundle DIR [options]"
    longdesc = (
        "The DECNET worker agent: runs this worker's deckies and answers the master "
        "over mutual TLS (GET /health, GET /status, POST /deploy, POST /teardown). "
        "It accepts only the master certificate whose fingerprint is pinned in the bundle, "
        "and this host's own updater (GET /health). It keeps no revocation list: the "
        "master's revoked.json never reaches workers, and for the master the pin is "
        "stricter (a different master certificate is refused even if valid and unrevoked). "
        "See docs/Security.md.  " + metrics_epilog("agent")
    )
    optParameters: ClassVar[list] = [
        ["bundle", "b", None, "enrolled worker bundle directory (from `decnet-admin enroll`)"],
        [
            "listen",
            "l",
            None,
            "API endpoint (default: tcp:<agent_port from the bundle>:interface=0.0.0.0)",
        ],
        ["state-dir", "s", config.DEFAULT_AGENT_STATE_DIR, "desired state and SSH host keys"],
        [
            "log-file",
            None,
            config.DEFAULT_LOG_FILE,
            "RFC 5424 decoy event log (the forwarder ships it)",
        ],
        PORT_FILE_OPTION,
        ["engine", None, "builtin", f"decoy engine ({', '.join(ENGINES)})"],
        [
            "max-decoy-connections",
            None,
            None,
            "sockets all deckies together may hold (listeners + connections); more "
            "connections are refused. Default: the soft RLIMIT_NOFILE minus a reserve of "
            "RLIMIT_NOFILE/8 (at least 32, at most 512) for the API and the log; at most "
            "RLIMIT_NOFILE - 32",
        ],
        *metrics_options("agent"),
    ]

    def postOptions(self) -> None:
        bundle, _identity = load_bundle(
            self,
            config.ROLE_WORKER,
            required="--bundle is required: the agent only runs with an enrolled identity "
            "(create one with `decnet-admin enroll` on the master)",
        )
        if self["engine"] not in ENGINES:
            raise usage.UsageError(f"--engine must be one of: {', '.join(ENGINES)}")
        self["max-decoy-connections"] = decoy_budget(self["max-decoy-connections"], nofile_limit())
        if not self["listen"]:
            port = bundle.settings.get("agent_port", config.AGENT_PORT)
            self["listen"] = f"tcp:{port}:interface=0.0.0.0"


def decoy_budget(value: str | None, nofile: int) -> int:
    """``--max-decoy-connections`` checked against a soft ``RLIMIT_NOFILE`` of ``nofile``."""
    if value is None:
        if nofile <= FD_RESERVE_MIN:
            raise usage.UsageError(
                f"RLIMIT_NOFILE is {nofile}: too low to run decoys and keep "
                f"{fd_reserve(nofile)} descriptors for the API (raise LimitNOFILE=)"
            )
        return default_connection_budget(nofile)
    top = nofile - FD_RESERVE_MIN
    try:
        budget = int(value)
    except ValueError:
        budget = 0
    if not 1 <= budget <= top:
        raise usage.UsageError(
            f"--max-decoy-connections must be an integer from 1 to {max(1, top)}: "
            f"RLIMIT_NOFILE is {nofile} and {FD_RESERVE_MIN} descriptors stay for "
            f"the API and the log (got {value!r})"
        )
    return budget


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from decnet.agent.metrics import agent_registry
    from decnet.agent.service import AgentService
    from decnet.release import pin_running_release

    pin_running_release()  # the updater never prunes the release we run from
    service = AgentService(
        reactor,
        bundle=options["bundle-obj"],
        identity=options["identity"],
        **keywords(options, "listen port-file state-dir log-file engine max-decoy-connections"),
    )
    attach_metrics(service, reactor, options, lambda: agent_registry(service, options["identity"]))
    return service
