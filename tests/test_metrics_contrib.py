"""contrib/prometheus/alerts.yml, contrib/grafana/decnet.json and the units' metrics ports
agree with what the four daemons really export (scraped from real ones)."""

from __future__ import annotations

import collections
import json
import os
import random
import re
import shlex
from pathlib import Path

import pytest
import pytest_twisted

from decnet import config
from decnet.listener.metrics import ListenerSample
from decnet.master import enrollment
from decnet.metrics import encode
from tests.metrics_support import (
    Scrape,
    build_named,
    metrics_port,
    scrape_running,
    scrape_until,
)

REPO = Path(__file__).resolve().parent.parent
ALERTS = REPO / "contrib/prometheus/alerts.yml"
DASHBOARD = REPO / "contrib/grafana/decnet.json"
# Series Prometheus makes itself, not a daemon.
SYNTHETIC = {"up"}
METRIC = re.compile(r"\b((?:decnet|process)_[a-z0-9_]+|up)\b(?!\s*\()")


def alert_rules(text: str) -> dict[str, str]:
    """``{alert name: expr}`` from the rules file (one ``expr:`` line per rule, by design)."""
    names = re.findall(r"^\s*- alert: (\w+)\s*$", text, re.M)
    exprs = re.findall(r"^\s*expr: (.+?)\s*$", text, re.M)
    assert len(names) == len(exprs) == len(set(names)), "one expr line per alert, unique names"
    return dict(zip(names, exprs, strict=True))


def dashboard_exprs(doc) -> list[str]:
    found = []
    if isinstance(doc, dict):
        for key, value in doc.items():
            if key == "expr":
                found.append(value)
            else:
                found += dashboard_exprs(value)
    elif isinstance(doc, list):
        for item in doc:
            found += dashboard_exprs(item)
    return found


def unknown_metrics(expr: str, exported: set[str]) -> set[str]:
    names = set(METRIC.findall(expr))
    assert names, f"{expr!r} names no metric"
    return names - exported - SYNTHETIC


@pytest.fixture(scope="module")
def bundle(master_home, tmp_path_factory):
    name = f"mc-{os.getpid()}-{random.randrange(10**6)}"
    out = tmp_path_factory.mktemp("contrib") / "bundle"
    enrollment.enroll(enrollment.load_master(master_home), name, "127.0.0.1", out, updater=True)
    return out


async def exported_by_every_daemon(master_home, bundle: Path, tmp: Path) -> set[str]:
    (tmp / "decnet.log").write_bytes(b"")
    services = [
        build_named("listener", tmp / "listener", home=master_home.home),
        build_named("forwarder", tmp, bundle=bundle),
        build_named("agent", tmp, bundle=bundle),
        build_named("updater", tmp, bundle=bundle),
    ]
    names: set[str] = set()
    try:
        for service in services:
            service.startService()
        for service in services:
            port = metrics_port(service)
            if service is services[1]:  # the forwarder's positions come once its journal is read
                scrape = await scrape_until(
                    port, lambda s: "decnet_forwarder_file_lag_bytes" in s.names, "positions"
                )
            else:
                scrape = await scrape_running(port)
            names |= scrape.names
    finally:
        for service in services:
            await service.stopService()
    return names | publisher_exported() | sink_exported()


def publisher_exported() -> set[str]:
    """A publishing listener's own names, from a sample with a broker (the listener above does
    not publish; tests/test_nats_listener.py scrapes them from one that does)."""
    sample = ListenerSample(
        collections.Counter(), {}, {}, {}, {}, {}, {}, publish_lag={"w": 1}, broker_up=0
    )
    return Scrape(encode(lambda: list(sample.families())).decode()).names


def sink_exported() -> set[str]:
    """The sink's names, from its collector (a running sink needs JetStream and PostgreSQL;
    tests/test_sink_subprocess.py runs one)."""
    from decnet.listener.publisherproc import NatsOptions
    from decnet.sink.metrics import sink_registry
    from decnet.sink.service import SinkOptions, SinkService
    from decnet.threads import inline_runner

    options = SinkOptions(nats=NatsOptions(servers=("nats://127.0.0.1:4222",)), dsn="dbname=unused")
    sink = SinkService(None, None, options, inline_runner)  # type: ignore[arg-type]
    return Scrape(encode(sink_registry(sink).sample()).decode()).names


@pytest_twisted.ensureDeferred
async def test_every_alert_and_dashboard_query_names_only_metrics_the_daemons_export(
    master_home, bundle, tmp_path
):
    exported = await exported_by_every_daemon(master_home, bundle, tmp_path)
    rules = alert_rules(ALERTS.read_text())
    assert {
        "DecnetWorkerSilent",
        "DecnetLogLagGrowing",
        "DecnetRollbackHappened",
        "DecnetCertificateExpiring",
        "DecnetBrokerDown",
        "DecnetSinkStoreDown",
    } <= set(rules)
    for name, expr in rules.items():
        assert not unknown_metrics(expr, exported), f"alert {name}: {expr}"
    exprs = dashboard_exprs(json.loads(DASHBOARD.read_text()))
    assert len(exprs) >= 20
    for expr in exprs:
        assert not unknown_metrics(expr, exported), f"dashboard: {expr}"
    # Every daemon's own metrics appear on the dashboard.
    used = set().union(*(METRIC.findall(e) for e in exprs))
    for daemon in config.METRICS_PORTS:
        assert any(m.startswith(f"decnet_{daemon}_") for m in used), daemon


def test_a_misspelt_metric_in_an_alert_is_caught():
    exported = {"decnet_forwarder_file_lag_bytes"}
    assert unknown_metrics("decnet_forwarder_file_lag_byte > 0", exported) == {
        "decnet_forwarder_file_lag_byte"
    }
    assert not unknown_metrics("deriv(decnet_forwarder_file_lag_bytes[15m]) > 0", exported)


@pytest.mark.parametrize("daemon", sorted(config.METRICS_PORTS))
def test_each_unit_serves_its_daemons_own_metrics_port_on_loopback(daemon):
    unit = REPO / "contrib/systemd" / f"decnet-{daemon}.service"
    text = unit.read_text()
    start = text[text.index("\nExecStart=") + 1 :].split("\n\n")[0]
    argv = shlex.split(start.split("=", 1)[1].split("\n#")[0].replace("\\\n", " "))
    endpoint = argv[argv.index("--metrics") + 1]
    assert endpoint == f"tcp:{config.METRICS_PORTS[daemon]}:interface=127.0.0.1"
    assert len(set(config.METRICS_PORTS.values())) == len(config.METRICS_PORTS)
