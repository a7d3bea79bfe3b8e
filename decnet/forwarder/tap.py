"""``twistd decnet-forwarder``: options and service construction."""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

from twisted.python import usage

from decnet import config
from decnet.errors import ConfigError, DecnetError
from decnet.options import port_number, positive_float
from decnet.syslog.ackproto import ProtocolError, validate_stream_name


class Options(usage.Options):
    synopsis = "--bundle DIR [options]"
    longdesc = (
        "Tail the worker's RFC 5424 log and ship it to the master over mutual TLS: "
        "acknowledged, exactly-once delivery with our listener (ALPN "
        f"{config.ACK_ALPN.decode()}), plain RFC 5425 with a stock receiver.  "
        "See docs/Logging.md."
    )
    optParameters: ClassVar[list] = [
        ["bundle", None, None, "Enrollment bundle directory (from `decnet-admin enroll`)"],
        ["log-file", None, config.DEFAULT_LOG_FILE, "The log file to ship"],
        [
            "master-host",
            None,
            None,
            f"Master address [default: ${config.ENV_MASTER_HOST}, else the bundle's]",
        ],
        [
            "master-port",
            None,
            None,
            f"Listener port [default: ${config.ENV_SYSLOG_PORT}, else {config.SYSLOG_PORT}]",
            port_number,
        ],
        [
            "state",
            None,
            None,
            "SQLite offsets file "
            f"[default: {config.WORKER_STATE_DIR}/{config.FORWARDER_STATE_FILE}]",
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
    ]

    def postOptions(self):
        if not self["bundle"]:
            raise usage.UsageError(
                "--bundle is required (the directory `decnet-admin enroll` wrote)"
            )
        if self["mode"] not in ("auto", "ack", "plain"):
            raise usage.UsageError("--mode must be auto, ack or plain")
        try:
            validate_stream_name(self["stream"])
        except ProtocolError as exc:
            raise usage.UsageError(str(exc)) from None
        if self["stream"] == config.PLAIN_STREAM:
            raise usage.UsageError(
                f"--stream {config.PLAIN_STREAM} is reserved for plain RFC 5425 senders"
            )
        if self["max-line"] < 256:
            raise usage.UsageError("--max-line must be at least 256 bytes")
        from decnet import pki

        try:
            self["bundle-obj"] = pki.WorkerBundle.load(self["bundle"])
        except DecnetError as exc:
            raise usage.UsageError(f"cannot use the bundle: {exc}") from None
        bundle = self["bundle-obj"]
        self["master-host"] = (
            self["master-host"]
            or os.environ.get(config.ENV_MASTER_HOST, "").strip()
            or bundle.settings.get("master_host")
        )
        if not self["master-host"]:
            raise usage.UsageError(
                f"no master address: give --master-host or set ${config.ENV_MASTER_HOST}"
            )
        if self["master-port"] is None:
            try:
                default = int(bundle.settings.get("syslog_port") or config.SYSLOG_PORT)
                self["master-port"] = config.env_int(config.ENV_SYSLOG_PORT, default)
            except (ConfigError, ValueError) as exc:
                raise usage.UsageError(str(exc)) from None
        self["log-file"] = Path(self["log-file"]).absolute()
        self["state"] = Path(
            self["state"] or Path(config.WORKER_STATE_DIR) / config.FORWARDER_STATE_FILE
        ).absolute()


def makeService(options: Options):
    from twisted.internet import reactor

    from decnet.forwarder.service import ForwarderService
    from decnet.release import pin_running_release

    pin_running_release()  # the updater never prunes the release we run from
    from decnet.tls import TLSIdentity

    bundle = options["bundle-obj"]
    try:
        identity = TLSIdentity.from_bundle(bundle, config.ROLE_WORKER)
    except DecnetError as exc:
        raise usage.UsageError(str(exc)) from None
    return ForwarderService(
        reactor,
        identity=identity,
        master_host=options["master-host"],
        master_port=options["master-port"],
        master_fingerprint=bundle.listener_fingerprint,
        log_file=options["log-file"],
        state_file=options["state"],
        stream=options["stream"],
        mode=options["mode"],
        max_line=options["max-line"],
        poll_interval=options["poll-interval"],
        rotate_wait=options["rotate-wait"],
        max_retry_delay=options["max-retry-delay"],
    )
