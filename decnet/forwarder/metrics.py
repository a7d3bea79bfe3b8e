"""What ``twistd decnet-forwarder --metrics`` exports (see docs/Metrics.md).

Everything is read at scrape time from the delivery core, the tailer and the
connection factory, except connection changes, which :class:`ForwarderMetrics`
counts as the factory reports them (its ``state_listeners``).
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from decnet.metrics import counter, daemon_registry, gauge
from decnet.tls import TLSIdentity

if TYPE_CHECKING:
    from decnet.forwarder.service import ForwarderService

# The factory's states (decnet.forwarder.client.ForwarderFactory._set_state).
STATES = ("connecting", "connected", "disconnected", "failing")


class ForwarderMetrics:
    """A collector for one forwarder service (its shipper exists once the journal is read)."""

    def __init__(self, service: ForwarderService):
        self.service = service
        self.changes: collections.Counter[str] = collections.Counter()
        service.factory.state_listeners.append(self._state_changed)

    def _state_changed(self, state: str, _detail: str) -> None:
        self.changes[state] += 1

    def collect(self) -> Iterator[Metric]:
        service = self.service
        stream = service.stream
        state = GaugeMetricFamily(
            "decnet_forwarder_connection_state",
            "1 for the state the connection to the master is in, 0 for the others",
            labels=["state"],
        )
        for name in STATES:
            state.add_metric([name], 1 if service.factory.state == name else 0)
        yield state
        yield _counter(
            "decnet_forwarder_connects",
            "Connections to the master that completed their handshake (reconnects included)",
            stream,
            self.changes["connected"],
        )
        yield _counter(
            "decnet_forwarder_connect_failures",
            "Connection attempts that failed (refused, unreachable, handshake refused)",
            stream,
            self.changes["failing"],
        )
        tailer = service.tailer
        yield _counter(
            "decnet_forwarder_rotations",
            "Rotations of the log file noticed",
            stream,
            tailer.rotations,
        )
        yield _counter(
            "decnet_forwarder_truncations",
            "Truncations (copytruncate) of the log file noticed",
            stream,
            tailer.truncations,
        )
        yield _counter(
            "decnet_forwarder_truncated_lines",
            "Lines longer than --max-line, shipped truncated with a marker",
            stream,
            tailer.truncated_lines,
        )
        yield from self._delivery(stream)

    def _delivery(self, stream: str) -> Iterator[Metric]:
        shipper = self.service.shipper
        if shipper is None:
            return  # the journal is still being read: no positions yet
        core = shipper.core
        yield _counter(
            "decnet_forwarder_shipped_lines", "Lines sent to the master", stream, core.lines_sent
        )
        yield _counter(
            "decnet_forwarder_shipped_bytes", "Bytes of lines sent", stream, core.bytes_sent
        )
        yield _counter(
            "decnet_forwarder_gaps",
            "Ranges declared lost (rotated away or deleted before they were read)",
            stream,
            core.gaps_declared,
        )
        yield _gauge(
            "decnet_forwarder_unacknowledged_bytes",
            "Bytes sent but not yet acknowledged as durable by the master (0 in plain mode)",
            stream,
            max(0, core.sent_end - core.acked),
        )
        yield _gauge(
            "decnet_forwarder_acknowledged_offset_bytes",
            "Logical offset up to which the master acknowledged the stream",
            stream,
            core.acked,
        )
        yield _gauge(
            "decnet_forwarder_file_lag_bytes",
            "Bytes in the log file (as last looked at) that the master has not acknowledged",
            stream,
            max(0, self.service.tailer.seen_end - core.acked),
        )


def _counter(name: str, documentation: str, stream: str, value: float) -> Metric:
    return counter(name, documentation, ["stream"], [([stream], value)])


def _gauge(name: str, documentation: str, stream: str, value: float) -> Metric:
    return gauge(name, documentation, ["stream"], [([stream], value)])


def forwarder_registry(service: ForwarderService, identity: TLSIdentity) -> CollectorRegistry:
    """The forwarder's registry: the common metrics and :class:`ForwarderMetrics`."""
    registry = daemon_registry("forwarder", identity)
    registry.register(ForwarderMetrics(service))
    return registry
