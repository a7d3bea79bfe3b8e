"""What ``decnet-admin decommission`` does on the worker before it revokes: best effort.

1. **teardown**: the agent tears down every decky (``POST /teardown``), so nothing
   new is logged;
2. **drain**: the master waits (``--drain-timeout``) until the log listener has
   everything the forwarder read: its state file (``workers.json``) shows a
   STATUS the forwarder sent after the teardown, and a log lag of 0 bytes;
3. **forwarder**: the updater stops the forwarder's unit (``POST /forwarder/stop``,
   ``systemctl stop decnet-forwarder.service``).  The agent cannot: the forwarder
   is another user's process, which the updater already starts after the first
   release (docs/Operations.md, "Decommissioning a worker").

Each step is reported (:class:`Step`) and none stops the next, nor the revocation
that follows: a worker that is gone, unreachable or lying must not keep its
certificates valid.  Lines the forwarder had not shipped when it stopped stay in
the worker's log file; the step says how many bytes (:attr:`Step.unshipped`).

:func:`drain_verdict` is the pure decision over one read of the state file;
:func:`clean_up` runs the steps on an injected reactor.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import task
from twisted.internet.interfaces import IReactorTime

from decnet.errors import DecnetError
from decnet.listener.workers import (
    ACK,
    CONNECTED,
    NO_STATE,
    log_health,
    read_state,
    state_path,
)
from decnet.master.agent_client import AgentClient
from decnet.master.registry import Host
from decnet.master.updater_client import UpdaterClient
from decnet.revocation import RevocationSet
from decnet.threads import run_in_pool
from decnet.tls import TLSIdentity

DONE, FAILED, SKIPPED = "done", "failed", "skipped"
DRAIN_TIMEOUT = 10.0  # seconds decommission waits for the forwarder to ship what it read
DRAIN_POLL = 0.5  # seconds between two reads of the listener's state file


@attrs.frozen
class Step:
    """One best-effort step: ``state`` is done, failed or skipped; ``detail`` says what."""

    state: str
    detail: str
    unshipped: int | None = None  # forwarder: bytes it had not shipped when stopped

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "detail": self.detail}


@attrs.frozen
class Drain:
    """One read of the listener's state: ``settled`` (stop waiting) and the lag in bytes."""

    settled: bool
    lag: int | None  # None: unknown (no state, never connected, plain mode)
    connected: bool = False
    state: str = CONNECTED  # the listener's view (decnet.listener.workers.LogHealth.state)


def _number(value: object) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return float(value) if ok and math.isfinite(float(value)) else None  # type: ignore[arg-type]


def drain_verdict(doc: dict[str, Any] | None, worker: str, since: float, now: float) -> Drain:
    """Whether the forwarder of ``worker`` has shipped everything it read (pure).

    ``doc`` is the listener's state (:func:`decnet.listener.workers.read_state`);
    ``since`` is when the teardown ended.  A worker that is not connected, or
    that ships only in plain mode (no STATUS, so no lag), settles at once:
    waiting would not change it.  Connected, it settles when every acknowledged
    stream has a STATUS from ``since`` on with a lag of 0.
    """
    health = log_health(doc, worker, now, math.inf)
    if doc is None or health.state != CONNECTED:
        return Drain(True, health.lag, state=health.state)
    streams = doc["workers"][worker].get("streams")
    streams = streams if isinstance(streams, dict) else {}
    acked = [s for s in streams.values() if isinstance(s, dict) and s.get("mode") == ACK]
    if not acked:
        return Drain(True, None, connected=True)
    fresh = all((_number(s.get("reported_at")) or -math.inf) >= since for s in acked)
    shipped = all(type(s.get("lag")) is int and s["lag"] == 0 for s in acked)
    return Drain(fresh and shipped, health.lag, connected=True)


def read_drain(ingest_dir: Path, worker: str, since: float, now: float) -> Drain:
    """:func:`drain_verdict` over the state file in ``ingest_dir`` (blocking, a small file)."""
    try:
        doc = read_state(state_path(ingest_dir))
    except (OSError, ValueError):
        doc = None
    return drain_verdict(doc, worker, since, now)


async def wait_drained(
    clock: IReactorTime,
    read: Callable[[], Awaitable[Drain]],
    timeout: float,
    interval: float = DRAIN_POLL,
) -> Drain:
    """Read until settled or ``timeout`` seconds on ``clock``; the last read.

    ``read`` answers later (a read of the state file in a thread).
    """
    deadline = clock.seconds() + timeout
    drain = await read()
    while not drain.settled and clock.seconds() < deadline:
        await task.deferLater(clock, interval, lambda: None)
        drain = await read()
    return drain


def drained_text(drain: Drain) -> str:
    """What a stopped forwarder left behind, for the operator."""
    if drain.lag == 0:
        return "it had shipped every line it read"
    if drain.lag is None:
        how = {
            NO_STATE: "no log listener state (workers.json) in the ingest directory",
            CONNECTED: "connected, in plain mode",
        }.get(drain.state, "not connected to the listener")
        return f"shipping state unknown ({how}); unshipped lines stay in the worker's log"
    return f"{drain.lag} bytes it had not shipped stay in the worker's log"


@attrs.frozen
class Cleanup:
    teardown: Step
    forwarder: Step


def skipped(host: Host | None, no_teardown: bool) -> str | None:
    """Why the steps are skipped for ``host``, or ``None`` when they run."""
    if host is None:
        return "never joined"
    if host.decommissioned:
        return "already decommissioned"
    if no_teardown:
        return "--no-teardown"
    return None


@attrs.define
class Retirement:
    """The steps for one host, with what they need injected."""

    reactor: Any  # IReactorTCP + IReactorTime (treq's needs)
    identity: TLSIdentity
    host: Host
    revocations: RevocationSet
    ingest_dir: Path
    timeout: Callable[[], float]  # the seconds left of the step's budget
    drain_timeout: float = DRAIN_TIMEOUT
    progress: Callable[[str], object] = lambda step: None
    now: Callable[[], float] | None = None  # wall clock, as workers.json is written

    def _now(self) -> float:
        return self.now() if self.now is not None else self.reactor.seconds()

    async def teardown(self) -> Step:
        self.progress("teardown")
        client = AgentClient(self.reactor, self.identity, self.host, revocations=self.revocations)
        try:
            result = await client.teardown(None, timeout=self.timeout())
        except DecnetError as exc:
            return Step(FAILED, str(exc))
        finally:
            await client.close()
        removed = len(result.get("removed") or [])
        return Step(DONE if result.get("ok") else FAILED, f"{removed} services stopped")

    async def forwarder(self, since: float) -> Step:
        if not self.host.updater_fingerprint:
            return Step(SKIPPED, "no updater enrolled: stop decnet-forwarder on the host itself")
        self.progress("drain")
        drain = await wait_drained(
            self.reactor,
            # (the listener's state file grows with the fleet: read off the reactor)
            lambda: run_in_pool(
                self.reactor, read_drain, self.ingest_dir, self.host.name, since, self._now()
            ),
            self.drain_timeout,
        )
        self.progress("forwarder")
        return await self._stop(drain)

    async def _stop(self, drain: Drain) -> Step:
        client = UpdaterClient(self.reactor, self.identity, self.host, revocations=self.revocations)
        try:
            result = await client.stop_forwarder(timeout=self.timeout())
        except DecnetError as exc:
            return Step(FAILED, f"{exc}; {drained_text(drain)}", drain.lag)
        finally:
            await client.close()
        if result["result"] == "not_managed":
            return Step(
                SKIPPED,
                "its updater does not run the forwarder (--agent-control spawn): stop it "
                "where it runs",
                drain.lag,
            )
        units = ", ".join(result["units"]) or "no unit"
        return Step(DONE, f"stopped {units}; {drained_text(drain)}", drain.lag)


async def clean_up(retirement: Retirement) -> Cleanup:
    """Teardown, drain, forwarder stop for one host; every step reported, none fatal."""
    teardown = await retirement.teardown()
    forwarder = await retirement.forwarder(since=retirement._now())
    return Cleanup(teardown, forwarder)
