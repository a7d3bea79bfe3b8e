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
"""

from __future__ import annotations

import os
import signal

import attrs
from twisted.internet import defer, task

from decnet import config
from decnet.cli import output
from decnet.errors import DecnetError
from decnet.sandbox import daemons, state, view
from decnet.sandbox.layout import SandboxLayout
from decnet.threads import run_in_pool

UP_STOP_TIMEOUT = 2 * config.SANDBOX_STOP_GRACE + 15.0  # `up` stops its children in two waves


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


async def agent_processes(reactor, identity, layout: SandboxLayout, workers) -> dict[str, dict]:
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


def _address(name: str, doc: dict) -> str:
    listener = doc.get("listener") or {}
    if name == "listener":
        return f"{listener.get('host')}:{listener.get('port')}" if listener else ""
    worker, _, role = name.rpartition("-")
    info = (doc.get("workers") or {}).get(worker) or {}
    if role == "updater":
        return f"{info.get('address')}:{info.get('updater_port')}"
    if role == "agent":
        return f"{info.get('address')}:{info.get('agent_port')}"
    if role == "forwarder" and listener:
        return f"-> {listener.get('host')}:{listener.get('port')}"
    return ""


async def status(reactor, layout: SandboxLayout, say, *, as_json: bool = False) -> int:
    """Print what runs; 0 only when ``up``, every child and every active agent are up."""
    doc = await run_in_pool(reactor, state.load, layout.state_file)
    if doc is None:
        if as_json:
            output.print_json({"dir": str(layout.root), "healthy": False, "processes": []})
        else:
            say(f"No sandbox in {layout.root} (start one with `decnet-admin sandbox up`).")
        return 1
    rows = [(n, r.pid, alive, r.log) for n, r, alive in process_rows(doc)]
    up_alive = any(name == "up" and alive for name, _, alive, _ in rows)
    any_alive = any(alive for _, _, alive, _ in rows)
    workers = doc.get("workers") or {}
    hosts: list[view.HostRow] = []
    if any_alive and layout.master.master_cert.exists():
        from decnet.sandbox.live import host_rows
        from decnet.tls import TLSIdentity

        identity = await run_in_pool(reactor, TLSIdentity.master, layout.master)
        clients: dict = {}
        try:
            hosts = await host_rows(reactor, identity, layout, workers, clients)
        finally:
            for client in clients.values():
                await client.close()
        agents = await agent_processes(reactor, identity, layout, workers)
        for worker, agent in agents.items():
            if agent.get("pid"):
                log = str(layout.log(daemons.agent_name(worker)))
                rows.append(
                    (daemons.agent_name(worker), agent["pid"], bool(agent.get("running")), log)
                )
        rows.sort(key=lambda row: (-1,) if row[0] == "up" else process_order(row[0]))
    agents_ok = all(h.agent in ("up", "decommissioned") for h in hosts)
    healthy = up_alive and all(alive for _, _, alive, _ in rows) and bool(hosts) and agents_ok
    if as_json:
        output.print_json(
            {
                "dir": str(layout.root),
                "phase": doc.get("phase"),
                "healthy": healthy,
                "listener": doc.get("listener"),
                "release": doc.get("release"),
                "processes": [
                    {"name": n, "pid": pid, "running": alive, "log": log}
                    for n, pid, alive, log in rows
                ],
                "hosts": [attrs.asdict(h) for h in hosts],
            }
        )
        return 0 if healthy else 1
    say(f"Sandbox in {layout.root}: {doc.get('phase', '?')}")
    if not rows:
        say("  nothing runs (start it with `decnet-admin sandbox up`).")
        return 1
    table = [
        (n, pid, "running" if alive else "GONE", _address(n, doc), log or "")
        for n, pid, alive, log in rows
    ]
    say(output.table(("PROCESS", "PID", "STATE", "ADDRESS", "LOG"), table))
    if hosts:
        say("")
        say(view.host_table(hosts))
    if not up_alive and any_alive:
        say("")
        say(
            "`sandbox up` is gone but some of its processes still run: `decnet-admin sandbox down`."
        )
    return 0 if healthy else 1


async def _wait_gone(reactor, records, timeout: float) -> bool:
    deadline = reactor.seconds() + timeout
    while any(state.is_running(r) for r in records):
        if reactor.seconds() > deadline:
            return False
        await task.deferLater(reactor, 0.1, lambda: None)
    return True


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


async def down(reactor, layout: SandboxLayout, say) -> int:
    """Stop the sandbox in ``layout`` whatever state it is in; 0 once nothing is left."""
    doc = await run_in_pool(reactor, state.load, layout.state_file)
    if doc is None:
        say(f"No sandbox in {layout.root}; nothing to stop.")
        return 0
    up = state.up_record(doc)
    if up is not None and state.signal_if_running(up, signal.SIGTERM):
        say(f"Asked `sandbox up` (pid {up.pid}) to stop its processes; waiting ...")
        if not await _wait_gone(reactor, [up], UP_STOP_TIMEOUT):
            say(f"`sandbox up` (pid {up.pid}) did not stop in {UP_STOP_TIMEOUT:g}s; killing it")
            state.signal_if_running(up, signal.SIGKILL)
            await _wait_gone(reactor, [up], 10.0)
        doc = await run_in_pool(reactor, state.load, layout.state_file) or doc
    children = state.processes(doc)
    alive = {n: r for n, r in children.items() if state.is_running(r)}
    if alive:
        say(f"Stopping {len(alive)} leftover processes: {', '.join(sorted(alive))}")
        for record in alive.values():
            state.signal_if_running(record, signal.SIGTERM)
        if not await _wait_gone(reactor, alive.values(), config.SANDBOX_STOP_GRACE):
            for name, record in alive.items():
                if state.signal_if_running(record, signal.SIGKILL):
                    say(f"  {name} (pid {record.pid}) ignored SIGTERM; killed")
            await _wait_gone(reactor, alive.values(), 10.0)
        # Each child leads its own process group (decnet.sandbox.children); what it
        # started (an agent, a pip) may outlive it.  We saw each leader alive, and a
        # group id is not given to anyone else while the group has a member left.
        for record in alive.values():
            _killpg(record.pid)
    left = [n for n, r in children.items() if state.is_running(r)]
    if up is not None and state.is_running(up):
        left.append("up")
    if left:
        say(f"Still running: {', '.join(left)}")
        return 1
    doc.update(phase="stopped", up=None, processes={})
    await run_in_pool(reactor, state.save, layout.state_file, doc)
    say("Nothing of the sandbox runs any more.")
    return 0
