"""Helpers for the log pipeline tests: in-memory listener harness, identities, lines."""

from __future__ import annotations

from pathlib import Path

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import connectedServerAndClient

from decnet import config
from decnet.listener.feedproc import InlineFeeds
from decnet.listener.ingest import Ingest
from decnet.listener.protocol import ConnectionLimits, ListenerFactory
from decnet.listener.service import listener_options
from decnet.syslog import ackproto
from decnet.syslog.framing import OctetCountingDecoder, encode_frame
from decnet.syslog.rfc5424 import format_message
from decnet.threads import inline_runner
from decnet.tls import Accept, PeerPolicy, PolicyOptions
from tests.support import RecordingProtocol

MASTER_ONLY = PeerPolicy([Accept(config.ROLE_MASTER)])


def syslog_line(i: int, host: str = "decoy-7", pad: int = 0) -> bytes:
    """A realistic RFC 5424 line (no LF) whose HOSTNAME is what a decoy claims."""
    return format_message(
        facility=4,
        severity=5,
        timestamp="2024-05-01T12:00:00.000001Z",
        hostname=host,
        app_name="sshd",
        procid="22",
        msgid="login",
        structured_data=[("decnet@55555", [("n", str(i)), ("src_ip", "203.0.113.9")])],
        msg=b"attempt %d" % i + b"x" * pad,
    )


class ClientApp(RecordingProtocol):
    """A test client speaking frames; collects decoded control messages."""

    def __init__(self):
        super().__init__()
        self.decoder = OctetCountingDecoder(strip_lf=False)
        self.messages = []

    def dataReceived(self, data):
        super().dataReceived(data)
        for frame in self.decoder.feed(data):
            self.messages.append(ackproto.decode(frame))

    def send(self, body: bytes) -> None:
        self.transport.write(encode_frame(body))


class ListenerHarness:
    """A ListenerFactory over real TLS contexts, joined to clients in memory (iosim)."""

    def __init__(self, directory: Path, master_identity, revocations=None, **factory_kw):
        self.clock = Clock()
        self.ingest = Ingest(directory, self.clock, inline_runner, feeds=InlineFeeds(directory))
        self.ingest.prepare()
        self.factory = ListenerFactory(self.ingest, self.clock, ConnectionLimits(**factory_kw))
        self.server_options = listener_options(master_identity, revocations)
        from decnet.tls import TLSServerFactory

        self.tls_factory = TLSServerFactory(self.server_options, self.factory, clock=self.clock)
        self._port = 40000

    def connect(self, identity, *, ack: bool = True, client_options=None):
        """A connected, handshaken client app and the pump joining it to the listener."""
        app = ClientApp()
        options = client_options or PolicyOptions(
            identity, MASTER_ONLY, acceptable_protocols=[config.ACK_ALPN] if ack else None
        )
        client_factory = TLSMemoryBIOFactory(
            options, True, Factory.forProtocol(lambda: app), clock=self.clock
        )
        self._port += 1
        addr = IPv4Address("TCP", "127.0.0.1", self._port)
        _client, server, pump = connectedServerAndClient(
            lambda: self.tls_factory.buildProtocol(addr),
            lambda: client_factory.buildProtocol(None),
            greet=False,
            clock=self.clock,
        )
        pump.flush()
        app.server = server
        return app, pump

    def mirror(self, worker: str, stream: str) -> bytes:
        path = self.ingest.directory / worker / f"{stream}.log"
        return path.read_bytes() if path.exists() else b""

    def hello(self, identity, stream: str = "decnet"):
        app, pump = self.connect(identity)
        app.send(ackproto.encode_hello(stream))
        pump.flush()
        return app, pump


class LogCapture:
    """Collects twisted.logger events (warnings and above by default)."""

    def __init__(self, levels=(LogLevel.warn, LogLevel.error, LogLevel.critical)):
        self.levels = levels
        self.events = []

    def __call__(self, event):
        if event.get("log_level") in self.levels:
            self.events.append(event)

    def __enter__(self):
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc):
        globalLogPublisher.removeObserver(self)

    def reasons(self) -> list[str]:
        return [str(e.get("reason", "")) for e in self.events]

    def text(self) -> str:
        from twisted.logger import formatEvent

        return "\n".join(formatEvent(e) for e in self.events)


# -- subprocesses -------------------------------------------------------------

TWISTD = str(Path(__import__("sys").executable).parent / "twistd")


def run_twistd(plugin: str, args, log_path: Path):
    """Start ``twistd --nodaemon --pidfile= <plugin> args`` with its log in ``log_path``."""
    import subprocess

    return subprocess.Popen(
        [TWISTD, "--nodaemon", "--pidfile=", "-l", str(log_path), plugin, *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def start_listener(home, ingest: Path, log_path: Path, port: int = 0, extra=()):
    """A real ``twistd decnet-listener`` on 127.0.0.1; returns (process, port)."""
    from tests.support import wait_for

    port_file = ingest.parent / f"port-{log_path.stem}"
    port_file.unlink(missing_ok=True)
    proc = run_twistd(
        "decnet-listener",
        [
            "--home",
            home,
            "--ingest-dir",
            ingest,
            "--port-file",
            port_file,
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            *extra,
        ],
        log_path,
    )

    def bound():
        if proc.poll() is not None:
            raise AssertionError(f"listener exited: {proc.stderr.read().decode()[-2000:]}")
        return port_file.exists() and port_file.read_text().strip()

    return proc, int(wait_for(bound, what="the listener to bind"))


def start_forwarder(bundle, log_file: Path, state: Path, port: int, log_path: Path, extra=()):
    return run_twistd(
        "decnet-forwarder",
        [
            "--bundle",
            bundle,
            "--log-file",
            log_file,
            "--state",
            state,
            "--master-host",
            "127.0.0.1",
            "--master-port",
            port,
            "--poll-interval",
            "0.2",
            "--max-retry-delay",
            "1",
            *extra,
        ],
        log_path,
    )


# -- both services in-process, over real loopback sockets -------------------------------------


def enroll_worker(master_home: config.MasterPaths, directory: Path, prefix: str):
    """Enroll a worker of a unique name; its name and loaded bundle (in ``directory``)."""
    import os
    import random

    from decnet import pki
    from decnet.master import enrollment

    name = f"{prefix}-{os.getpid()}-{random.randrange(10**6)}"
    enrollment.enroll(enrollment.load_master(master_home), name, "127.0.0.1", directory)
    return name, pki.WorkerBundle.load(directory)


def loopback_listener(master_home: config.MasterPaths, ingest_dir: Path, port: int = 0, **kw):
    """A ListenerService of ``master_home`` on 127.0.0.1 (not started)."""
    from twisted.internet import reactor

    from decnet.listener.service import ListenerService
    from decnet.revocation import RevocationSet
    from decnet.tls import TLSIdentity

    return ListenerService(
        reactor,
        identity=TLSIdentity.master(master_home),
        revocations=RevocationSet(master_home.revocations),
        ingest_dir=ingest_dir,
        listen=f"tcp:{port}:interface=127.0.0.1",
        **kw,
    )


def loopback_forwarder(bundle, port: int, log_file: Path, state_file: Path):
    """A ForwarderService shipping ``log_file`` to 127.0.0.1:``port``, quick to poll and retry."""
    from twisted.internet import reactor

    from decnet.forwarder.service import ForwarderService
    from decnet.tls import TLSIdentity

    return ForwarderService(
        reactor,
        identity=TLSIdentity.from_bundle(bundle, "worker"),
        master_host="127.0.0.1",
        master_port=port,
        master_fingerprint=bundle.master_fingerprint,
        log_file=log_file,
        state_file=state_file,
        poll_interval=0.1,
        max_retry_delay=0.5,
    )
