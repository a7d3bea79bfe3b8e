"""``twistd decnet-listener``: options and service construction."""

from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar

from twisted.application.service import IService
from twisted.python import usage

from decnet import config
from decnet.daemon import PORT_FILE_OPTION, DaemonOptions, absolute_path, keywords
from decnet.errors import DecnetError
from decnet.listener import admission, ingest, publishing
from decnet.listener.publisherproc import NatsOptions
from decnet.metrics import attach_metrics, metrics_epilog, metrics_options
from decnet.options import between, positive_float, positive_int
from decnet.revocation import RevocationSet
from decnet.tls import TLSIdentity

# A --publish server: nats:// or tls:// (user:password@ allowed), a host and a port.
NATS_URL_RE = re.compile(r"(nats|tls)://([^\s/@]+@)?[A-Za-z0-9.:\[\]_-]+:[0-9]{1,5}")
# The longest handshake deadline accepted: beyond it, slow sockets are a budget leak again.
MAX_HANDSHAKE_TIMEOUT = 300.0


# How to reach the broker: the listener's --publish and decnet-sink's --nats share these.
NATS_CLIENT_OPTIONS: list[list] = [
    ["nats-creds", None, None, "NATS credentials file (JWT and NKey seed)", absolute_path],
    ["nats-tls-ca", None, None, "CA certificate(s) of the broker (TLS to NATS)", absolute_path],
    ["nats-tls-cert", None, None, "Our client certificate for the broker", absolute_path],
    ["nats-tls-key", None, None, "Its private key", absolute_path],
    [
        "nats-stream",
        None,
        publishing.DEFAULT_STREAM,
        "JetStream stream (created when absent; never changed when present)",
    ],
]


class Options(DaemonOptions):
    endpoint_options = ("listen",)
    synopsis = "[options]"
    longdesc = (
        "Receive worker logs over mutual TLS (RFC 5425; acknowledged mode via ALPN "
        f"{config.ACK_ALPN.decode()}) and ingest them: a byte-exact mirror and a JSON "
        "lines feed per worker and stream.  See docs/Logging.md.  With --publish, every "
        "committed batch and event also goes into NATS JetStream, and forwarders are "
        "acknowledged once JetStream stored their data (docs/Scale-Out.md).  Example: "
        "twistd -n decnet-listener --publish nats://10.0.0.5:4222,nats://10.0.0.6:4222 "
        "--nats-tls-ca /var/lib/decnet-master/listener/nats-ca.pem "
        "--nats-creds /var/lib/decnet-master/listener/nats.creds "
        "--nats-replicas 3" + "  " + metrics_epilog("listener")
    )
    optParameters: ClassVar[list] = [
        [
            "listen",
            None,
            None,
            "Endpoint string to listen on "
            f"[default: tcp:${config.ENV_SYSLOG_PORT} or {config.SYSLOG_PORT}"
            f":interface={config.DEFAULT_LISTEN_INTERFACE}:backlog={admission.LISTEN_BACKLOG}]",
        ],
        [
            "home",
            None,
            None,
            "Master state directory (the listener reads <home>/listener: CA certificate, "
            "its identity, revocations) "
            f"[default: ${config.ENV_HOME} or {config.DEFAULT_HOME}]",
        ],
        ["ingest-dir", None, None, "Where mirrors and feeds go [default: <home>/ingest]"],
        [
            "max-frame",
            None,
            config.DEFAULT_MAX_FRAME,
            "Largest frame accepted (bytes)",
            positive_int,
        ],
        [
            "max-connections",
            None,
            config.DEFAULT_MAX_CONNECTIONS,
            "Authenticated connections open at once, all workers together",
            positive_int,
        ],
        [
            "max-connections-per-worker",
            None,
            config.DEFAULT_MAX_CONNECTIONS_PER_WORKER,
            "Connections open at once per worker certificate",
            positive_int,
        ],
        [
            "max-unauthenticated",
            None,
            admission.DEFAULT_MAX_UNAUTHENTICATED,
            "Connections still in their TLS handshake, all sources together; when full, "
            "a new one evicts the oldest, sparing addresses workers recently authenticated from",
            positive_int,
        ],
        [
            "max-unauthenticated-per-address",
            None,
            admission.DEFAULT_MAX_UNAUTHENTICATED_PER_ADDRESS,
            "Connections still in their TLS handshake from one source address "
            "(IPv6: one /64); more are refused before TLS",
            positive_int,
        ],
        [
            "handshake-timeout",
            None,
            admission.DEFAULT_HANDSHAKE_TIMEOUT,
            "Seconds a connection gets for its whole TLS handshake "
            f"(at most {MAX_HANDSHAKE_TIMEOUT:g})",
            between(float, 1, MAX_HANDSHAKE_TIMEOUT),
        ],
        [
            "idle-timeout",
            None,
            config.DEFAULT_IDLE_TIMEOUT,
            "Seconds an authenticated connection may stall before HELLO or mid-frame",
            positive_float,
        ],
        [
            "max-streams-per-worker",
            None,
            ingest.DEFAULT_MAX_STREAMS_PER_WORKER,
            "Streams one worker may have (those already on disk count; they stay usable); "
            "a HELLO for one more gets ERROR",
            positive_int,
        ],
        [
            "max-open-streams",
            None,
            ingest.DEFAULT_MAX_OPEN_STREAMS,
            "Streams whose files stay open at once, in the listener and in the feed process "
            "(least recently used closed first, reopened when needed)",
            positive_int,
        ],
        PORT_FILE_OPTION,
        *metrics_options("listener"),
        [
            "publish",
            None,
            None,
            "Publish every committed batch and event into NATS JetStream: "
            "nats://HOST:PORT[,nats://HOST:PORT...] (see docs/Scale-Out.md)",
        ],
        *NATS_CLIENT_OPTIONS,
        ["nats-replicas", None, 1, "Replicas of a stream we create (1-5)", between(int, 1, 5)],
        [
            "nats-max-msg",
            None,
            publishing.DEFAULT_MAX_MSG,
            "Largest message published (bytes, headers included); at most the "
            "broker's max_payload, at least --max-frame plus 1 KiB",
            positive_int,
        ],
        [
            "ack-after",
            None,
            None,
            "When a forwarder's batch is acknowledged: 'local' (durable here) or 'broker' "
            "(stored by JetStream too) [default: broker with --publish, local without]",
        ],
        [
            "feed-encoders",
            None,
            None,
            "Processes that encode the JSON feed in parallel "
            "[default: one per two CPUs, at most 4; 1 = no pool]",
            positive_int,
        ],
    ]
    optFlags: ClassVar[list] = [
        ["no-feed", None, "Do not build the JSON feed (mirror only)"],
    ]

    def postOptions(self) -> None:
        try:
            self._load_home()
        except DecnetError as exc:
            raise usage.UsageError(str(exc)) from None
        if self["max-frame"] < 512:
            raise usage.UsageError("--max-frame must be at least 512 bytes")
        if self["max-unauthenticated-per-address"] > self["max-unauthenticated"]:
            raise usage.UsageError(
                "--max-unauthenticated-per-address cannot exceed --max-unauthenticated "
                f"({self['max-unauthenticated']})"
            )
        self["publish-options"] = publish_options(self)
        self["ack-after"] = ack_mode(self["ack-after"], self["publish-options"] is not None)

    def _load_home(self) -> None:
        """Everything read from the master's home: identity and revocations (once, here)."""
        if self["listen"] is None:
            self["listen"] = (
                f"tcp:{config.syslog_port()}:interface={config.DEFAULT_LISTEN_INTERFACE}"
                f":backlog={admission.LISTEN_BACKLOG}"
            )
        paths = config.MasterPaths.resolve(self["home"])
        self["paths"] = paths
        self["identity"] = load_listener_identity(paths)
        self["revocations"] = RevocationSet(paths.revocations)
        self["ingest-dir"] = (
            Path(self["ingest-dir"]).absolute() if self["ingest-dir"] else paths.ingest_dir
        )


def nats_client(options: usage.Options, flag: str) -> dict:
    """``--FLAG URL[,URL]`` and the ``--nats-*`` client options, checked, as keywords.

    ``servers``, ``creds``, ``tls_ca``, ``tls_cert``, ``tls_key``, ``stream``
    (of :class:`NatsOptions`); ``{}`` when ``--FLAG`` is not given.
    """
    nats_given = [
        name
        for name in ("nats-creds", "nats-tls-ca", "nats-tls-cert", "nats-tls-key")
        if options[name]
    ]
    if not options[flag]:
        if nats_given:
            raise usage.UsageError(f"--{nats_given[0]} needs --{flag}")
        return {}
    servers = tuple(s.strip() for s in options[flag].split(",") if s.strip())
    for server in servers:
        if not NATS_URL_RE.fullmatch(server):
            raise usage.UsageError(
                f"--{flag}: {server!r} is not nats://HOST:PORT (or tls://HOST:PORT); "
                "separate several with commas"
            )
    for name in nats_given:
        if not Path(options[name]).is_file():
            raise usage.UsageError(f"--{name} {options[name]}: no such file")
    if options["nats-creds"]:
        _check_creds(options["nats-creds"])
    if bool(options["nats-tls-cert"]) != bool(options["nats-tls-key"]):
        raise usage.UsageError("--nats-tls-cert and --nats-tls-key go together")
    if not publishing.STREAM_NAME_RE.fullmatch(options["nats-stream"]):
        raise usage.UsageError("--nats-stream: 1-64 characters of A-Z, a-z, 0-9, '_', '-'")
    names = "creds tls-ca tls-cert tls-key stream"
    given = {name.replace("-", "_"): options[f"nats-{name}"] for name in names.split()}
    return {"servers": servers, **given}


def _check_creds(path: str) -> None:
    """A ``--nats-creds`` file that cannot be one is a usage error (never quoted: a secret)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")[: 1 << 16]
    except OSError as exc:
        raise usage.UsageError(f"--nats-creds {path}: cannot read it: {exc.strerror}") from None
    problem = publishing.creds_problem(text)
    if problem is not None:
        raise usage.UsageError(f"--nats-creds {path} is not a NATS credentials file: {problem}")


def publish_options(options: usage.Options) -> NatsOptions | None:
    """The ``--publish``/``--nats-*`` options as one value (``None`` without ``--publish``)."""
    client = nats_client(options, "publish")
    if not client:
        return None
    if options["nats-max-msg"] < options["max-frame"] + publishing.HEADER_ROOM:
        raise usage.UsageError(
            f"--nats-max-msg {options['nats-max-msg']} must be at least --max-frame plus "
            f"{publishing.HEADER_ROOM} ({options['max-frame'] + publishing.HEADER_ROOM}): "
            "a whole line must fit in one message"
        )
    return NatsOptions(
        events=not options["no-feed"],
        replicas=options["nats-replicas"],
        max_msg=options["nats-max-msg"],
        **client,
    )


def ack_mode(value: str | None, publishing_on: bool) -> str:
    """``--ack-after``: its default follows ``--publish``; ``broker`` needs it."""
    if value is None:
        return "broker" if publishing_on else "local"
    if value not in ("local", "broker"):
        raise usage.UsageError(f"--ack-after is 'local' or 'broker', not {value!r}")
    if value == "broker" and not publishing_on:
        raise usage.UsageError("--ack-after broker needs --publish (there is no broker)")
    return value


def load_listener_identity(paths: config.MasterPaths) -> TLSIdentity:
    """The listener's own identity under ``<home>/listener``; a missing file is a usage error.

    Its own key, never the master's: agents and updaters would obey that one.
    """
    for path, what in (
        (paths.listener_cert, "listener certificate"),
        (paths.listener_key, "listener private key"),
        (paths.listener_ca_cert, "CA certificate"),
    ):
        if not path.is_file():
            raise usage.UsageError(
                f"{what} not found: {path} (run `decnet-admin init --home {paths.home}`; "
                "the listener needs its identity in <home>/listener)"
            )
    return TLSIdentity.load(paths.listener_cert, paths.listener_key, paths.listener_ca_cert)


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from decnet.listener.metrics import listener_registry
    from decnet.listener.protocol import ConnectionLimits
    from decnet.listener.service import ListenerService, raise_nofile_limit

    raise_nofile_limit()
    limits = ConnectionLimits(
        max_per_worker=options["max-connections-per-worker"],
        **keywords(
            options,
            "max-frame max-connections idle-timeout max-unauthenticated "
            "max-unauthenticated-per-address handshake-timeout",
        ),
    )
    service = ListenerService(
        reactor,
        limits=limits,
        feed=not options["no-feed"],
        publish=options["publish-options"],
        ack_after=options["ack-after"],
        sighup=True,
        **keywords(
            options,
            "identity revocations ingest-dir listen port-file max-streams-per-worker "
            "max-open-streams feed-encoders",
        ),
    )
    attach_metrics(
        service,
        reactor,
        options,
        lambda: listener_registry(service.factory, service.ingest, reactor, options["identity"]),
    )
    return service
