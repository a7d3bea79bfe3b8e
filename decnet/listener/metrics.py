"""What ``twistd decnet-listener --metrics`` exports (see docs/Metrics.md).

Read at scrape time from the factory and the ingest, except what only a commit
knows (lines, bytes, latency), which :class:`ListenerMetrics` sums as each
commit is reported.  Labels are the worker (an enrolled certificate CN) and
fixed sets (connection states, :class:`~decnet.listener.protocol.Refused`);
never anything a connection sent.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from twisted.internet.interfaces import IReactorTime

from decnet.listener.ingest import Committed, Ingest
from decnet.listener.protocol import STATES, ListenerFactory, Refused
from decnet.metrics import daemon_registry
from decnet.tls import TLSIdentity

# From a lone line on an idle disk to a batch behind a slow fsync.
COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ListenerMetrics:
    """A collector for one listener's factory and ingest."""

    def __init__(self, factory: ListenerFactory, ingest: Ingest, clock: IReactorTime):
        self.factory = factory
        self.ingest = ingest
        self.clock = clock
        self.lines: collections.Counter[str] = collections.Counter()
        self.bytes: collections.Counter[str] = collections.Counter()
        # When each worker was last known alive: a commit, or a connection open at a scrape.
        self.last_seen: dict[str, float] = {}
        self.commit_seconds = Histogram(
            "decnet_listener_commit_seconds",
            "Time from handing a batch to the disk to it being durable (fsync included)",
            buckets=COMMIT_BUCKETS,
            registry=None,
        )
        ingest.commit_observers.append(self.committed)

    def committed(self, done: Committed) -> None:
        self.lines[done.worker] += done.lines
        self.bytes[done.worker] += done.bytes
        self.last_seen[done.worker] = self.clock.seconds()
        self.commit_seconds.observe(max(0.0, done.seconds))

    def collect(self) -> Iterator[Metric]:
        yield self._connections()
        yield from self._workers()
        refusals = CounterMetricFamily(
            "decnet_listener_refusals",
            "Connections the listener closed because it did not want them, by reason",
            labels=["reason"],
        )
        for reason in Refused:
            refusals.add_metric([reason.value], self.factory.refused_by[reason])
        yield refusals
        yield from self._ingested()
        yield from self.commit_seconds.collect()
        yield self._feed_lag()

    def _connections(self) -> Metric:
        states = collections.Counter(proto.state for proto in list(self.factory.connections))
        family = GaugeMetricFamily(
            "decnet_listener_connections",
            "Connections open now, by state (handshaking: not yet authenticated)",
            labels=["state"],
        )
        for state in STATES:
            family.add_metric([state], states[state])
        return family

    def _workers(self) -> Iterator[Metric]:
        now = self.clock.seconds()
        open_now = GaugeMetricFamily(
            "decnet_listener_worker_connections",
            "Authenticated connections open now, per worker",
            labels=["worker"],
        )
        for worker, protos in sorted(self.factory.by_worker.items()):
            open_now.add_metric([worker], len(protos))
            self.last_seen[worker] = now
        yield open_now
        seen = GaugeMetricFamily(
            "decnet_listener_worker_last_seen_timestamp_seconds",
            "When the worker last had a connection open or data committed (Unix time)",
            labels=["worker"],
        )
        for worker, when in sorted(self.last_seen.items()):
            seen.add_metric([worker], when)
        yield seen

    def _ingested(self) -> Iterator[Metric]:
        lines = CounterMetricFamily(
            "decnet_listener_ingested_lines",
            "Log lines made durable in the mirror since the listener started, per worker",
            labels=["worker"],
        )
        size = CounterMetricFamily(
            "decnet_listener_ingested_bytes",
            "Bytes made durable in the mirror since the listener started, per worker",
            labels=["worker"],
        )
        for worker in sorted(self.bytes):
            lines.add_metric([worker], self.lines[worker])
            size.add_metric([worker], self.bytes[worker])
        yield lines
        yield size

    def _feed_lag(self) -> Metric:
        family = GaugeMetricFamily(
            "decnet_listener_feed_lag_bytes",
            "Durable mirror bytes the JSON feed has not encoded yet, per worker",
            labels=["worker"],
        )
        feeds = self.ingest.feeds
        targets: dict[tuple[str, str], int] = dict(getattr(feeds, "targets", {}))
        positions: dict[tuple[str, str], int] = getattr(feeds, "positions", {})
        lag: collections.Counter[str] = collections.Counter()
        for (worker, stream), target in targets.items():
            lag[worker] += max(0, target - positions.get((worker, stream), 0))
        for worker in sorted(lag):
            family.add_metric([worker], lag[worker])
        return family


def listener_registry(
    factory: ListenerFactory, ingest: Ingest, clock: IReactorTime, identity: TLSIdentity
) -> CollectorRegistry:
    """The listener's registry: the common metrics and :class:`ListenerMetrics`."""
    registry = daemon_registry("listener", identity)
    registry.register(ListenerMetrics(factory, ingest, clock))
    return registry
