"""What ``twistd decnet-agent --metrics`` exports (see docs/Metrics.md).

Read at scrape time from the engine's running services, the event log and the
decoy connection budget.  Labels are the decky and service names from the
deployment spec (operator-defined); an attacker's address or input never
becomes a label.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import attrs
from prometheus_client.metrics_core import Metric

from decnet.agent.engine import FAILED, LISTENING, STARTING, RunningService
from decnet.metrics import Build, DaemonMetrics, counter, daemon_registry, gauge
from decnet.tls import TLSIdentity

if TYPE_CHECKING:
    from decnet.agent.service import AgentService

SERVICE_STATES = (STARTING, LISTENING, FAILED)
DECOY_LABELS = ("decky", "service")


class AgentMetrics:
    """A collector for one agent service."""

    def __init__(self, service: AgentService):
        self.service = service

    def sample(self) -> Build:
        """Copy the counts (on the reactor); the families are built from the copy."""
        services: dict[tuple[str, str], RunningService] = getattr(
            self.service.engine, "services", {}
        )
        log = self.service.eventlog
        budget = self.service.decoy_budget
        sample = AgentSample(
            decoys=[
                DecoyCounts(
                    key,
                    r.runtime.connections,
                    len(r.runtime.active),
                    r.runtime.refused,
                    r.runtime.events,
                    r.state,
                )
                for key, r in sorted(services.items())
            ],
            written=log.written_lines,
            dropped=log.dropped,
            write_errors=log.write_errors,
            queued=log.pending_bytes,
            sockets=budget.in_use,
            socket_limit=budget.limit,
        )
        return sample.families


@attrs.frozen
class DecoyCounts:
    key: tuple[str, str]  # (decky, service)
    connections: int
    active: int
    refused: int
    events: int
    state: str


@attrs.frozen
class AgentSample:
    """The agent's counts at one scrape (plain data)."""

    decoys: list[DecoyCounts]
    written: int
    dropped: int
    write_errors: int
    queued: int
    sockets: int
    socket_limit: int

    def families(self) -> Iterator[Metric]:
        decoys = self.decoys
        for kind, name, documentation, field in (
            (
                counter,
                "decnet_agent_decoy_connections",
                "Connections each decoy service accepted (since it was last started)",
                "connections",
            ),
            (
                gauge,
                "decnet_agent_decoy_active_connections",
                "Connections each decoy service holds now",
                "active",
            ),
            (
                counter,
                "decnet_agent_decoy_refused_connections",
                "Connections a decoy service refused (its max_connections or the agent's budget)",
                "refused",
            ),
            (
                counter,
                "decnet_agent_decoy_events",
                "Events each decoy service emitted (since it was last started)",
                "events",
            ),
        ):
            yield kind(
                name, documentation, DECOY_LABELS, ((d.key, getattr(d, field)) for d in decoys)
            )
        yield gauge(
            "decnet_agent_decoy_state",
            "1 for the state each decoy service is in (failed: it could not listen)",
            (*DECOY_LABELS, "state"),
            (((*d.key, s), 1 if d.state == s else 0) for d in decoys for s in SERVICE_STATES),
        )
        yield from self._eventlog()

    def _eventlog(self) -> Iterator[Metric]:
        for name, documentation, value in (
            ("decnet_agent_events_written", "Event lines written to the log", self.written),
            (
                "decnet_agent_events_dropped",
                "Events dropped because the log's queue was full (the disk could not keep up)",
                self.dropped,
            ),
            (
                "decnet_agent_event_write_errors",
                "Failed writes of the event log",
                self.write_errors,
            ),
        ):
            yield counter(name, documentation, (), [((), value)])
        yield gauge(
            "decnet_agent_log_queue_bytes",
            "Event bytes queued for the log and not yet written",
            (),
            [((), self.queued)],
        )
        yield gauge(
            "decnet_agent_decoy_sockets",
            "Sockets the deckies hold (listeners and connections) and the limit",
            ("kind",),
            [(("in_use",), self.sockets), (("limit",), self.socket_limit)],
        )


def agent_registry(service: AgentService, identity: TLSIdentity) -> DaemonMetrics:
    """The agent's registry: the common metrics and :class:`AgentMetrics`."""
    metrics = daemon_registry("agent", identity)
    metrics.add(AgentMetrics(service))
    return metrics
