"""Both services in-process over real loopback sockets with real certificates."""

import os
import random
import re

import pytest_twisted
from twisted.internet import reactor

from decnet import pki
from decnet.forwarder.offsets import JournalStore
from decnet.forwarder.service import ForwarderService
from decnet.listener.service import ListenerService
from decnet.master import enrollment
from decnet.revocation import RevocationSet
from decnet.tls import TLSIdentity
from tests.logpipe_support import syslog_line
from tests.support import eventually


def enrolled_forwarder(master_home, tmp_path, prefix: str, port: int, **kw) -> tuple:
    """A worker enrolled under a fresh name, and its forwarder (not started) of
    ``tmp_path/decnet.log`` towards the listener on ``127.0.0.1:port``."""
    name = f"{prefix}-{os.getpid()}-{random.randrange(10**6)}"
    enrollment.enroll(enrollment.load_master(master_home), name, "127.0.0.1", tmp_path / "b")
    bundle = pki.WorkerBundle.load(tmp_path / "b")
    fwd = ForwarderService(
        reactor,
        identity=TLSIdentity.from_bundle(bundle, "worker"),
        master_host="127.0.0.1",
        master_port=port,
        master_fingerprint=bundle.master_fingerprint,
        log_file=tmp_path / "decnet.log",
        state_file=tmp_path / "f.sqlite",
        **kw,
    )
    return name, fwd


@pytest_twisted.ensureDeferred
async def test_forwarder_ships_to_listener_over_loopback_and_survives_a_listener_restart(
    master_home, tmp_path
):
    def listener(port=0):
        return ListenerService(
            reactor,
            identity=TLSIdentity.master(master_home),
            revocations=RevocationSet(master_home.revocations),
            ingest_dir=tmp_path / "ingest",
            listen=f"tcp:{port}:interface=127.0.0.1",
        )

    lst = listener()
    lst.startService()
    port = lst.port_service.port.getHost().port
    log_file = tmp_path / "decnet.log"
    first = b"".join(syslog_line(i) + b"\n" for i in range(2000))
    log_file.write_bytes(first)
    name, fwd = enrolled_forwarder(
        master_home, tmp_path, "rsock", port, poll_interval=0.1, max_retry_delay=0.5
    )
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
    _name, fwd = enrolled_forwarder(master_home, tmp_path, "retry", port, max_retry_delay=0.3)
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
