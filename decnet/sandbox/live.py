"""The live view of ``sandbox up``: the host table, then every event as it reaches the master.

Two timers on the injected clock:

* every :data:`~decnet.config.SANDBOX_FEED_POLL` seconds the new lines of the
  master's JSON feeds (``<master>/ingest/<worker>/decnet.jsonl``) are read in
  the thread pool and reported (:class:`~decnet.sandbox.report.FeedEvents`, which
  ``decnet/cli`` prints one line each);
* every :data:`~decnet.config.SANDBOX_HOSTS_POLL` seconds each agent is asked
  for ``/health`` and ``/status`` (AgentClient, persistent mTLS connections,
  one deadline per request), and the log lag is measured (the worker's decoy
  log against the master's mirror).  Each worker's row is updated as its answer
  arrives: a worker that stalls keeps its last row (``waiting`` before its
  first answer) until its deadline, and never holds back the others.  The
  table (:class:`~decnet.sandbox.report.HostTable`) is reported again when
  something in it changes, or after
  :data:`~decnet.config.SANDBOX_TABLE_EVERY` seconds if events scrolled it away.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from decnet import config
from decnet.errors import DecnetError
from decnet.master.agent_client import AgentClient
from decnet.master.registry import Host, Registry
from decnet.sandbox import ISandboxReactor, feeds
from decnet.sandbox.layout import SandboxLayout
from decnet.sandbox.report import FeedEvents, HostRow, HostTable, Report, log_lag, row_from_status
from decnet.threads import run_in_pool
from decnet.tls import TLSIdentity


def read_hosts(layout: SandboxLayout, workers: dict) -> tuple[dict, dict]:
    """The registry's hosts by name, and each worker's (decoy log, mirror) sizes (blocking)."""
    hosts = {h.name: h for h in Registry(layout.master.registry).list()}
    sizes = feeds.sizes(
        {name: (Path(info["decoy_log"]), layout.mirror(name)) for name, info in workers.items()}
    )
    return hosts, sizes


async def host_row(
    reactor: ISandboxReactor,
    identity: TLSIdentity,
    name: str,
    info: dict,
    host: Host | None,
    lag: int,
    clients: dict,
) -> HostRow:
    """Ask one worker's agent for ``/health`` and ``/status``; never raises for its failures.

    ``clients`` caches one AgentClient per worker between calls (the caller closes them).
    """
    if host is None:
        return HostRow(name, info["address"], "DOWN", lag=lag, detail="not enrolled")
    if host.decommissioned:
        old = clients.pop(name, None)
        if old is not None:
            await old.close()
        return HostRow(name, host.address, "decommissioned", lag=lag)
    client = clients.get(name)
    if client is None:
        client = clients[name] = AgentClient(
            reactor, identity, host, timeout=config.SANDBOX_AGENT_TIMEOUT, persistent=True
        )
    try:
        health = await client.health()
        status = await client.status()
    except DecnetError as exc:
        return row_from_status(name, host.address, None, None, lag, str(exc))
    return row_from_status(name, host.address, health, status, lag)


async def host_rows(
    reactor: ISandboxReactor,
    identity: TLSIdentity,
    layout: SandboxLayout,
    workers: dict,
    clients: dict,
) -> list[HostRow]:
    """One :class:`~decnet.sandbox.report.HostRow` per worker of ``sandbox.json`` (all at once)."""
    hosts, sizes = await run_in_pool(reactor, read_hosts, layout, workers)
    rows = await defer.gatherResults(
        [
            defer.ensureDeferred(
                host_row(reactor, identity, n, i, hosts.get(n), log_lag(*sizes[n]), clients)
            )
            for n, i in sorted(workers.items())
        ],
        consumeErrors=True,
    )
    return list(rows)


class LiveLoop:
    """Reports a host table and the event stream until :meth:`stop` (the sandbox's, ``top``'s).

    A subclass says how one round of host probes starts (:meth:`round`); the
    timers, the per-row updates, when the table is due and the feed reading are
    shared.  ``tail`` is the event source: ``skip_to_end()`` and ``read_new()``
    (blocking, run in the pool), as :class:`~decnet.sandbox.feeds.FeedTail` has.
    """

    log = Logger()

    def __init__(self, reactor: ISandboxReactor, report: Report, tail, addresses: dict[str, str]):
        self.reactor = reactor
        self.report = report
        self.tail = tail
        self.addresses = addresses  # worker -> address, for the rows not answered yet
        self.last_keys: tuple | None = None
        self.last_table_at = -1e9
        self.events_since_table = 0
        self.last_event_at = -1e9
        self.last_lags: tuple = ()
        self._loops: list[task.LoopingCall] = []
        self.rows: dict[str, HostRow] = {}
        self.probing: set[str] = set()
        self.pending_table: IDelayedCall | None = None
        self.stopped = False
        self.hosts_poll = config.SANDBOX_HOSTS_POLL

    def start(self) -> defer.Deferred:
        d = run_in_pool(self.reactor, self.tail.skip_to_end)
        d.addCallback(lambda _: self._start_loops())
        return d

    def _start_loops(self) -> None:
        for interval, fn in (
            (self.hosts_poll, self.poll_hosts),
            (config.SANDBOX_FEED_POLL, self.poll_feeds),
        ):
            loop = task.LoopingCall(lambda fn=fn: defer.ensureDeferred(fn()))
            loop.clock = self.reactor
            loop.start(interval, now=True).addErrback(
                lambda f: self.log.failure("The live view stopped", f)
            )
            self._loops.append(loop)

    def stop(self) -> None:
        self.stopped = True
        if self.pending_table is not None and self.pending_table.active():
            self.pending_table.cancel()
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []

    async def round(self) -> dict[str, Callable[[], Coroutine[Any, Any, HostRow]]]:
        """One probe per worker to run now, by name (subclasses)."""
        raise NotImplementedError

    async def poll_hosts(self) -> None:
        """Start a probe of every worker that is not still being probed; do not wait for them.

        Each answer updates that worker's row as it arrives, so a worker that
        stalls (until its deadline) never holds back the rows of the others.
        """
        try:
            probes = await self.round()
        except Exception:
            self.log.failure("Cannot read the registry or the workers' logs")
            return
        for name, probe_fn in sorted(probes.items()):
            if name in self.probing:
                continue  # the last probe has not ended yet (it will, by its deadline)
            self.probing.add(name)
            probe = defer.ensureDeferred(probe_fn())
            probe.addCallback(self.arrived)
            probe.addErrback(self._probe_failed, name)
            probe.addBoth(self._probe_ended, name)

    def _probe_failed(self, failure: Failure, name: str) -> None:
        self.log.failure("Cannot poll {worker}", failure, worker=name)

    def _probe_ended(self, result: object, name: str) -> None:
        self.probing.discard(name)

    def arrived(self, row: HostRow) -> None:
        """A worker answered (or failed): show the table soon if it changed."""
        if self.stopped:
            return
        self.rows[row.worker] = row
        if self.pending_table is None or not self.pending_table.active():
            # Rows that arrive together (the usual case) make one table, not one each.
            self.pending_table = self.reactor.callLater(config.SANDBOX_TABLE_SETTLE, self.show)

    def current_rows(self) -> list[HostRow]:
        return [
            self.rows.get(name) or HostRow(name, address, "waiting")
            for name, address in sorted(self.addresses.items())
        ]

    def show(self) -> None:
        rows = self.current_rows()
        if self.table_due(rows, self.reactor.seconds()):
            self.report(HostTable(tuple(rows)))

    def table_due(self, rows: list[HostRow], now: float) -> bool:
        """Print the table when it changed, or when events scrolled it away a while ago."""
        keys = tuple(r.key() for r in rows)
        lags = tuple(r.lag for r in rows)
        stale = (
            now - self.last_table_at >= config.SANDBOX_TABLE_EVERY
            and now - self.last_event_at >= config.SANDBOX_TABLE_QUIET
            and bool(self.events_since_table or lags != self.last_lags)
        )
        if keys == self.last_keys and not stale:
            return False
        self.last_keys, self.last_lags = keys, lags
        self.last_table_at = now
        self.events_since_table = 0
        return True

    async def poll_feeds(self) -> None:
        try:
            entries = await run_in_pool(self.reactor, self.tail.read_new)
        except Exception:  # an unreadable feed must not end the live view
            self.log.failure("Cannot read the master's feeds")
            return
        if not entries:
            return
        self.report(FeedEvents(tuple(sorted(entries, key=feeds.entry_order))))
        self.events_since_table += len(entries)
        self.last_event_at = self.reactor.seconds()


class LiveView(LiveLoop):
    """The live view of ``sandbox up``: the sandbox's workers, their agents, their feeds."""

    def __init__(
        self,
        reactor: ISandboxReactor,
        report: Report,
        layout: SandboxLayout,
        identity: TLSIdentity,
        workers: dict,
    ):
        tail = feeds.FeedTail({name: layout.feed(name) for name in workers})
        super().__init__(reactor, report, tail, {n: i["address"] for n, i in workers.items()})
        self.layout = layout
        self.identity = identity
        self.workers = workers
        self.clients: dict[str, AgentClient] = {}

    def stop(self) -> None:
        super().stop()
        for client in self.clients.values():
            defer.ensureDeferred(client.close()).addErrback(lambda f: None)
        self.clients = {}

    async def round(self) -> dict[str, Callable[[], Coroutine[Any, Any, HostRow]]]:
        hosts, sizes = await run_in_pool(self.reactor, read_hosts, self.layout, self.workers)

        def probe(name: str, info: dict) -> Callable[[], Coroutine[Any, Any, HostRow]]:
            lag = log_lag(*sizes[name])
            return lambda: host_row(
                self.reactor, self.identity, name, info, hosts.get(name), lag, self.clients
            )

        return {name: probe(name, info) for name, info in self.workers.items()}
