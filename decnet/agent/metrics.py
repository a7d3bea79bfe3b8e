"""What ``twistd decnet-agent --metrics`` exports (see docs/Metrics.md).

Read at scrape time from the engine's running services, the event log and the
decoy connection budget.  Labels are the decky and service names from the
deployment spec (operator-defined); an attacker's address or input never
becomes a label.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from decnet.agent.engine import FAILED, LISTENING, STARTING, RunningService
from decnet.metrics import counter, daemon_registry, gauge
from decnet.tls import TLSIdentity

if TYPE_CHECKING:
    from decnet.agent.service import AgentService

SERVICE_STATES = (STARTING, LISTENING, FAILED)
DECOY_LABELS = ("decky", "service")


class AgentMetrics:
    """A collector for one agent service."""

    def __init__(self, service: AgentService):
        self.service = service

    def _running(self) -> list[tuple[tuple[str, str], RunningService]]:
        services: dict[tuple[str, str], RunningService] = getattr(
            self.service.engine, "services", {}
        )
        return sorted(services.items())

    def collect(self) -> Iterator[Metric]:
        running = self._running()
        yield counter(
            "decnet_agent_decoy_connections",
            "Connections each decoy service accepted (since it was last started)",
            DECOY_LABELS,
            ((key, r.runtime.connections) for key, r in running),
        )
        yield gauge(
            "decnet_agent_decoy_active_connections",
            "Connections each decoy service holds now",
            DECOY_LABELS,
            ((key, len(r.runtime.active)) for key, r in running),
        )
        yield counter(
            "decnet_agent_decoy_refused_connections",
            "Connections a decoy service refused (its max_connections or the agent's budget)",
            DECOY_LABELS,
            ((key, r.runtime.refused) for key, r in running),
        )
        yield counter(
            "decnet_agent_decoy_events",
            "Events each decoy service emitted (since it was last started)",
            DECOY_LABELS,
            ((key, r.runtime.events) for key, r in running),
        )
        yield gauge(
            "decnet_agent_decoy_state",
            "1 for the state each decoy service is in (failed: it could not listen)",
            (*DECOY_LABELS, "state"),
            (((*key, s), 1 if r.state == s else 0) for key, r in running for s in SERVICE_STATES),
        )
        yield from self._eventlog()

    def _eventlog(self) -> Iterator[Metric]:
        log = self.service.eventlog
        budget = self.service.decoy_budget
        yield counter(
            "decnet_agent_events_written",
            "Event lines written to the log",
            (),
            [((), log.written_lines)],
        )
        yield counter(
            "decnet_agent_events_dropped",
            "Events dropped because the log's queue was full (the disk could not keep up)",
            (),
            [((), log.dropped)],
        )
        yield counter(
            "decnet_agent_event_write_errors",
            "Failed writes of the event log",
            (),
            [((), log.write_errors)],
        )
        yield gauge(
            "decnet_agent_log_queue_bytes",
            "Event bytes queued for the log and not yet written",
            (),
            [((), log.pending_bytes)],
        )
        yield gauge(
            "decnet_agent_decoy_sockets",
            "Sockets the deckies hold (listeners and connections) and the limit",
            ("kind",),
            [(("in_use",), budget.in_use), (("limit",), budget.limit)],
        )


def agent_registry(service: AgentService, identity: TLSIdentity) -> CollectorRegistry:
    """The agent's registry: the common metrics and :class:`AgentMetrics`."""
    registry = daemon_registry("agent", identity)
    registry.register(AgentMetrics(service))
    return registry
