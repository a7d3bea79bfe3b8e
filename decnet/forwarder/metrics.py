"""What ``twistd decnet-forwarder --metrics`` exports (see docs/Metrics.md).

Everything is read at scrape time from the delivery core, the tailer and the
connection factory, except connection changes, which :class:`ForwarderMetrics`
counts as the factory reports them (its ``state_listeners``).
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import TYPE_CHECKING

import attrs
from prometheus_client.metrics_core import Metric

from decnet.metrics import Build, DaemonMetrics, counter, daemon_registry, gauge
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

    def sample(self) -> Build:
        """Copy the counts (on the reactor); the families are built from the copy."""
        service = self.service
        tailer = service.tailer
        shipper = service.shipper
        core = shipper.core if shipper is not None else None
        sample = ForwarderSample(
            stream=service.stream,
            state=service.factory.state,
            connects=self.changes["connected"],
            failures=self.changes["failing"],
            rotations=tailer.rotations,
            truncations=tailer.truncations,
            truncated_lines=tailer.truncated_lines,
            # (None until the journal is read: no positions yet)
            delivery=None
            if core is None
            else (
                core.lines_sent,
                core.bytes_sent,
                core.gaps_declared,
                core.sent_end,
                core.acked,
                tailer.file_end,
            ),
        )
        return sample.families


@attrs.frozen
class ForwarderSample:
    """The forwarder's counts at one scrape (plain data)."""

    stream: str
    state: str
    connects: int
    failures: int
    rotations: int
    truncations: int
    truncated_lines: int
    # lines, bytes, gaps, sent end, acknowledged, file end
    delivery: tuple[int, int, int, int, int, int] | None

    def families(self) -> Iterator[Metric]:
        stream = self.stream
        yield gauge(
            "decnet_forwarder_connection_state",
            "1 for the state the connection to the master is in, 0 for the others",
            ["state"],
            (([name], 1 if self.state == name else 0) for name in STATES),
        )
        for name, documentation, value in (
            (
                "decnet_forwarder_connects",
                "Connections to the master that completed their handshake (reconnects included)",
                self.connects,
            ),
            (
                "decnet_forwarder_connect_failures",
                "Connection attempts that failed (refused, unreachable, handshake refused)",
                self.failures,
            ),
            ("decnet_forwarder_rotations", "Rotations of the log file noticed", self.rotations),
            (
                "decnet_forwarder_truncations",
                "Truncations (copytruncate) of the log file noticed",
                self.truncations,
            ),
            (
                "decnet_forwarder_truncated_lines",
                "Lines longer than --max-line, shipped truncated with a marker",
                self.truncated_lines,
            ),
        ):
            yield _counter(name, documentation, stream, value)
        if self.delivery is not None:
            yield from _delivery(stream, *self.delivery)


def _delivery(
    stream: str, lines: int, size: int, gaps: int, sent: int, acked: int, end: int
) -> Iterator[Metric]:
    yield _counter("decnet_forwarder_shipped_lines", "Lines sent to the master", stream, lines)
    yield _counter("decnet_forwarder_shipped_bytes", "Bytes of lines sent", stream, size)
    yield _counter(
        "decnet_forwarder_gaps",
        "Ranges declared lost (rotated away or deleted before they were read)",
        stream,
        gaps,
    )
    yield _gauge(
        "decnet_forwarder_unacknowledged_bytes",
        "Bytes sent but not yet acknowledged as durable by the master (0 in plain mode)",
        stream,
        max(0, sent - acked),
    )
    yield _gauge(
        "decnet_forwarder_acknowledged_offset_bytes",
        "Logical offset up to which the master acknowledged the stream",
        stream,
        acked,
    )
    yield _gauge(
        "decnet_forwarder_file_lag_bytes",
        "Bytes in the log file (as last looked at) that the master has not acknowledged",
        stream,
        max(0, end - acked),
    )


def _counter(name: str, documentation: str, stream: str, value: float) -> Metric:
    return counter(name, documentation, ["stream"], [([stream], value)])


def _gauge(name: str, documentation: str, stream: str, value: float) -> Metric:
    return gauge(name, documentation, ["stream"], [([stream], value)])


def forwarder_registry(service: ForwarderService, identity: TLSIdentity) -> DaemonMetrics:
    """The forwarder's registry: the common metrics and :class:`ForwarderMetrics`."""
    metrics = daemon_registry("forwarder", identity)
    metrics.add(ForwarderMetrics(service))
    return metrics
