"""``sandbox up``: a master and N workers on loopback, every daemon a real ``twistd`` child.

The sequence (each step printed as it happens):

1. **prepare** (thread): ``init`` the master, enroll ``w1..wN`` with updater
   certificates — or reuse what an earlier ``up`` made (:mod:`.prepare`);
2. **start** the master's ``decnet-listener`` (port 0, learnt from its port file),
   then per worker ``decnet-updater --agent-control spawn`` (it supervises the
   agent from its installed release) and ``decnet-forwarder`` tailing the
   agent's event log (:mod:`.children`), and wait until every updater answers;
3. **release**: build one release tarball of this checkout with an offline
   wheelhouse (:mod:`.wheelhouse`) and push it with the same code path as
   ``decnet-admin update --all`` (:class:`~decnet.master.rollout.Rollout`) to
   every worker whose current release is not already that one;
4. **deploy** the default decky set to every agent through ``AgentClient``
   (the answer comes when every listener is bound);
5. **watch** (:mod:`.live`) until SIGINT, SIGTERM or SIGHUP, then stop every
   child by PID and exit 0.

``sandbox.json`` (:mod:`.state`) records every PID as soon as it exists, so
``sandbox status`` and ``sandbox down`` work from another terminal.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from twisted.internet import defer, task
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from decnet import config, pki
from decnet.cli import output
from decnet.errors import DecnetError, SandboxError
from decnet.master import tar_tree, wheelhouse
from decnet.master.agent_client import AgentClient
from decnet.master.rollout import UPDATED, Rollout, plan_rollout
from decnet.master.updater_client import UpdaterClient
from decnet.sandbox import daemons, state, view
from decnet.sandbox.children import Child, Children
from decnet.sandbox.layout import SandboxLayout, spec_targets
from decnet.sandbox.prepare import Prepared, WorkerPlan, prepare

PROGRESS_EVERY = 10.0  # seconds between "still installing" lines during a release push


class Console:
    """Where ``up`` talks to its operator: whole lines, flushed at once.

    A terminal that went away (a closed pipe, a hung-up tty) must not keep
    ``up`` from stopping its children: output errors switch the console off.
    """

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.broken = False

    def line(self, text: str = "") -> None:
        if self.broken:
            return
        try:
            output.text(text, self.stream)  # worker-supplied text is escaped, like decnet-admin's
        except (OSError, ValueError):
            self.broken = True


def short(path: Path) -> str:
    """``path`` relative to the current directory when it is below it (shorter lines)."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return str(path)


class Sandbox:
    """One ``sandbox up`` run: its children, its state file, its live view."""

    log = Logger()

    def __init__(
        self,
        reactor,
        layout: SandboxLayout,
        *,
        workers: int,
        net: int,
        root: Path,
        wheelhouse_dir: Path | None = None,
        console: Console | None = None,
    ):
        self.reactor = reactor
        self.layout = layout
        self.workers_wanted = workers
        self.net = net
        self.root = root
        self.wheelhouse_dir = wheelhouse_dir
        self.console = console or Console()
        self.started_at = reactor.seconds()
        self.children = Children(reactor, on_exit=self._child_exited)
        self.prepared: Prepared | None = None
        self.release: str | None = None
        self.listener_port: int | None = None
        self.stopping = False
        self.live = None
        self.doc = state.empty_state(net)
        self._pool = reactor.getThreadPool()
        self._save_lock = defer.DeferredLock()
        self._watched: set[str] = set()

    # -- helpers ---------------------------------------------------------------

    def _thread(self, fn, *args, **kw) -> defer.Deferred:
        return deferToThreadPool(self.reactor, self._pool, fn, *args, **kw)

    def say(self, text: str = "") -> None:
        self.console.line(text)

    def elapsed(self) -> str:
        return view.elapsed(self.reactor.seconds() - self.started_at)

    def path(self, p: Path) -> str:
        return short(p)

    @property
    def active(self) -> list[WorkerPlan]:
        return [w for w in self.prepared.workers if w.active] if self.prepared else []

    async def save(self) -> None:
        """Record what runs now in ``sandbox.json`` (one write at a time, in the thread pool)."""
        self.doc["processes"] = {n: r.as_dict() for n, r in self.children.records().items()}
        data = state.dump(self.doc)
        await self._save_lock.run(self._thread, state.write, self.layout.state_file, data)

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
                    f"{words} (see {self.path(child.log)})"
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
        self.say(f"!! {child.name} {child.how}: {words}")
        self.say(f"!! (its log: {self.path(child.log)})")
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
        self.say()
        self.say(
            f"Ready in {self.elapsed()}: {len(self.active)} workers, "
            f"listener on 127.0.0.1:{self.listener_port}, "
            f"logs in {self.path(self.layout.logs_dir)}/"
        )
        # The script as this shell can run it (``.venv/bin/decnet-admin`` under make).
        script = Path(sys.argv[0])
        admin = self.path(script.absolute()) if script.name == "decnet-admin" else "decnet-admin"
        self.say(
            f"Play the attacker from another terminal:  {admin} sandbox poke --dir "
            f"{self.path(self.layout.root)}"
        )
        self.say("Ctrl-C stops every process this command started.")
        self.say()

    async def prepare(self) -> None:
        self.say(f"DECNET sandbox in {self.path(self.layout.root)}")
        prepared = await self._thread(prepare, self.layout, self.workers_wanted, self.net)
        self.prepared = prepared

        how = "created" if prepared.created else "reused"
        self.say(
            f"  master   {self.path(self.layout.master.home)}  CA {how}, fingerprint "
            f"{pki.colon_fingerprint(prepared.ca_fingerprint)[:23]}..."
        )
        for w in prepared.workers:
            if w.active:
                self.say(
                    f"  {w.layout.name:<8} {w.layout.address:<12} {w.action}, bundle "
                    f"{self.path(w.layout.bundle)}"
                )
            else:
                self.say(f"  {w.layout.name:<8} decommissioned at {w.host.revoked_at}: left out")
        if prepared.others:
            self.say(f"  (also enrolled, not started: {', '.join(prepared.others)})")
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
        self.say(
            f"Starting the daemons (real twistd processes, logs in {self.path(layout.logs_dir)}/):"
        )
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
        where = f"{config.SANDBOX_MASTER_HOST}:{self.listener_port}"
        self.say(f"  {name:<14} {where:<30} pid {child.record.pid}")

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
            where = f"{w.address}:{w.updater_port} (agent :{w.agent_port})"
            self.say(f"  {upd:<14} {where:<30} pid {updater.record.pid}")
            where = f"-> {config.SANDBOX_MASTER_HOST}:{self.listener_port}"
            self.say(f"  {fwd:<14} {where:<30} pid {forwarder.record.pid}")
        await self.save()
        waits = [
            defer.ensureDeferred(self._updater_ready(plan, updater)) for plan, updater, _ in spawned
        ]
        await defer.gatherResults(waits, consumeErrors=True).addErrback(_first_error)

    async def _updater_ready(self, plan: WorkerPlan, child: Child) -> None:
        client = UpdaterClient(self.reactor, self.prepared.identity, plan.host, timeout=5.0)

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
        if self.wheelhouse_dir is not None:
            found = await self._thread(wheelhouse.wheels, self.wheelhouse_dir)
            if not found:
                raise SandboxError(f"--wheelhouse {self.wheelhouse_dir} holds no wheels")
            self.say(f"  wheelhouse {self.path(self.wheelhouse_dir)} ({len(found)} wheels, given)")
            return self.wheelhouse_dir
        wanted = await self._thread(wheelhouse.plan, self.root)
        key = wanted.key
        target = wanted.target(self.layout.cache_dir)
        if await self._thread(wheelhouse.is_complete, target):
            found = await self._thread(wheelhouse.wheels, target)
            self.say(f"  wheelhouse {self.path(target)} ({len(found)} wheels, cached)")
            return target
        from decnet.process import run_process

        partial = self.layout.cache_dir / f".wheelhouse-{key}.{os.getpid()}"
        constraints = self.layout.cache_dir / f".constraints-{key}.txt"
        await self._thread(partial.mkdir, parents=True, exist_ok=True)
        await self._thread(constraints.write_text, "\n".join(wanted.pins) + "\n")
        self.say(
            "  building the offline wheelhouse from this environment with pip "
            "(first run only; pip may use its index or cache) ..."
        )
        started = self.reactor.seconds()
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
        found = await self._thread(wheelhouse.wheels, target)
        self.say(
            f"  wheelhouse {self.path(target)} ({len(found)} wheels, built in "
            f"{view.elapsed(self.reactor.seconds() - started)})"
        )
        return target

    async def push_release(self) -> None:
        self.say("Release of this checkout (the same path as `decnet-admin update --all`):")
        wheels = await self.ensure_wheelhouse()
        out_dir = self.layout.cache_dir / "releases"
        archive = await self._thread(tar_tree.build_release, self.root, out_dir, wheelhouse=wheels)
        try:
            self.release = archive.release_id
            self.doc["release"] = archive.release_id
            self.say(
                f"  release {archive.release_id}: {len(archive.files)} files, "
                f"{view.human_bytes(archive.size)}"
            )
            identity = self.prepared.identity
            currents = await defer.gatherResults(
                [defer.ensureDeferred(self._current(p)) for p in self.active],
                consumeErrors=True,
            ).addErrback(_first_error)
            todo = []
            for plan, current in zip(self.active, currents, strict=True):
                if current == archive.release_id:
                    self.say(
                        f"  [{plan.layout.name}] release {current} already installed and current"
                    )
                else:
                    todo.append(plan.host)
            if todo:
                await self._rollout(identity, archive, todo)
        finally:
            await self._thread(archive.path.unlink, missing_ok=True)
        await self.wait_for_agents()

    async def _current(self, plan: WorkerPlan) -> str | None:
        client = UpdaterClient(self.reactor, self.prepared.identity, plan.host, timeout=10.0)
        try:
            return (await client.releases()).get("current")
        finally:
            await client.close()

    async def _rollout(self, identity, archive, hosts) -> None:
        names = [h.name for h in hosts]
        started = self.reactor.seconds()

        def progress(host: str, message: str) -> None:
            self.say(f"  [{host}] {message}")

        def still():
            self.say(
                f"  ... installing on {', '.join(names)} "
                f"({view.elapsed(self.reactor.seconds() - started)}; pip, offline)"
            )

        ticker = task.LoopingCall(still)
        ticker.clock = self.reactor
        ticker.start(PROGRESS_EVERY, now=False)
        try:
            rollout = Rollout(
                self.reactor,
                lambda host: UpdaterClient(self.reactor, identity, host),
                archive,
                concurrency=len(hosts),
                progress=progress,
            )
            results = await rollout.run(plan_rollout(hosts))
        finally:
            ticker.stop()
        bad = [r for r in results if r.result != UPDATED]
        if bad:
            details = "; ".join(f"{r.host}: {r.result}, {r.detail}" for r in bad)
            raise SandboxError(
                f"the release did not install everywhere ({details}); see "
                f"{self.path(self.layout.logs_dir)}/<worker>-updater.log"
            )

    async def wait_for_agents(self) -> None:
        async def one(plan: WorkerPlan):
            client = AgentClient(self.reactor, self.prepared.identity, plan.host, timeout=5.0)

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
        self.say("Deckies (deployed through each agent's mTLS API; every listener bound):")

        async def one(plan: WorkerPlan):
            client = AgentClient(self.reactor, self.prepared.identity, plan.host)
            try:
                return await client.deploy(plan.layout.spec())
            finally:
                await client.close()

        results = await defer.gatherResults(
            [defer.ensureDeferred(one(p)) for p in self.active], consumeErrors=True
        ).addErrback(_first_error)
        failed = []
        for plan, result in zip(self.active, results, strict=True):
            for line in view.deploy_summary(plan.layout.name, plan.layout.spec(), result):
                self.say(line)
            failed += [f"{plan.layout.name}: {f}" for f in result.get("failed", ())]
        total = sum(len(spec_targets(p.layout.spec())) for p in self.active)
        if failed:
            self.say(f"  {len(failed)} of {total} services failed to start:")
            for problem in failed:
                self.say(f"    {problem}")
        else:
            self.say(f"  all {total} services listening")

    # -- stopping -------------------------------------------------------------

    async def shutdown(self) -> None:
        """Stop every child we started (by PID), then record that nothing runs."""
        if self.stopping:
            return
        self.stopping = True
        if self.live is not None:
            self.live.stop()
        live = self.children.records()
        self.say()
        self.say(f"Stopping {len(live)} processes ...")
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
        self.say(
            f"Stopped in {view.elapsed(self.reactor.seconds() - started)}; everything is kept in "
            f"{self.path(self.layout.root)} (`sandbox up` starts it again)."
        )


def _first_error(failure):
    """Unwrap a gatherResults FirstError so that callers see the real exception."""
    failure.trap(defer.FirstError)
    failure.value.subFailure.raiseException()
