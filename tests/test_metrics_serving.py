"""decnet.metrics: the endpoint option, and a scrape collected on the reactor, encoded elsewhere."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry
from twisted.internet import defer
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from decnet.metrics import (
    DaemonMetrics,
    MetricsResource,
    daemon_registry,
    gauge,
    metrics_endpoint,
)
from tests.logpipe_support import LogCapture
from tests.metrics_support import Scrape


@pytest.mark.parametrize(
    "value",
    [
        "tcp:9465:interface=127.0.0.1",
        "tcp:0",
        "tcp:interface=127.0.0.1:port=9465",
        "tcp6:9465:interface=\\:\\:1",
        "unix:/run/decnet/metrics.sock",
    ],
)
def test_endpoint_strings_twisted_can_listen_on_are_accepted(value):
    assert metrics_endpoint(value) == value


@pytest.mark.parametrize(
    "value, why",
    [
        ("tpc:9465", "Unknown endpoint type"),
        ("tcp:http", "invalid literal"),
        ("tcp:99999", "not 0-65535"),
        ("tcp:9465:interfce=127.0.0.1", "unexpected keyword"),
        ("", "must be an endpoint"),
        ("tcp:9465\n", "must be an endpoint"),
        ("tcp:９４６５", "must be an endpoint"),
        ("systemd:domain=INET:index=0", "not an endpoint"),  # no socket passed here
    ],
)
def test_a_typo_in_the_endpoint_is_refused_before_anything_starts(value, why):
    with pytest.raises(ValueError, match=why):
        metrics_endpoint(value)


class Deferring:
    """A runner whose calls run when the test says (the thread pool, held)."""

    def __init__(self):
        self.calls: list[tuple[defer.Deferred, object, tuple]] = []

    def __call__(self, f, *args):
        d: defer.Deferred = defer.Deferred()
        self.calls.append((d, f, args))
        return d

    def finish(self):
        for d, f, args in self.calls:
            try:
                d.callback(f(*args))
            except Exception:
                d.errback()


class Counting:
    """A collector whose value the test changes between sampling and encoding."""

    def __init__(self):
        self.value = 1

    def sample(self):
        value = self.value
        return lambda: [gauge("decnet_test_value", "A value", (), [((), value)])]


def test_a_scrape_encodes_what_was_collected_on_the_reactor_not_what_changed_since():
    registry = daemon_registry("listener", None)
    counting = Counting()
    registry.add(counting)
    run = Deferring()
    request = DummyRequest([b""])
    assert MetricsResource(registry, run).render_GET(request) is NOT_DONE_YET
    counting.value = 2  # changes on the reactor while the encoder runs
    assert request.written == []
    run.finish()
    scrape = Scrape(b"".join(request.written).decode())
    assert scrape.value("decnet_test_value") == 1
    assert scrape.value("decnet_build_info", daemon="listener") == 1
    assert request.responseHeaders.getRawHeaders(b"content-type") == [
        b"text/plain; version=0.0.4; charset=utf-8"
    ]
    assert request.finished


def test_a_scraper_that_hangs_up_before_the_answer_is_ready_is_not_written_to():
    registry = DaemonMetrics(CollectorRegistry(auto_describe=False))
    run = Deferring()
    request = DummyRequest([b""])
    MetricsResource(registry, run).render_GET(request)
    request.processingFailed(Failure(ConnectionLost()))
    with LogCapture() as logs:
        run.finish()
    assert request.written == [] and logs.events == []


def test_a_broken_collector_is_a_500_and_one_logged_failure_and_the_next_scrape_works():
    registry = DaemonMetrics(CollectorRegistry(auto_describe=False))

    class Broken:
        fail = True

        def sample(self):
            if self.fail:
                raise RuntimeError("boom")
            return lambda: [gauge("decnet_test_value", "A value", (), [((), 3)])]

    broken = Broken()
    registry.add(broken)
    with LogCapture() as logs:
        request = DummyRequest([b""])
        body = MetricsResource(registry, Deferring()).render_GET(request)
    assert request.responseCode == 500 and b"boom" not in body
    assert len(logs.events) == 1
    broken.fail = False
    run = Deferring()
    request = DummyRequest([b""])
    MetricsResource(registry, run).render_GET(request)
    run.finish()
    assert Scrape(b"".join(request.written).decode()).value("decnet_test_value") == 3


def test_a_family_that_fails_to_build_in_the_thread_is_a_500_and_logged():
    registry = DaemonMetrics(CollectorRegistry(auto_describe=False))

    class BrokenLater:
        def sample(self):
            def build():
                raise ValueError("cannot build")

            return build

    registry.add(BrokenLater())
    run = Deferring()
    request = DummyRequest([b""])
    MetricsResource(registry, run).render_GET(request)
    with LogCapture() as logs:
        run.finish()
    assert request.responseCode == 500 and request.finished
    assert b"cannot build" not in b"".join(request.written)
    assert len(logs.events) == 1
