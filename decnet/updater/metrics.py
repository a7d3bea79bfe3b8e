"""What ``twistd decnet-updater --metrics`` exports (see docs/Metrics.md).

The updater keeps no counters of its own: :class:`UpdaterMetrics` listens to
the engine's outcomes (:attr:`~decnet.updater.engine.Updater.outcome_listeners`)
and sums them.  Every label value comes from a fixed set.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator

from prometheus_client import Histogram
from prometheus_client.metrics_core import Metric
from twisted.internet.interfaces import IReactorTime

from decnet.errors import RollbackFailed, UpdaterBusy, UpdaterStarting
from decnet.metrics import Build, DaemonMetrics, counter, daemon_registry, gauge
from decnet.tls import TLSIdentity
from decnet.updater.engine import OP_INSTALL, Outcome, Updater
from decnet.updater.releases import OP_ROLLBACK, OP_UPDATE

# What POST /update ended as: the master's outcomes, plus the refusals that changed nothing.
UPDATE_RESULTS = ("updated", "rolled_back", "rollback_failed", "failed", "busy")
ROLLBACK_TRIGGERS = ("automatic", "requested")
# venv creation and pip, from a wheelhouse or a cache: seconds to many minutes.
INSTALL_BUCKETS = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0)


def update_result(outcome: Outcome) -> str:
    """The ``result`` label of one update's outcome (a fixed set)."""
    if isinstance(outcome.error, RollbackFailed):
        return "rollback_failed"
    if isinstance(outcome.error, UpdaterBusy | UpdaterStarting):
        return "busy"
    return outcome.result if outcome.result in UPDATE_RESULTS else "failed"


class UpdaterMetrics:
    """A collector for one updater engine."""

    def __init__(self, updater: Updater, clock: IReactorTime):
        self.updater = updater
        self.clock = clock
        self.updates: collections.Counter[str] = collections.Counter()
        self.rollbacks: collections.Counter[str] = collections.Counter()
        self.last_rollback: float | None = None
        self.install_seconds = Histogram(
            "decnet_updater_install_duration_seconds",
            "Time to create a release's virtualenv and install it (successful installs)",
            buckets=INSTALL_BUCKETS,
            registry=None,
        )
        updater.outcome_listeners.append(self.observe)

    def observe(self, outcome: Outcome) -> None:
        if outcome.op == OP_INSTALL:
            if outcome.error is None:
                self.install_seconds.observe(outcome.seconds)
            return
        if outcome.op == OP_UPDATE:
            result = update_result(outcome)
            self.updates[result] += 1
            if result in ("rolled_back", "rollback_failed"):
                self._rolled_back("automatic")
        elif outcome.op == OP_ROLLBACK and outcome.error is None:
            self._rolled_back("requested")

    def _rolled_back(self, trigger: str) -> None:
        self.rollbacks[trigger] += 1
        self.last_rollback = self.clock.seconds()

    def sample(self) -> Build:
        """Copy the counts (on the reactor); the families are built from the copy."""
        updates, rollbacks = dict(self.updates), dict(self.rollbacks)
        last_rollback, busy = self.last_rollback, self.updater.busy is not None

        def families() -> Iterator[Metric]:
            yield counter(
                "decnet_updater_updates",
                "POST /update calls, by outcome (busy: refused while another operation ran)",
                ("result",),
                (((r,), updates.get(r, 0)) for r in UPDATE_RESULTS),
            )
            yield counter(
                "decnet_updater_rollbacks",
                "Rollbacks: automatic (a new release failed its health check) or requested",
                ("trigger",),
                (((t,), rollbacks.get(t, 0)) for t in ROLLBACK_TRIGGERS),
            )
            if last_rollback is not None:
                yield gauge(
                    "decnet_updater_last_rollback_timestamp_seconds",
                    "When the last rollback finished (Unix time)",
                    (),
                    [((), last_rollback)],
                )
            yield gauge(
                "decnet_updater_busy",
                "1 while an update, rollback or self-update runs",
                (),
                [((), 1 if busy else 0)],
            )

        return families


def updater_registry(updater: Updater, clock: IReactorTime, identity: TLSIdentity) -> DaemonMetrics:
    """The updater's registry: the common metrics and :class:`UpdaterMetrics`."""
    metrics = daemon_registry("updater", identity)
    updates = UpdaterMetrics(updater, clock)
    metrics.registry.register(updates.install_seconds)  # (it locks: safe in any thread)
    metrics.add(updates)
    return metrics
