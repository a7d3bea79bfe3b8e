"""``sandbox up``: a master and N workers on loopback, every daemon a real ``twistd`` child.

The sequence (each step printed as it happens):

1. **prepare** (thread): ``init`` the master, enroll ``w1..wN`` with updater
   certificates — or reuse what an earlier ``up`` made (:mod:`.prepare`);
2. **start** the master's ``decnet-listener`` (port 0, learnt from its port file),
   then per worker ``decnet-updater --agent-control spawn`` (it supervises the
   agent from its installed release) and ``decnet-forwarder`` tailing the
   agent's event log (:mod:`.children`), and wait until every updater answers;
3. **release**: build one wheel release of this checkout with an offline
   wheelhouse (:mod:`.wheelhouse`) and push it with the same code path as
   ``decnet-admin update --all`` (:class:`~decnet.master.rollout.Rollout`) to
   every worker whose current release is not already that one;
4. **deploy** the default decky set to every agent through ``AgentClient``
   (the answer comes when every listener is bound);
5. **watch** (:mod:`.live`) until SIGINT, SIGTERM or SIGHUP, then stop every
   child by PID and exit 0.

Each step is handed to the injected ``report`` callable as a
:mod:`.report` object as it happens; ``decnet/cli`` decides how it reads.

``sandbox.json`` (:mod:`.state`) records every PID as soon as it exists, so
``sandbox status`` and ``sandbox down`` work from another terminal.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from twisted.internet import defer, task
from twisted.logger import Logger

from decnet import config
from decnet.errors import DecnetError, SandboxError
from decnet.master import wheel_release, wheelhouse
from decnet.master.agent_client import AgentClient
from decnet.master.registry import Host
from decnet.master.rollout import UPDATED, Rollout, plan_rollout
from decnet.master.updater_client import UpdaterClient
from decnet.sandbox import ISandboxReactor, daemons, state
from decnet.sandbox.children import Child, Children
from decnet.sandbox.layout import SandboxLayout, short, spec_targets
from decnet.sandbox.prepare import Prepared, WorkerPlan, prepare
from decnet.sandbox.report import (
    AlreadyCurrent,
    ChildExited,
    DaemonsStarting,
    DaemonStarted,
    DeployDone,
    Deployed,
    DeployStarting,
    Preparing,
    Ready,
    ReleaseBuilt,
    ReleaseStarting,
    Report,
    RolloutProgress,
    StillInstalling,
    Stopped,
    Stopping,
    WheelhouseBuilding,
    WheelhouseReady,
    Where,
    ignore,
)
from decnet.threads import run_in_pool, serial_runner
from decnet.tls import TLSIdentity

PROGRESS_EVERY = 10.0  # seconds between "still installing" lines during a release push


def port_in_use_hint(words: str) -> str:
    """What to do when a daemon of the sandbox found its address taken."""
    if "Address already in use" not in words:
        return ""
    return (
        "; another sandbox or program holds that address: run this one on another "
        "loopback network with --net N (and its own --dir), or stop the other one "
        "(`decnet-admin sandbox down --dir DIR`)"
    )


class Sandbox:
    """One ``sandbox up`` run: its children, its state file, its live view."""

    log = Logger()

    def __init__(
        self,
        reactor: ISandboxReactor,
        layout: SandboxLayout,
        *,
        workers: int,
        net: int,
        root: Path,
        wheelhouse_dir: Path | None = None,
        report: Report = ignore,
    ):
        self.reactor = reactor
        self.layout = layout
        self.workers_wanted = workers
        self.net = net
        self.root = root
        self.wheelhouse_dir = wheelhouse_dir
        self.report = report
        self.started_at = reactor.seconds()
        self.children = Children(reactor, on_exit=self._child_exited)
        self.prepared: Prepared | None = None
        self.release: str | None = None
        self.listener_port = 0  # until the listener wrote its port file
        self.stopping = False
        self.live = None
        self.doc = state.empty_state(net)
        self._save_lane = serial_runner(reactor)
        self._watched: set[str] = set()

    # -- helpers ---------------------------------------------------------------

    def _thread(self, fn, *args, **kw) -> defer.Deferred:
        return run_in_pool(self.reactor, fn, *args, **kw)

    def since(self, moment: float) -> float:
        """Seconds on the reactor's clock since ``moment``."""
        return self.reactor.seconds() - moment

    @property
    def identity(self) -> TLSIdentity:
        """The master's identity (once :meth:`prepare` made or loaded it)."""
        if self.prepared is None:
            raise SandboxError("the master is not prepared yet")
        return self.prepared.identity

    @property
    def active(self) -> list[WorkerPlan]:
        return [w for w in self.prepared.workers if w.active] if self.prepared else []

    async def save(self) -> None:
        """Record what runs now in ``sandbox.json`` (one write at a time, in the thread pool)."""
        self.doc["processes"] = {n: r.as_dict() for n, r in self.children.records().items()}
        data = state.dump(self.doc)
        await self._save_lane(state.write, self.layout.state_file, data)

    async def sleep(self, seconds: float) -> None:
        await task.deferLater(self.reactor, seconds, lambda: None)

    async def poll(self, probe, *, what: str, child: Child | None = None, timeout=None):
        """Call ``await probe()`` until it returns something truthy; fail fast if ``child`` dies."""
        timeout = timeout or config.SANDBOX_START_TIMEOUT
        deadline = self.reactor.seconds() + timeout
        if child is not None:
            self._watched.add(child.name)  # its death is reported by the error below
        try:
            return await self._poll(probe, what, child, timeout, deadline)
        finally:
            if child is not None:
                self._watched.discard(child.name)

    async def _poll(self, probe, what, child, timeout, deadline):
        while True:
            if self.stopping:
                raise SandboxError("stopped")
            if child is not None and not child.running:
                words = await self._thread(child.last_words)
                raise SandboxError(
                    f"{child.name} {child.how} while waiting for {what}: "
                    f"{words} (see {short(child.log)}){port_in_use_hint(words)}"
                )
            value = await probe()
            if value:
                return value
            if self.reactor.seconds() > deadline:
                raise SandboxError(f"timed out after {timeout:g}s waiting for {what}")
            await self.sleep(0.1)

    def _child_exited(self, child: Child) -> None:
        if child.name in self._watched:
            return
        d = defer.ensureDeferred(self._report_exit(child))
        d.addErrback(lambda f: self.log.failure("Cannot report the exit of {n}", f, n=child.name))

    async def _report_exit(self, child: Child) -> None:
        words = await self._thread(child.last_words)
        self.report(ChildExited(child.name, child.how, words, child.log))
        await self.save()

    # -- the run ---------------------------------------------------------------

    async def run(self) -> None:
        """Everything up to the live view; raises :class:`SandboxError` on failure."""
        me = os.getpid()
        self.doc["up"] = state.ProcessRecord(
            me, state.start_time(me), tuple(sys.argv), str(self.layout.log("sandbox"))
        ).as_dict()
        self.doc["phase"] = "starting"
        await self.save()
        await self.prepare()
        await self.start_listener()
        await self.start_workers()
        await self.push_release()
        await self.deploy()
        self.doc["phase"] = "running"
        await self.save()
        self.report(
            Ready(
                self.since(self.started_at),
                len(self.active),
                self.listener_port,
                self.layout.logs_dir,
                self.layout.root,
            )
        )

    async def prepare(self) -> None:
        self.report(Preparing(self.layout.root))
        prepared = await self._thread(prepare, self.layout, self.workers_wanted, self.net)
        self.prepared = prepared
        self.report(prepared)
        if not self.active:
            raise SandboxError("no worker left to start (all are decommissioned); use a new --dir")
        self.doc["workers"] = {
            w.layout.name: {
                "address": w.layout.address,
                "agent_port": w.layout.agent_port,
                "updater_port": w.layout.updater_port,
                "decoy_log": str(w.layout.decoy_log),
                "spec": w.layout.spec(),
            }
            for w in self.active
        }

    async def start_listener(self) -> None:
        layout = self.layout
        port_file = layout.listener_port_file
        await self._thread(port_file.unlink, missing_ok=True)
        name = daemons.LISTENER
        argv = daemons.listener_argv(layout)
        self.report(DaemonsStarting(layout.logs_dir))
        child = self.children.spawn(name, argv, layout.log(name), cwd=layout.master.home)
        await self.save()

        async def port():
            try:
                text = await self._thread(port_file.read_text)
            except FileNotFoundError:
                return None
            return int(text) if text.strip().isdigit() else None

        self.listener_port = await self.poll(port, what="the listener's port", child=child)
        self.doc["listener"] = {"host": config.SANDBOX_MASTER_HOST, "port": self.listener_port}
        where = Where(config.SANDBOX_MASTER_HOST, self.listener_port)
        self.report(DaemonStarted(name, _pid(child), where))

    async def start_workers(self) -> None:
        spawned = []
        for plan in self.active:
            w = plan.layout
            upd = daemons.updater_name(w.name)
            argv = daemons.updater_argv(self.layout, w)
            updater = self.children.spawn(upd, argv, self.layout.log(upd), cwd=w.root)
            fwd = daemons.forwarder_name(w.name)
            argv = daemons.forwarder_argv(self.layout, w, self.listener_port)
            forwarder = self.children.spawn(fwd, argv, self.layout.log(fwd), cwd=w.root)
            spawned.append((plan, updater, forwarder))
            where = Where(w.address, w.updater_port)
            self.report(DaemonStarted(upd, _pid(updater), where, agent_port=w.agent_port))
            where = Where(config.SANDBOX_MASTER_HOST, self.listener_port, forwards=True)
            self.report(DaemonStarted(fwd, _pid(forwarder), where))
        await self.save()
        waits = [
            defer.ensureDeferred(self._updater_ready(plan, updater)) for plan, updater, _ in spawned
        ]
        await defer.gatherResults(waits, consumeErrors=True).addErrback(_first_error)

    async def _updater_ready(self, plan: WorkerPlan, child: Child) -> None:
        client = UpdaterClient(self.reactor, self.identity, plan.host, timeout=5.0)

        async def ready():
            try:
                doc = await client.health(timeout=5.0)
            except DecnetError:
                return None
            return doc if doc.get("status") == "ok" else None

        try:
            await self.poll(ready, what=f"the updater of {plan.layout.name}", child=child)
        finally:
            await client.close()

    async def ensure_wheelhouse(self) -> Path:
        """The wheels of the release: given, cached in DIR/cache, or built there now."""
        if self.wheelhouse_dir is not None:
            found = await self._thread(wheelhouse.wheels, self.wheelhouse_dir)
            if not found:
                raise SandboxError(f"--wheelhouse {self.wheelhouse_dir} holds no wheels")
            self.report(WheelhouseReady(self.wheelhouse_dir, len(found), "given"))
            return self.wheelhouse_dir
        wanted = await self._thread(wheelhouse.plan, self.root)
        target = wanted.target(self.layout.cache_dir)
        if await self._thread(wheelhouse.is_complete, target):
            found = await self._thread(wheelhouse.wheels, target)
            self.report(WheelhouseReady(target, len(found), "cached"))
            return target
        started = self.reactor.seconds()
        await self._build_wheelhouse(wanted, target)
        found = await self._thread(wheelhouse.wheels, target)
        self.report(WheelhouseReady(target, len(found), "built", self.since(started)))
        return target

    async def _build_wheelhouse(self, wanted: wheelhouse.Plan, target: Path) -> None:
        """``pip wheel`` into a private directory, renamed into place once complete."""
        from decnet.process import run_process

        key = wanted.key
        partial = self.layout.cache_dir / f".wheelhouse-{key}.{os.getpid()}"
        constraints = self.layout.cache_dir / f".constraints-{key}.txt"
        await self._thread(partial.mkdir, parents=True, exist_ok=True)
        await self._thread(constraints.write_text, "\n".join(wanted.pins) + "\n")
        self.report(WheelhouseBuilding())
        result = await run_process(
            self.reactor,
            wheelhouse.wheel_command(partial, wanted.requirements, constraints),
            timeout=config.DEFAULT_INSTALL_TIMEOUT,
        )
        if not result.ok:
            raise SandboxError(
                f"pip could not build the wheelhouse ({result.describe()}):\n"
                + result.output[-3000:]
            )
        await self._thread(wheelhouse.finish, partial, target)

    async def push_release(self) -> None:
        self.report(ReleaseStarting())
        wheels = await self.ensure_wheelhouse()
        release = await self._thread(wheel_release.prepare, self.root, wheels)
        try:
            self.release = release.release_id
            self.doc["release"] = release.release_id
            everything = release.manifest.wheels
            size = await self._thread(release.size_of, everything)
            self.report(ReleaseBuilt(release.release_id, 1 + len(everything), size))
            todo = await self._not_current(release.release_id)
            if todo:
                await self._rollout(self.identity, release, todo)
        finally:
            await self._thread(release.remove)
        await self.wait_for_agents()

    async def _not_current(self, release: str) -> list[Host]:
        """The hosts whose current release is not ``release`` (the others are reported)."""
        currents = await defer.gatherResults(
            [defer.ensureDeferred(self._current(p)) for p in self.active],
            consumeErrors=True,
        ).addErrback(_first_error)
        todo = []
        for plan, current in zip(self.active, currents, strict=True):
            if current == release:
                self.report(AlreadyCurrent(plan.layout.name, current))
            else:
                todo.append(plan.host)
        return todo

    async def _current(self, plan: WorkerPlan) -> str | None:
        client = UpdaterClient(self.reactor, self.identity, plan.host, timeout=10.0)
        try:
            return (await client.releases()).get("current")
        finally:
            await client.close()

    async def _rollout(
        self, identity: TLSIdentity, release: wheel_release.WheelRelease, hosts: list[Host]
    ) -> None:
        names = tuple(h.name for h in hosts)
        started = self.reactor.seconds()

        def progress(host: str, message: str) -> None:
            self.report(RolloutProgress(host, message))

        def still() -> None:
            self.report(StillInstalling(names, self.since(started)))

        ticker = task.LoopingCall(still)
        ticker.clock = self.reactor
        ticker.start(PROGRESS_EVERY, now=False)
        try:
            tarballs = wheel_release.Tarballs(self.reactor, release)
            rollout = Rollout(
                self.reactor,
                lambda host: UpdaterClient(self.reactor, identity, host),
                await self._thread(release.tarball_for, []),
                concurrency=len(hosts),
                progress=progress,
                archive_for=tarballs.for_client,  # type: ignore[arg-type]
            )
            results = await rollout.run(plan_rollout(hosts))
        finally:
            ticker.stop()
        bad = [r for r in results if r.result != UPDATED]
        if bad:
            details = "; ".join(f"{r.host}: {r.result}, {r.detail}" for r in bad)
            raise SandboxError(
                f"the release did not install everywhere ({details}); see "
                f"{short(self.layout.logs_dir)}/<worker>-updater.log"
            )

    async def wait_for_agents(self) -> None:
        async def one(plan: WorkerPlan):
            client = AgentClient(self.reactor, self.identity, plan.host, timeout=5.0)

            async def healthy():
                try:
                    doc = await client.health()
                except DecnetError:
                    return None
                return doc if doc.get("release") == self.release else None

            try:
                await self.poll(
                    healthy,
                    what=f"the agent of {plan.layout.name} on release {self.release}",
                    child=self.children.children.get(daemons.updater_name(plan.layout.name)),
                )
            finally:
                await client.close()

        await defer.gatherResults(
            [defer.ensureDeferred(one(p)) for p in self.active], consumeErrors=True
        ).addErrback(_first_error)

    async def deploy(self) -> None:
        self.report(DeployStarting())

        async def one(plan: WorkerPlan):
            client = AgentClient(self.reactor, self.identity, plan.host)
            try:
                return await client.deploy(plan.layout.spec())
            finally:
                await client.close()

        results = await defer.gatherResults(
            [defer.ensureDeferred(one(p)) for p in self.active], consumeErrors=True
        ).addErrback(_first_error)
        failed = []
        for plan, result in zip(self.active, results, strict=True):
            self.report(Deployed(plan.layout.name, plan.layout.spec(), result))
            failed += [f"{plan.layout.name}: {f}" for f in result.get("failed", ())]
        total = sum(len(spec_targets(p.layout.spec())) for p in self.active)
        self.report(DeployDone(total, tuple(failed)))

    # -- stopping -------------------------------------------------------------

    async def shutdown(self) -> None:
        """Stop every child we started (by PID), then record that nothing runs."""
        if self.stopping:
            return
        self.stopping = True
        if self.live is not None:
            self.live.stop()
        live = self.children.records()
        self.report(Stopping(len(live)))
        self.doc["phase"] = "stopping"
        try:
            await self.save()
        except Exception:
            self.log.failure("Cannot record the stopping phase")
        started = self.reactor.seconds()
        workers = [
            n
            for plan in (self.active or [])
            for n in (
                daemons.forwarder_name(plan.layout.name),
                daemons.updater_name(plan.layout.name),
            )
        ]
        await self.children.stop_all([workers, [daemons.LISTENER]])
        self.doc.update(phase="stopped", up=None)
        try:
            await self.save()
        except Exception:
            self.log.failure("Cannot record that the sandbox stopped")
        self.report(Stopped(self.since(started), self.layout.root))


def _pid(child: Child) -> int:
    return child.record.pid if child.record else 0


def _first_error(failure):
    """Unwrap a gatherResults FirstError so that callers see the real exception."""
    failure.trap(defer.FirstError)
    failure.value.subFailure.raiseException()
