"""What ``twistd decnet-sink --metrics`` exports (see docs/Metrics.md)."""

from __future__ import annotations

from collections.abc import Iterator

import attrs
from prometheus_client.metrics_core import Metric

from decnet.metrics import Build, DaemonMetrics, counter, daemon_registry, gauge
from decnet.sink.service import SinkCounts, SinkService

BROKER_STATES = ("starting", "up", "down", "waiting")


class SinkMetrics:
    """A collector for one sink's counts."""

    def __init__(self, sink: SinkService):
        self.sink = sink

    def sample(self) -> Build:
        copy = attrs.evolve(self.sink.counts)
        return lambda: list(_families(copy))


def _families(counts: SinkCounts) -> Iterator[Metric]:
    yield counter(
        "decnet_sink_events_stored",
        "Event rows the sink committed to PostgreSQL (new rows only)",
        [],
        [([], counts.stored)],
    )
    yield counter(
        "decnet_sink_events_duplicate",
        "Events delivered again and already stored (ON CONFLICT DO NOTHING)",
        [],
        [([], counts.duplicates)],
    )
    yield counter(
        "decnet_sink_events_rejected",
        "Messages that could not be an event row, kept in decnet_rejected_events",
        [],
        [([], counts.rejected)],
    )
    yield counter(
        "decnet_sink_batches", "Batches committed and acknowledged", [], [([], counts.batches)]
    )
    yield counter(
        "decnet_sink_store_failures",
        "Batch writes PostgreSQL did not take (retried with backoff)",
        [],
        [([], counts.store_failures)],
    )
    yield gauge(
        "decnet_sink_store_up",
        "1 when the last PostgreSQL write succeeded",
        [],
        [([], 1.0 if counts.store_up else 0.0)],
    )
    yield gauge(
        "decnet_sink_broker_state",
        "The JetStream connection's state (1 for the current one)",
        ["state"],
        (([s], 1.0 if counts.broker == s else 0.0) for s in BROKER_STATES),
    )


def sink_registry(sink: SinkService) -> DaemonMetrics:
    metrics = daemon_registry("sink", None)
    metrics.add(SinkMetrics(sink))
    return metrics
