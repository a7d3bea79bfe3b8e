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

import attrs
from prometheus_client import Histogram
from prometheus_client.metrics_core import Metric
from twisted.internet.interfaces import IReactorTime

from decnet.listener.ingest import Committed, Ingest
from decnet.listener.protocol import STATES, ListenerFactory, Refused
from decnet.metrics import Build, DaemonMetrics, counter, daemon_registry, gauge
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
        # Each (worker, stream)'s durable logical end, for the publisher's lag.
        self.durable_end: dict[tuple[str, str], int] = {}
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
        self.durable_end[(done.worker, done.stream)] = done.end
        self.commit_seconds.observe(max(0.0, done.seconds))

    def sample(self) -> Build:
        """Copy the counts (on the reactor); the families are built from the copy."""
        now = self.clock.seconds()
        open_now = {worker: len(protos) for worker, protos in self.factory.by_worker.items()}
        self.last_seen.update(dict.fromkeys(open_now, now))
        feeds = self.ingest.feeds
        lag: collections.Counter[str] = collections.Counter()
        positions: dict[tuple[str, str], int] = getattr(feeds, "positions", {})
        for (worker, stream), target in getattr(feeds, "targets", {}).items():
            lag[worker] += max(0, target - positions.get((worker, stream), 0))
        publisher = self.ingest.publisher
        publish_lag: dict[str, int] = {}
        broker_up: int | None = None
        if publisher is not None:
            broker_up = int(publisher.broker == "up")
            publish_lag = publisher_lag(self.durable_end, publisher.marks.marks)
        sample = ListenerSample(
            states=collections.Counter(proto.state for proto in self.factory.connections),
            refused=dict(self.factory.refused_by),
            open_now=open_now,
            last_seen=dict(self.last_seen),
            lines=dict(self.lines),
            bytes=dict(self.bytes),
            feed_lag=dict(lag),
            publish_lag=publish_lag,
            broker_up=broker_up,
        )
        return sample.families


@attrs.frozen
class ListenerSample:
    """The listener's counts at one scrape (plain data: built into families on any thread)."""

    states: collections.Counter[str]
    refused: dict[Refused, int]
    open_now: dict[str, int]
    last_seen: dict[str, float]
    lines: dict[str, int]
    bytes: dict[str, int]
    feed_lag: dict[str, int]
    publish_lag: dict[str, int] = attrs.field(factory=dict)
    broker_up: int | None = None  # (None: not publishing)

    def families(self) -> Iterator[Metric]:
        yield gauge(
            "decnet_listener_connections",
            "Connections open now, by state (handshaking: not yet authenticated)",
            ["state"],
            (([state], self.states[state]) for state in STATES),
        )
        yield counter(
            "decnet_listener_refusals",
            "Connections the listener closed because it did not want them, by reason",
            ["reason"],
            (([reason.value], self.refused.get(reason, 0)) for reason in Refused),
        )
        yield from (
            kind(name, documentation, ["worker"], (([w], v) for w, v in sorted(values.items())))
            for kind, name, documentation, values in (
                (
                    gauge,
                    "decnet_listener_worker_connections",
                    "Authenticated connections open now, per worker",
                    self.open_now,
                ),
                (
                    gauge,
                    "decnet_listener_worker_last_seen_timestamp_seconds",
                    "When the worker last had a connection open or data committed (Unix time)",
                    self.last_seen,
                ),
                (
                    counter,
                    "decnet_listener_ingested_lines",
                    "Log lines made durable in the mirror since the listener started, per worker",
                    self.lines,
                ),
                (
                    counter,
                    "decnet_listener_ingested_bytes",
                    "Bytes made durable in the mirror since the listener started, per worker",
                    self.bytes,
                ),
                (
                    gauge,
                    "decnet_listener_feed_lag_bytes",
                    "Durable mirror bytes the JSON feed has not encoded yet, per worker",
                    self.feed_lag,
                ),
            )
        )
        if self.broker_up is None:
            return
        yield gauge(
            "decnet_listener_publisher_lag_bytes",
            "Durable bytes (logical stream offsets) JetStream has not confirmed yet, per worker",
            ["worker"],
            (([w], v) for w, v in sorted(self.publish_lag.items())),
        )
        yield gauge(
            "decnet_listener_publisher_broker_up",
            "1 while the JetStream broker stores what the publisher sends, 0 otherwise",
            [],
            [([], self.broker_up)],
        )


def publisher_lag(
    durable: dict[tuple[str, str], int], confirmed: dict[tuple[str, str], int]
) -> dict[str, int]:
    """Per worker: the durable bytes of its streams above the broker's confirmed mark
    (a stream the broker has confirmed nothing of counts whole)."""
    lag: collections.Counter[str] = collections.Counter()
    for (worker, stream), end in durable.items():
        lag[worker] += max(0, end - confirmed.get((worker, stream), 0))
    return dict(lag)


def listener_registry(
    factory: ListenerFactory, ingest: Ingest, clock: IReactorTime, identity: TLSIdentity
) -> DaemonMetrics:
    """The listener's registry: the common metrics and :class:`ListenerMetrics`."""
    metrics = daemon_registry("listener", identity)
    listener = ListenerMetrics(factory, ingest, clock)
    metrics.registry.register(listener.commit_seconds)  # (it locks: safe in any thread)
    metrics.add(listener)
    return metrics
