"""``decnet-admin top``: the sandbox's live view, for the real fleet (data only).

:class:`FleetView` is a :class:`~decnet.sandbox.live.LiveLoop`: the same timers,
row updates and "is the table due" rule as ``sandbox up``, reporting the same
objects (:class:`~decnet.sandbox.report.HostTable`,
:class:`~decnet.sandbox.report.FeedEvents`) that ``decnet/cli`` renders with the
same code.  Its rows come from the registry (read again each round, so a newly
enrolled worker appears without a restart), each host's ``check`` probe
(agent, failed services, updater) and the listener's ``workers.json``.

The events come from :func:`event_source`: today the JSON feeds under the
ingest directory, read the way the sandbox reads them; the events index can
take its place without touching the view.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from decnet.listener.workers import LogHealth, log_health, read_state, state_path
from decnet.master import health as rules
from decnet.master.agent_client import HealthResult, Probe, check_host
from decnet.master.registry import Host, Registry
from decnet.revocation import RevocationSet
from decnet.sandbox import ISandboxReactor
from decnet.sandbox.feeds import FeedTail
from decnet.sandbox.live import LiveLoop
from decnet.sandbox.report import HostRow, Report
from decnet.threads import run_in_pool
from decnet.tls import TLSIdentity

FEED_SUFFIX = ".jsonl"
RESCAN_EVERY = 8  # reads of the feeds between two looks for new workers and streams
AGENT_CELL = {rules.HEALTHY: "healthy", rules.DEGRADED: "degraded", rules.UNREACHABLE: "DOWN"}


class FeedFiles:
    """Every worker's JSON feeds under ``directory``, new ones included; blocking (pool).

    Feeds present at :meth:`skip_to_end` are read from their end; a feed that
    appears later (a new worker, a new stream) from its start.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.tail = FeedTail({})
        self.reads = 0

    def _scan(self) -> dict[str, Path]:
        found: dict[str, Path] = {}
        try:
            workers = list(os.scandir(self.directory))
        except FileNotFoundError:
            return found
        for worker in workers:
            if not worker.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(worker.path):
                if entry.name.endswith(FEED_SUFFIX) and entry.is_file(follow_symlinks=False):
                    found[f"{worker.name}/{entry.name}"] = Path(entry.path)
        return found

    def skip_to_end(self) -> None:
        self.tail = FeedTail(self._scan())
        self.tail.skip_to_end()

    def read_new(self) -> list[dict]:
        self.reads += 1
        if self.reads % RESCAN_EVERY == 0:
            for key, path in self._scan().items():
                if key not in self.tail.paths:
                    self.tail.paths[key] = path
                    self.tail.offsets[key] = 0
        return self.tail.read_new()


def event_source(ingest_dir: Path) -> FeedFiles:
    """Where ``top`` reads events from (``skip_to_end`` / ``read_new``, blocking)."""
    return FeedFiles(ingest_dir)


def host_row(result: HealthResult) -> HostRow:
    """One ``check`` result as a row of the live view's host table."""
    return HostRow(
        result.name,
        result.address,
        "BAD REPLY" if result.bad_reply else AGENT_CELL[result.verdict],
        release=result.health.get("release"),
        deckies=result.deckies,
        lag=None if result.logs is None else result.logs.lag,
        detail="" if result.verdict == rules.HEALTHY else result.detail,
        logs=result.logs,
    )


def read_fleet(
    registry: Path, ingest_dir: Path, stale: float
) -> tuple[list[Host], dict[str, LogHealth], float]:
    """The hosts to show and their log pipelines, now (blocking)."""
    hosts = [h for h in Registry(registry).list() if not h.decommissioned]
    try:
        doc = read_state(state_path(ingest_dir))
    except (OSError, ValueError):
        doc = None
    now = time.time()
    return hosts, {h.name: log_health(doc, h.name, now, stale) for h in hosts}, now


class FleetView(LiveLoop):
    """``top``: every enrolled host's health above every worker's events, until :meth:`stop`."""

    def __init__(
        self,
        reactor: ISandboxReactor,
        report: Report,
        *,
        identity: TLSIdentity,
        registry: Path,
        revocations: RevocationSet | None,
        ingest_dir: Path,
        stale: float,
        interval: float,
        timeout: float,
    ) -> None:
        super().__init__(reactor, report, event_source(ingest_dir), {})
        self.identity = identity
        self.registry = registry
        self.revocations = revocations
        self.ingest_dir = ingest_dir
        self.stale = stale
        self.timeout = timeout
        self.hosts_poll = interval

    async def round(self) -> dict[str, Callable[[], Coroutine[Any, Any, HostRow]]]:
        hosts, logs, now = await run_in_pool(
            self.reactor, read_fleet, self.registry, self.ingest_dir, self.stale
        )
        self.addresses = {h.name: h.address for h in hosts}
        for gone in set(self.rows) - set(self.addresses):
            del self.rows[gone]  # decommissioned (or removed) since the last round
        probe = Probe(logs=logs, now=now, stale=self.stale)

        def one(host: Host) -> Callable[[], Coroutine[Any, Any, HostRow]]:
            async def run() -> HostRow:
                result = await check_host(
                    self.reactor, self.identity, host, self.revocations, self.timeout, probe
                )
                return host_row(result)

            return run

        return {h.name: one(h) for h in hosts}
