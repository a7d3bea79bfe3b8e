"""``--metrics`` through each daemon's own tap, served on real loopback sockets in-process."""

from __future__ import annotations

import os
import random

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.python import usage

from decnet import config
from decnet.master import enrollment
from tests.logpipe_support import syslog_line
from tests.metrics_support import (
    build_named,
    scrape_port,
    scrape_running,
    scrape_until,
    serving,
)
from tests.support import raw_connect


@pytest.fixture(scope="module")
def bundle(master_home, tmp_path_factory):
    """An enrolled worker with an updater identity."""
    name = f"mx-{os.getpid()}-{random.randrange(10**6)}"
    out = tmp_path_factory.mktemp("metrics") / "bundle"
    enrollment.enroll(enrollment.load_master(master_home), name, "127.0.0.1", out, updater=True)
    return name, out


@pytest.mark.parametrize("daemon", ["listener", "forwarder", "agent", "updater"])
def test_metrics_are_off_unless_asked_for_and_a_typo_is_a_usage_error(daemon):
    import importlib

    tap = importlib.import_module(f"decnet.{daemon}.tap")
    assert ["metrics", None, None] == tap.Options.optParameters[
        [row[0] for row in tap.Options.optParameters].index("metrics")
    ][:3]
    with pytest.raises(usage.UsageError, match="not an endpoint"):
        tap.Options().parseOptions(["--metrics", "tcp:9465:interfce=127.0.0.1"])
    port = config.METRICS_PORTS[daemon]
    assert f"--metrics tcp:{port}:interface=127.0.0.1 serves" in " ".join(
        tap.Options().getUsage().split()
    )


@pytest_twisted.ensureDeferred
async def test_the_forwarders_file_lag_grows_while_the_master_is_unreachable(bundle, tmp_path):
    _name, bundle_dir = bundle
    log_file = tmp_path / "decnet.log"
    log_file.write_bytes(b"".join(syslog_line(i) + b"\n" for i in range(10)))
    service = build_named("forwarder", tmp_path, bundle=bundle_dir)
    async with serving(service) as port:

        def lag_is_the_file():
            size = log_file.stat().st_size
            return lambda s: s.get("decnet_forwarder_file_lag_bytes", stream="decnet") == size

        first = await scrape_until(port, lag_is_the_file(), "the lag")
        assert first.value("decnet_forwarder_shipped_lines_total", stream="decnet") == 0
        await scrape_until(
            port,
            lambda s: s.value("decnet_forwarder_connection_state", state="failing") == 1,
            "the first failed attempt",
        )
        with open(log_file, "ab") as f:
            f.write(b"".join(syslog_line(i) + b"\n" for i in range(10, 30)))
        await scrape_until(port, lag_is_the_file(), "the lag to grow")
        failures = (await scrape_running(port)).value(
            "decnet_forwarder_connect_failures_total", stream="decnet"
        )
        assert failures >= 1


@pytest_twisted.ensureDeferred
async def test_a_scanner_on_the_metrics_port_gets_404s_and_nothing_else(bundle, tmp_path):
    _name, bundle_dir = bundle
    service = build_named("forwarder", tmp_path, bundle=bundle_dir)
    async with serving(service) as port:
        for path in ("/", "/metrics/../../etc/passwd", "/metrics/x", "/%00", "/admin"):
            status, body, _ = await scrape_port(port, path)
            assert status == 404, path
            assert b"decnet_" not in body
        raw = await raw_connect(port)
        raw.transport.write(
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n"
        )
        await raw.expect(b"413")
        junk = await raw_connect(port)
        junk.transport.write(b"\x16\x03\x01\x02\x00" + bytes(range(256)) * 4 + b"\r\n\r\n")
        await junk.closed
        # Still serving everyone else.
        assert (await scrape_running(port)).value("decnet_build_info", daemon="forwarder") == 1


@pytest_twisted.ensureDeferred
async def test_agent_metrics_count_connections_and_events_per_decoy(bundle, tmp_path):
    _name, bundle_dir = bundle
    service = build_named("agent", tmp_path, bundle=bundle_dir)
    async with serving(service) as port:
        await service.restored
        result = await service.controller.deploy(
            {
                "deckies": [
                    {
                        "name": "web-01",
                        "services": [
                            {"type": "tcp-banner", "bind": "127.0.0.1", "port": 0, "banner": "x"}
                        ],
                    }
                ]
            }
        )
        address = result["deckies"]["web-01"]["tcp-banner"]["address"]
        decoy = await raw_connect(int(address.rsplit(":", 1)[1]))
        await decoy.expect(b"x")
        decoy.transport.write(b"\x1b[31m' OR 1=1 --\r\n")
        decoy.transport.loseConnection()
        labels = {"decky": "web-01", "service": "tcp-banner"}

        def counted(scrape):
            done = scrape.get("decnet_agent_decoy_connections_total", **labels) == 1
            return done and (scrape.get("decnet_agent_events_written_total") or 0) >= 2

        scrape = await scrape_until(port, counted, "the connection and its events")
        assert scrape.value("decnet_agent_decoy_events_total", **labels) >= 2
        assert scrape.value("decnet_agent_decoy_state", state="listening", **labels) == 1
        assert scrape.value("decnet_agent_events_dropped_total") == 0
        assert scrape.value("decnet_agent_log_queue_bytes") >= 0
        assert scrape.value("decnet_certificate_expiry_timestamp_seconds", role="worker") > 0
        # What the attacker sent and where from never becomes a label or a value.
        assert "OR 1=1" not in scrape.text and "127.0.0.1" not in scrape.text


@pytest_twisted.ensureDeferred
async def test_the_updater_serves_its_metrics_with_every_outcome_at_zero(bundle, tmp_path):
    _name, bundle_dir = bundle
    service = build_named("updater", tmp_path, bundle=bundle_dir)
    async with serving(service) as port:
        scrape = await scrape_running(port)
        assert scrape.labels_of("decnet_updater_updates_total", "result") == {
            "updated",
            "rolled_back",
            "rollback_failed",
            "failed",
            "busy",
        }
        assert scrape.value("decnet_updater_rollbacks_total", trigger="automatic") == 0
        assert scrape.value("decnet_updater_install_duration_seconds_count") == 0
        assert scrape.value("decnet_certificate_expiry_timestamp_seconds", role="updater") > 0
        assert scrape.value("decnet_build_info", daemon="updater") == 1


def test_a_metrics_port_already_taken_fails_start_up_like_the_main_port():
    import socket

    from decnet.metrics import MetricsService, daemon_registry
    from decnet.threads import inline_runner
    from tests.logpipe_support import LogCapture

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        service = MetricsService(
            reactor,
            f"tcp:{port}:interface=127.0.0.1",
            daemon_registry("agent", None),
            inline_runner,
        )
        with LogCapture() as logs, pytest.raises(SystemExit) as stopped:
            service.privilegedStartService()
    assert stopped.value.code == 1  # one line, no traceback, as for the main port
    assert "Cannot listen on" in logs.text() and "Prometheus scrapes" in logs.text()
    assert "Address already in use" in logs.text()
    assert service.port is None


@pytest.mark.parametrize(
    "interface, warned",
    [
        ("192.0.2.10", True),
        ("0.0.0.0", True),  # noqa: S104 - never bound: a memory reactor
        ("::", True),
        ("127.0.0.1", False),
        ("::1", False),
    ],
)
def test_metrics_on_a_non_loopback_address_are_started_with_a_warning(interface, warned):
    from twisted.internet.testing import MemoryReactorClock

    from decnet.metrics import MetricsService, daemon_registry
    from decnet.threads import inline_runner
    from tests.logpipe_support import LogCapture

    class Memory(MemoryReactorClock):
        """Binding anything but loopback is not for tests: a port that says where it is."""

        def listenTCP(self, port, factory, backlog=50, interface=""):
            bound = super().listenTCP(port, factory, backlog, interface)
            bound._hostAddress = attrs.evolve(bound._hostAddress, host=interface)
            return bound

    memory = Memory()
    escaped = interface.replace(":", "\\:")
    service = MetricsService(
        memory, f"tcp:9465:interface={escaped}", daemon_registry("agent", None), inline_runner
    )
    with LogCapture() as logs:
        service.privilegedStartService()
    assert memory.tcpServers[0][3] == interface
    assert ("without authentication" in logs.text()) is warned
