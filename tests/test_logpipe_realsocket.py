"""Both services in-process over real loopback sockets with real certificates."""

import pytest_twisted
from twisted.internet import reactor

from decnet.forwarder.offsets import JournalStore
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
