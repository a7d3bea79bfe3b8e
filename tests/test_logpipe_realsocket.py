"""Both services in-process over real loopback sockets with real certificates."""

import re

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory

from decnet.forwarder.offsets import JournalStore
from decnet.listener.service import listener_options
from decnet.syslog import ackproto
from decnet.syslog.framing import encode_frame
from decnet.tls import TLSIdentity
from tests.logpipe_support import (
    enroll_worker,
    loopback_forwarder,
    loopback_listener,
    syslog_line,
)
from tests.support import eventually


@pytest_twisted.ensureDeferred
async def test_forwarder_ships_to_listener_over_loopback_and_survives_a_listener_restart(
    master_home, tmp_path
):
    name, bundle = enroll_worker(master_home, tmp_path / "b", "rsock")

    def listener(port=0):
        return loopback_listener(master_home, tmp_path / "ingest", port)

    lst = listener()
    lst.startService()
    port = lst.port_service.port.getHost().port
    log_file = tmp_path / "decnet.log"
    first = b"".join(syslog_line(i) + b"\n" for i in range(2000))
    log_file.write_bytes(first)
    fwd = loopback_forwarder(bundle, port, log_file, tmp_path / "f.sqlite")
    fwd.startService()
    mirror = tmp_path / "ingest" / name / "decnet.log"
    try:
        await eventually(lambda: mirror.exists() and mirror.read_bytes() == first, what="mirror")
        await lst.stopService()
        more = b"".join(syslog_line(i) + b"\n" for i in range(2000, 3000))
        with open(log_file, "ab") as f:
            f.write(more)
        lst = listener(port)
        lst.startService()
        await eventually(lambda: mirror.read_bytes() == first + more, what="mirror after restart")
        await eventually(
            lambda: fwd.shipper.core.durable_acked == len(first + more),
            what="the acknowledged offset to be persisted",
        )
    finally:
        await fwd.stopService()
        await lst.stopService()
    assert JournalStore(tmp_path / "f.sqlite", reactor.seconds).load("decnet").acked == len(
        first + more
    )


class _StallingMaster(Protocol):
    """Answers HELLO with RESUME 0, then reads nothing until told to close.

    The forwarder fills its socket buffers and its transport pauses it; the
    test then closes TLS from this side (close_notify) and reads again.
    """

    def __init__(self, connections: list):
        self.connections = connections
        self.resumed = False

    def connectionMade(self):
        self.connections.append(self)

    def dataReceived(self, data):
        if not self.resumed:
            self.resumed = True
            self.transport.write(encode_frame(ackproto.encode_resume(0)))
            self.transport.pauseProducing()

    def close_and_drain(self):
        self.transport.loseConnection()
        self.transport.resumeProducing()


@pytest_twisted.ensureDeferred
async def test_a_master_closing_tls_while_the_forwarder_is_paused_is_noticed_and_reconnected(
    master_home, tmp_path
):
    # Twisted's TCP transport does not finish a close while a producer is
    # registered: the forwarder must let go of the connection itself when the
    # master's close_notify arrives while it is paused, or it hangs for ever
    # on a connection nobody reads (seen after a listener restart).
    _, bundle = enroll_worker(master_home, tmp_path / "b", "stall")
    connections: list[_StallingMaster] = []
    factory = Factory.forProtocol(lambda: _StallingMaster(connections))
    options = listener_options(TLSIdentity.master(master_home), None)
    port = reactor.listenTCP(0, TLSMemoryBIOFactory(options, False, factory), interface="127.0.0.1")
    log_file = tmp_path / "decnet.log"
    line = syslog_line(0) + b"\n"
    log_file.write_bytes(line * (32 * 1024 * 1024 // len(line)))
    fwd = loopback_forwarder(bundle, port.getHost().port, log_file, tmp_path / "f.sqlite")
    fwd.startService()
    try:
        await eventually(
            lambda: fwd.shipper is not None and fwd.shipper.core.paused,
            what="the forwarder to be paused",
        )
        connections[0].close_and_drain()
        await eventually(lambda: len(connections) >= 2, what="the forwarder to reconnect")
        # The new master stalls as well: stopping still ends (the close is cut after a grace).
        await eventually(lambda: fwd.shipper.core.paused, what="the forwarder to be paused again")
        stopped = fwd.stopService()
        await eventually(lambda: stopped.called, timeout=15, what="the forwarder to stop")
    finally:
        if fwd.running:
            await fwd.stopService()
        for proto in connections:
            if proto.transport.connected:
                proto.transport.abortConnection()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_reconnecting_forwarder_logs_retries_a_person_can_read(master_home, tmp_path):
    """No listener: each retry line names the master's address and a rounded delay,
    not ``<_ReportingEndpoint object at 0x...> in 1.9603283599477868 seconds``."""
    from twisted.logger import formatEvent, globalLogPublisher

    from tests.support import free_port

    port = free_port()
    (tmp_path / "decnet.log").write_bytes(syslog_line(1) + b"\n")
    lines = []

    def observe(event):
        if "Scheduling retry" in (event.get("log_format") or ""):
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    _, bundle = enroll_worker(master_home, tmp_path / "b", "retry")
    fwd = loopback_forwarder(bundle, port, tmp_path / "decnet.log", tmp_path / "f.sqlite")
    fwd.startService()
    try:
        await eventually(lambda: len(lines) >= 3, what="three retry lines")
    finally:
        globalLogPublisher.removeObserver(observe)
        await fwd.stopService()
    for line in lines:
        assert "object at 0x" not in line, line
        assert re.fullmatch(
            rf"Scheduling retry \d+ to connect the master's listener at 127\.0\.0\.1:{port} "
            r"\(TLS\) in \d+\.\d seconds\.",
            line,
        ), line
