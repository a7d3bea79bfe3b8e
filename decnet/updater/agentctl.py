"""Starting and restarting the agent: through systemd, or as the updater's own child.

Two controls with one interface (``restart``, ``stop``, ``exited_since_start``,
``recent_output``, ``release_ready``, ``stop_companions``):

* :class:`SystemdAgent` runs ``systemctl restart decnet-agent.service`` (and
  ``journalctl`` for the output when a release fails) through ``spawnProcess``;
  the unit runs ``<install-dir>/current/venv/bin/twistd``.
* :class:`SpawnedAgent` supervises the agent as a child process (the local
  sandbox, the tests) with :class:`decnet.process.Supervisor`: it starts
  ``releases/<id>/venv/bin/python`` by its *real* release path, so the agent
  reports the release it actually runs; it restarts a crashed agent with a
  backoff, and stops it by signalling the child it spawned.

Neither ever kills by name or scans ``/proc``.  A spawned agent must not outlive
an updater that was ``kill -9``-ed (it would hold the port against the next
one): it is spawned with ``PR_SET_PDEATHSIG`` (``ProcessSpec.die_with_parent``).
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import ClassVar

import attrs
from twisted.internet.interfaces import IReactorProcess
from twisted.logger import Logger

from decnet import config
from decnet.errors import AgentControlFailed
from decnet.process import (
    ChildProtocol,
    OutputTail,
    ProcessSpec,
    RestartPolicy,
    Started,
    Supervisor,
    SupervisorEvent,
    child_env,
    run_process,
)

# Runs under the release's own python, so it imports the release's twistd and
# plugins (``python -c``: ``sys.argv[0]`` is ``-c`` until it is renamed).
RUN_TWISTD = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"


def agent_argv(
    release_dir: Path,
    *,
    bundle: str,
    listen: str,
    state_dir: str | None = None,
    log_file: str | None = None,
    twistd_log: str | None = None,
) -> list[str]:
    """The command that runs ``twistd decnet-agent`` from ``release_dir``'s venv.

    ``twistd_log``: the agent's own twistd log file (``--logfile``); without it
    the agent logs to its output, which the updater keeps (the tail of it).
    """
    python = str(Path(release_dir) / config.RELEASE_VENV_DIR / "bin" / "python")
    argv = [python, "-c", RUN_TWISTD, "--nodaemon", "--pidfile="]
    if twistd_log:
        argv += ["--logfile", twistd_log]
    argv += ["decnet-agent", "--bundle", bundle, "--listen", listen]
    if state_dir:
        argv += ["--state-dir", state_dir]
    if log_file:
        argv += ["--log-file", log_file]
    return argv


@attrs.define
class SystemdAgent:
    """``systemctl restart <unit>``; the unit's ExecStart runs from ``current``."""

    control: ClassVar[str] = "systemd"
    log: ClassVar[Logger] = Logger()

    reactor: IReactorProcess
    unit: str = config.DEFAULT_AGENT_UNIT
    systemctl: str = attrs.field(default="systemctl", kw_only=True)
    journalctl: str = attrs.field(default="journalctl", kw_only=True)
    timeout: float = attrs.field(default=90.0, kw_only=True)
    # Units whose ExecStart runs from ``current`` too (the forwarder): started once a
    # release is current and healthy, so none is started before the first release exists.
    companions: tuple[str, ...] = attrs.field(default=(), kw_only=True)

    async def _systemctl(self, verb: str) -> None:
        result = await run_process(
            self.reactor, [self.systemctl, verb, self.unit], timeout=self.timeout
        )
        if not result.ok:
            raise AgentControlFailed(
                f"systemctl {verb} {self.unit} failed ({result.describe()})",
                output={"agent": result.output},
            )

    async def start(self, release_dir: Path | None) -> None:
        """At updater start-up systemd already runs the agent; nothing to do."""

    async def restart(self, release_dir: Path | None) -> None:
        self.log.info("Restarting {unit}", unit=self.unit)
        await self._systemctl("restart")

    async def stop(self) -> None:
        await self._systemctl("stop")

    async def shutdown(self) -> None:
        """The updater is going away: systemd keeps running the agent without us."""

    def exited_since_start(self) -> str | None:
        return None  # systemd restarts it; the health probe's deadline decides

    async def release_ready(self) -> None:
        """A release is current and healthy: ``systemctl start`` each companion unit (a
        no-op for one that runs).  A failure is logged; the update itself succeeded."""
        for unit in self.companions:
            result = await run_process(
                self.reactor, [self.systemctl, "start", unit], timeout=self.timeout
            )
            if not result.ok:
                self.log.warn(
                    "Cannot start {unit} ({how}): {output}",
                    unit=unit,
                    how=result.describe(),
                    output=result.output.strip()[-500:],
                )

    async def stop_companions(self) -> list[str] | None:
        """``systemctl stop`` each companion unit (``decnet-admin decommission``); the units
        stopped.  systemctl returns once the unit has stopped: the forwarder's stop ends
        its connection cleanly (what the listener acknowledged stays acknowledged)."""
        for unit in self.companions:
            self.log.info("Stopping {unit}", unit=unit)
            result = await run_process(
                self.reactor, [self.systemctl, "stop", unit], timeout=self.timeout
            )
            if not result.ok:
                raise AgentControlFailed(
                    f"systemctl stop {unit} failed ({result.describe()})",
                    output={"systemctl": result.output},
                )
        return list(self.companions)

    async def recent_output(self) -> str:
        result = await run_process(
            self.reactor,
            [self.journalctl, "--unit", self.unit, "--lines=60", "--no-pager", "--output=cat"],
            timeout=30,
        )
        return result.output

    def describe(self) -> dict:
        return {"control": self.control, "unit": self.unit}


class CopiedOutput(OutputTail):
    """The agent's output tail, also appended to its twistd log file (``--agent-twistd-log``).

    With ``--logfile`` twistd writes everything to that file once its logging has
    started; what it prints before (a traceback from importing or building the
    agent, a usage error) goes to its stderr only.  Copying the output makes the
    reason a release failed readable where the operator looks: the agent's log.
    The writes are small and rare (twistd prints nothing else there).
    """

    log = Logger()

    def __init__(self, copy_to: Path, limit: int = config.OUTPUT_TAIL_BYTES):
        super().__init__(limit)
        self.copy_to = copy_to
        self.copy_failed = False

    def write(self, data: bytes) -> None:
        super().write(data)
        try:
            with open(self.copy_to, "ab") as fh:
                fh.write(data)
        except OSError as exc:
            if not self.copy_failed:  # once, not per chunk
                self.log.warn(
                    "Cannot copy the agent's output to {path}: {reason}",
                    path=str(self.copy_to),
                    reason=exc.strerror,
                )
            self.copy_failed = True


class SpawnedAgent:
    """The agent as our child process, restarted with a backoff when it dies unasked."""

    control = "spawn"
    log = Logger()

    def __init__(
        self,
        reactor: IReactorProcess,
        argv_for: Callable[[Path], list[str]],
        *,
        env: Mapping[str, str] | None = None,
        grace: float = config.AGENT_STOP_GRACE,
        min_backoff: float = 0.5,
        max_backoff: float = 30.0,
        twistd_log: str | None = None,
    ):
        self.reactor = reactor
        self.argv_for = argv_for
        self.env = dict(env) if env is not None else child_env()
        self.grace = grace
        # A run that lasted this long was not a crash loop: back to min_backoff.
        self.policy = RestartPolicy(
            first=min_backoff, maximum=max_backoff, healthy_after=10 * min_backoff + 5
        )
        self.output = CopiedOutput(Path(twistd_log)) if twistd_log else OutputTail()
        self.supervisor: Supervisor | None = None
        self.restarts = 0

    def spec(self, release_dir: Path) -> ProcessSpec:
        """How the agent of ``release_dir`` runs: from that directory, dying with us."""
        return ProcessSpec(
            "The agent",
            self.argv_for(release_dir),
            env=self.env,
            cwd=str(release_dir),
            die_with_parent=signal.SIGTERM,
            grace=self.grace,
        )

    @property
    def running(self) -> bool:
        return self.supervisor is not None and self.supervisor.running

    @property
    def pid(self) -> int | None:
        return self.supervisor.pid if self.supervisor is not None else None

    def _observe(self, event: SupervisorEvent) -> None:
        if isinstance(event, Started) and event.restart:
            self.restarts += 1

    async def start(self, release_dir: Path | None) -> None:
        await self.restart(release_dir)

    async def restart(self, release_dir: Path | None) -> None:
        """Stop whatever runs, then run ``release_dir`` (``None``: leave it stopped)."""
        await self.stop()
        if release_dir is None:
            return
        release_dir = Path(release_dir)
        self.output.clear()
        self.log.info("Starting the agent from {release}", release=str(release_dir))
        self.supervisor = Supervisor(
            self.reactor,
            self.spec(release_dir),
            policy=self.policy,
            protocol=lambda: ChildProtocol(self.output),
            observer=self._observe,
        )
        self.supervisor.start()

    async def stop(self) -> None:
        """SIGTERM the child we spawned, SIGKILL after the grace period; wait for it."""
        if self.supervisor is not None:
            await self.supervisor.stop()

    async def shutdown(self) -> None:
        """The updater is going away: our child must not outlive us."""
        await self.stop()

    def exited_since_start(self) -> str | None:
        """How the agent started by the last ``restart`` died, if it did."""
        supervisor = self.supervisor
        if supervisor is None or supervisor.last_exit is None:
            return None
        return supervisor.last_exit.describe()

    async def recent_output(self) -> str:
        return self.output.text()

    async def release_ready(self) -> None:
        """Nothing else to start: whoever spawned the updater runs the forwarder."""

    async def stop_companions(self) -> list[str] | None:
        """``None``: this updater does not run the forwarder (whoever spawned it does)."""
        return None

    def describe(self) -> dict:
        return {
            "control": self.control,
            "running": self.running,
            "pid": self.pid,
            "restarts": self.restarts,
        }
