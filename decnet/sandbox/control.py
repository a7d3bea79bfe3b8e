"""``sandbox status`` and ``sandbox down``: from another terminal, by recorded PID only.

Both read ``sandbox.json`` (:mod:`decnet.sandbox.state`).  A recorded PID is
only believed, signalled or waited for while its start time still matches the
record, so a PID the kernel gave to some other process since is never touched.

``down`` asks ``up`` to stop (SIGTERM: it stops its children in order) and
waits for it; when ``up`` is gone but children survive (``up`` was ``kill
-9``-ed), it stops those itself: SIGTERM, a grace period on the clock, SIGKILL,
then SIGKILL to whatever is left in each child's process group (a spawned
agent, a pip the updater was running).  Running it again finds nothing and
exits 0.

Both return data (:class:`~decnet.sandbox.report.StatusReport`,
:class:`~decnet.sandbox.report.DownReport`; ``down`` also reports each step
as it happens); ``decnet/cli`` decides how it reads.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable

from twisted.internet import defer, task

from decnet import config
from decnet.errors import DecnetError
from decnet.sandbox import ISandboxReactor, daemons, state
from decnet.sandbox.layout import SandboxLayout
from decnet.sandbox.report import (
    DownReport,
    HostRow,
    LeftoverKilled,
    LeftoversStopping,
    ProcessRow,
    Report,
    StatusReport,
    UpAsked,
    UpKilled,
    Where,
    ignore,
)
from decnet.threads import run_in_pool
from decnet.tls import TLSIdentity

UP_STOP_TIMEOUT = 2 * config.SANDBOX_STOP_GRACE + 15.0  # `up` stops its children in two waves
GONE_POLL = 0.1  # seconds between two looks at whether a recorded process has ended
KILLED_WAIT = 10.0  # seconds for the kernel to reap what got SIGKILL


def process_rows(doc: dict) -> list[tuple[str, state.ProcessRecord, bool]]:
    """``(name, record, still running)`` for ``up`` and every recorded child."""
    rows = []
    up = state.up_record(doc)
    if up is not None:
        rows.append(("up", up, state.is_running(up)))
    for name, record in sorted(state.processes(doc).items(), key=lambda kv: process_order(kv[0])):
        rows.append((name, record, state.is_running(record)))
    return rows


ROLE_ORDER = {"updater": 0, "agent": 1, "forwarder": 2}


def process_order(name: str) -> tuple:
    """The listener first, then per worker (numerically) its updater, agent, forwarder."""
    if name == "listener":
        return (0, 0, 0, name)
    worker, _, role = name.rpartition("-")
    number = int(worker[1:]) if worker[1:].isdigit() else 0
    return (1, number, ROLE_ORDER.get(role, 9), name)


def row_order(row: ProcessRow) -> tuple:
    """``up`` first, then :func:`process_order`."""
    return (-1,) if row.name == "up" else process_order(row.name)


PORT_OF_ROLE = {"updater": "updater_port", "agent": "agent_port"}


def where_of(name: str, doc: dict) -> Where | None:
    """Where process ``name`` of the sandbox in ``doc`` listens (or, a forwarder, sends)."""
    listener = doc.get("listener") or {}
    if name == "listener":
        return Where(listener.get("host"), listener.get("port")) if listener else None
    worker, _, role = name.rpartition("-")
    info = (doc.get("workers") or {}).get(worker) or {}
    if role in PORT_OF_ROLE:
        return Where(info.get("address"), info.get(PORT_OF_ROLE[role]))
    if role == "forwarder" and listener:
        return Where(listener.get("host"), listener.get("port"), forwards=True)
    return None


def recorded_rows(doc: dict) -> list[ProcessRow]:
    """``up`` and every child ``sandbox.json`` records, each with whether it still runs."""
    return [
        ProcessRow(name, record.pid, alive, record.log, where_of(name, doc))
        for name, record, alive in process_rows(doc)
    ]


def agent_rows(layout: SandboxLayout, doc: dict, agents: dict[str, dict]) -> list[ProcessRow]:
    """The agents the updaters report running (they are the updaters' children, not ours)."""
    rows = []
    for worker, agent in agents.items():
        if agent.get("pid"):
            name = daemons.agent_name(worker)
            log = str(layout.log(name))
            rows.append(
                ProcessRow(name, agent["pid"], bool(agent.get("running")), log, where_of(name, doc))
            )
    return rows


async def agent_processes(
    reactor: ISandboxReactor, identity: TLSIdentity, layout: SandboxLayout, workers: Iterable[str]
) -> dict[str, dict]:
    """What each worker's updater says about the agent it supervises (pid, running)."""
    from decnet.master.registry import Registry
    from decnet.master.updater_client import UpdaterClient

    registry = Registry(layout.master.registry)
    hosts = await run_in_pool(reactor, registry.list)
    by_name = {h.name: h for h in hosts}

    async def one(name: str) -> dict:
        host = by_name.get(name)
        if host is None or host.decommissioned or not host.has_updater:
            return {}
        client = UpdaterClient(reactor, identity, host, timeout=5.0)
        try:
            return (await client.health(timeout=5.0)).get("agent") or {}
        except DecnetError:
            return {}
        finally:
            await client.close()

    names = sorted(workers)
    found = await defer.gatherResults([defer.ensureDeferred(one(n)) for n in names])
    return dict(zip(names, found, strict=True))


async def ask_workers(
    reactor: ISandboxReactor, layout: SandboxLayout, workers: dict
) -> tuple[list[HostRow], dict[str, dict]]:
    """Each worker's host row (its agent's answers) and what its updater says of the agent."""
    from decnet.sandbox.live import host_rows

    identity = await run_in_pool(reactor, TLSIdentity.master, layout.master)
    clients: dict = {}
    try:
        hosts = await host_rows(reactor, identity, layout, workers, clients)
    finally:
        for client in clients.values():
            await client.close()
    return hosts, await agent_processes(reactor, identity, layout, workers)


async def status(reactor: ISandboxReactor, layout: SandboxLayout) -> StatusReport:
    """What runs of the sandbox in ``layout``, and what each worker's agent answers."""
    doc = await run_in_pool(reactor, state.load, layout.state_file)
    if doc is None:
        return StatusReport(layout.root, found=False)
    rows = recorded_rows(doc)
    hosts: list[HostRow] = []
    if any(r.running for r in rows) and layout.master.master_cert.exists():
        hosts, agents = await ask_workers(reactor, layout, doc.get("workers") or {})
        rows += agent_rows(layout, doc, agents)
    return StatusReport(
        layout.root,
        found=True,
        phase=doc.get("phase"),
        listener=doc.get("listener"),
        release=doc.get("release"),
        processes=tuple(sorted(rows, key=row_order)),
        hosts=tuple(hosts),
    )


async def _wait_gone(reactor: ISandboxReactor, records, timeout: float) -> bool:
    deadline = reactor.seconds() + timeout
    while any(state.is_running(r) for r in records):
        if reactor.seconds() > deadline:
            return False
        await task.deferLater(reactor, GONE_POLL, lambda: None)
    return True


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


async def _stop_up(reactor: ISandboxReactor, up: state.ProcessRecord, report: Report) -> None:
    """``up`` got SIGTERM: wait for it to stop its children, SIGKILL it if it does not."""
    report(UpAsked(up.pid))
    if not await _wait_gone(reactor, [up], UP_STOP_TIMEOUT):
        report(UpKilled(up.pid, UP_STOP_TIMEOUT))
        state.signal_if_running(up, signal.SIGKILL)
        await _wait_gone(reactor, [up], KILLED_WAIT)


async def _stop_leftovers(
    reactor: ISandboxReactor, children: dict[str, state.ProcessRecord], report: Report
) -> None:
    """SIGTERM the children that outlived ``up``, a grace period, SIGKILL, their groups."""
    alive = {n: r for n, r in children.items() if state.is_running(r)}
    if not alive:
        return
    report(LeftoversStopping(tuple(sorted(alive))))
    for record in alive.values():
        state.signal_if_running(record, signal.SIGTERM)
    if not await _wait_gone(reactor, alive.values(), config.SANDBOX_STOP_GRACE):
        for name, record in alive.items():
            if state.signal_if_running(record, signal.SIGKILL):
                report(LeftoverKilled(name, record.pid))
        await _wait_gone(reactor, alive.values(), KILLED_WAIT)
    # Each child leads its own process group (decnet.sandbox.children); what it
    # started (an agent, a pip) may outlive it.  We saw each leader alive, and a
    # group id is not given to anyone else while the group has a member left.
    for record in alive.values():
        _killpg(record.pid)


async def down(
    reactor: ISandboxReactor, layout: SandboxLayout, report: Report = ignore
) -> DownReport:
    """Stop the sandbox in ``layout`` whatever state it is in (progress goes to ``report``)."""
    doc = await run_in_pool(reactor, state.load, layout.state_file)
    if doc is None:
        return DownReport(layout.root, found=False)
    up = state.up_record(doc)
    if up is not None and state.signal_if_running(up, signal.SIGTERM):
        await _stop_up(reactor, up, report)
        doc = await run_in_pool(reactor, state.load, layout.state_file) or doc
    children = state.processes(doc)
    await _stop_leftovers(reactor, children, report)
    left = [n for n, r in children.items() if state.is_running(r)]
    if up is not None and state.is_running(up):
        left.append("up")
    if left:
        return DownReport(layout.root, found=True, still_running=tuple(left))
    doc.update(phase="stopped", up=None, processes={})
    await run_in_pool(reactor, state.save, layout.state_file, doc)
    return DownReport(layout.root, found=True)
