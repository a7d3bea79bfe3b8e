"""``twistd decnet-forwarder``: options and service construction."""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar, cast

from twisted.application.service import IService
from twisted.python import usage

from decnet import config
from decnet.daemon import DaemonOptions, keywords, load_bundle
from decnet.errors import ConfigError
from decnet.metrics import attach_metrics, metrics_epilog, metrics_options
from decnet.options import port_number, positive_float
from decnet.pki import WorkerBundle
from decnet.syslog.ackproto import ProtocolError, validate_stream_name


class Options(DaemonOptions):
    synopsis = "--bundle DIR [options]"
    longdesc = (
        "Tail the worker's RFC 5424 log and ship it to the master over mutual TLS: "
        "acknowledged, exactly-once delivery with our listener (ALPN "
        f"{config.ACK_ALPN.decode()}), plain RFC 5425 with a stock receiver.  "
        "A bundle listing several listeners ships to one chosen by rendezvous hashing of "
        "the worker's name, fails over to the next and returns after --return-after "
        "(docs/SWARM-Mode.md).  "
        "See docs/Logging.md.  " + metrics_epilog("forwarder")
    )
    optParameters: ClassVar[list] = [
        ["bundle", None, None, "Enrollment bundle directory (from `decnet-admin enroll`)"],
        ["log-file", None, config.DEFAULT_LOG_FILE, "The log file to ship"],
        [
            "master-host",
            None,
            None,
            f"Master address [default: ${config.ENV_MASTER_HOST}, else the bundle's "
            "listener list, else its master_host]",
        ],
        [
            "master-port",
            None,
            None,
            f"Listener port [default: ${config.ENV_SYSLOG_PORT}, else the bundle's "
            f"syslog_port, else {config.SYSLOG_PORT}]",
            port_number,
        ],
        [
            "state",
            None,
            None,
            f"SQLite offsets file [default: {config.DEFAULT_FORWARDER_STATE}]",
        ],
        [
            "mode",
            None,
            "auto",
            "auto (acknowledged if the receiver offers it, else plain), ack, or plain",
        ],
        ["stream", None, config.DEFAULT_STREAM, "Stream name (acknowledged mode)"],
        [
            "max-line",
            None,
            config.DEFAULT_MAX_LINE,
            "Longer lines are shipped truncated with a marker (bytes, LF included)",
            int,
        ],
        [
            "poll-interval",
            None,
            config.DEFAULT_POLL_INTERVAL,
            "Seconds between checks of the file (besides inotify)",
            positive_float,
        ],
        [
            "rotate-wait",
            None,
            5.0,
            "Seconds the old file must stay unchanged before an empty new file replaces it",
            positive_float,
        ],
        [
            "max-retry-delay",
            None,
            30.0,
            "Longest pause between reconnection attempts (s)",
            positive_float,
        ],
        [
            "return-after",
            None,
            config.DEFAULT_LISTENER_RETURN,
            "With several listeners in the bundle: seconds on another listener before "
            "going back to the preferred one",
            positive_float,
        ],
        [
            "bundle-check",
            None,
            config.DEFAULT_BUNDLE_CHECK,
            "Seconds between reads of the bundle's listener list (changed by `decnet-admin "
            "bundle refresh`; not with --master-host/--master-port)",
            positive_float,
        ],
        *metrics_options("forwarder"),
    ]

    def postOptions(self) -> None:
        bundle, _identity = load_bundle(
            self,
            config.ROLE_WORKER,
            required="--bundle is required (the directory `decnet-admin enroll` wrote)",
        )
        if self["mode"] not in ("auto", "ack", "plain"):
            raise usage.UsageError("--mode must be auto, ack or plain")
        self._check_stream()
        if self["max-line"] < 256:
            raise usage.UsageError("--max-line must be at least 256 bytes")
        self["listeners"] = self._listeners(bundle)
        self["log-file"] = Path(self["log-file"]).absolute()
        self["state"] = Path(self["state"] or config.DEFAULT_FORWARDER_STATE).absolute()

    def _check_stream(self) -> None:
        try:
            validate_stream_name(self["stream"])
        except ProtocolError as exc:
            raise usage.UsageError(str(exc)) from None
        if self["stream"] == config.PLAIN_STREAM:
            raise usage.UsageError(
                f"--stream {config.PLAIN_STREAM} is reserved for plain RFC 5425 senders"
            )

    def _listeners(self, bundle: WorkerBundle) -> list[tuple[str, int]]:
        """The bundle's listener list, unless the master's address is given explicitly
        (options or environment), which ships to that one listener as always."""
        explicit = (
            self["master-host"]
            or self["master-port"] is not None
            or os.environ.get(config.ENV_MASTER_HOST, "").strip()
            or os.environ.get(config.ENV_SYSLOG_PORT, "").strip()
        )
        if not explicit:
            # The bundle decides, and may change (``decnet-admin bundle refresh``).
            self["bundle-dir"] = bundle.directory
        if "listeners" in bundle.settings and not explicit:
            return bundle.listeners
        self["master-host"] = self._master_host(bundle)
        if self["master-port"] is None:
            self["master-port"] = self._master_port(bundle)
        return [(self["master-host"], self["master-port"])]

    def _master_host(self, bundle: WorkerBundle) -> str:
        host = (
            self["master-host"]
            or os.environ.get(config.ENV_MASTER_HOST, "").strip()
            or cast(str | None, bundle.settings.get("master_host"))
        )
        if not host:
            raise usage.UsageError(
                f"no master address: give --master-host or set ${config.ENV_MASTER_HOST}"
            )
        return host

    @staticmethod
    def _master_port(bundle: WorkerBundle) -> int:
        try:
            default = int(cast(int | str, bundle.settings.get("syslog_port") or config.SYSLOG_PORT))
            return config.env_int(config.ENV_SYSLOG_PORT, default)
        except (ConfigError, ValueError) as exc:
            raise usage.UsageError(str(exc)) from None


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from decnet.forwarder.metrics import forwarder_registry
    from decnet.forwarder.service import ForwarderService
    from decnet.release import pin_running_release

    pin_running_release()  # the updater never prunes the release we run from
    service = ForwarderService(
        reactor,
        identity=options["identity"],
        master_fingerprint=options["bundle-obj"].listener_fingerprint,
        state_file=options["state"],
        listeners=options["listeners"],
        bundle_dir=options.get("bundle-dir"),
        bundle=options["bundle-obj"],
        **keywords(
            options,
            "log-file stream mode max-line poll-interval rotate-wait max-retry-delay return-after",
        ),
    )
    attach_metrics(
        service, reactor, options, lambda: forwarder_registry(service, options["identity"])
    )
    return service
