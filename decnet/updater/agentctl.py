"""Starting and restarting the agent: through systemd, or as the updater's own child.

Two controls with one interface (``restart``, ``stop``, ``exited_since_start``,
``recent_output``):

* :class:`SystemdAgent` runs ``systemctl restart decnet-agent.service`` (and
  ``journalctl`` for the output when a release fails) through ``spawnProcess``;
  the unit runs ``<install-dir>/current/venv/bin/twistd``.
* :class:`SpawnedAgent` supervises the agent as a child process (the local
  sandbox, the tests): it starts ``releases/<id>/venv/bin/python`` by its *real*
  release path, so the agent reports the release it actually runs; it restarts a
  crashed agent with a backoff, and stops it by signalling the child it spawned.

Neither ever kills by name or scans ``/proc``.  A spawned agent must not outlive
an updater that was ``kill -9``-ed (it would hold the port against the next
one): the launcher sets ``PR_SET_PDEATHSIG`` before it starts twistd.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Mapping
from pathlib import Path

from twisted.internet import defer, error, protocol
from twisted.logger import Logger

from decnet import config
from decnet.errors import AgentControlFailed
from decnet.updater.process import OutputTail, child_env, run_process

# Runs under the release's own python: no import from the release's decnet, so
# it works for any release.  PR_SET_PDEATHSIG (1) survives the exec into twistd.
LAUNCHER = """\
import ctypes, os, signal, sys
parent = int(sys.argv[1])
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
except (OSError, AttributeError):
    pass
if os.getppid() != parent:
    sys.exit("decnet-updater exited before the agent started")
sys.argv = ["twistd", *sys.argv[2:]]
from twisted.scripts.twistd import run
run()
"""


def agent_argv(
    release_dir: Path,
    *,
    bundle: str,
    listen: str,
    state_dir: str | None = None,
    log_file: str | None = None,
    twistd_log: str | None = None,
    parent_pid: int | None = None,
) -> list[str]:
    """The command that runs ``twistd decnet-agent`` from ``release_dir``'s venv.

    ``twistd_log``: the agent's own twistd log file (``--logfile``); without it
    the agent logs to its output, which the updater keeps (the tail of it).
    """
    python = str(Path(release_dir) / config.RELEASE_VENV_DIR / "bin" / "python")
    argv = [python, "-c", LAUNCHER, str(parent_pid or os.getpid())]
    argv += ["--nodaemon", "--pidfile="]
    if twistd_log:
        argv += ["--logfile", twistd_log]
    argv += ["decnet-agent", "--bundle", bundle, "--listen", listen]
    if state_dir:
        argv += ["--state-dir", state_dir]
    if log_file:
        argv += ["--log-file", log_file]
    return argv


class SystemdAgent:
    """``systemctl restart <unit>``; the unit's ExecStart runs from ``current``."""

    control = "systemd"
    log = Logger()

    def __init__(
        self,
        reactor,
        unit: str = config.DEFAULT_AGENT_UNIT,
        *,
        systemctl: str = "systemctl",
        journalctl: str = "journalctl",
        timeout: float = 90.0,
    ):
        self.reactor = reactor
        self.unit = unit
        self.systemctl = systemctl
        self.journalctl = journalctl
        self.timeout = timeout

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

    async def recent_output(self) -> str:
        result = await run_process(
            self.reactor,
            [self.journalctl, "--unit", self.unit, "--lines=60", "--no-pager", "--output=cat"],
            timeout=30,
        )
        return result.output

    def describe(self) -> dict:
        return {"control": self.control, "unit": self.unit}


class _AgentProcess(protocol.ProcessProtocol):
    def __init__(self, owner: SpawnedAgent, generation: int):
        self.owner = owner
        self.generation = generation
        self.ended: defer.Deferred = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.owner.output.write(data)

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        value = reason.value
        if isinstance(value, error.ProcessDone):
            how = "exited with code 0"
        elif getattr(value, "signal", None) is not None:
            how = f"was killed by signal {value.signal}"
        else:
            how = f"exited with code {getattr(value, 'exitCode', '?')}"
        self.owner._ended(self, how)
        self.ended.callback(how)


class SpawnedAgent:
    """The agent as our child process, restarted with a backoff when it dies unasked."""

    control = "spawn"
    log = Logger()

    def __init__(
        self,
        reactor,
        argv_for: Callable[[Path], list[str]],
        *,
        env: Mapping[str, str] | None = None,
        grace: float = config.AGENT_STOP_GRACE,
        min_backoff: float = 0.5,
        max_backoff: float = 30.0,
    ):
        self.reactor = reactor
        self.argv_for = argv_for
        self.env = dict(env) if env is not None else child_env()
        self.grace = grace
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.output = OutputTail()
        self.release_dir: Path | None = None  # what we want running (None: nothing)
        self._process: _AgentProcess | None = None
        self._transport = None
        self._generation = 0
        self._exit_since_start: str | None = None
        self._backoff = min_backoff
        self._respawn = None
        self._started_at = 0.0
        self.restarts = 0

    @property
    def running(self) -> bool:
        return self._process is not None

    @property
    def pid(self) -> int | None:
        return getattr(self._transport, "pid", None) if self._process else None

    def _spawn(self) -> None:
        self._generation += 1
        proc = _AgentProcess(self, self._generation)
        argv = self.argv_for(self.release_dir)
        self.log.info(
            "Starting the agent from {release}", release=str(self.release_dir), argv=argv[0]
        )
        try:
            self._transport = self.reactor.spawnProcess(
                proc, argv[0], argv, env=self.env, path=str(self.release_dir)
            )
        except OSError as exc:
            self._exit_since_start = f"could not be started: {exc}"
            self._schedule_respawn()
            return
        self._process = proc
        self._started_at = self.reactor.seconds()

    def _ended(self, proc: _AgentProcess, how: str) -> None:
        if proc is not self._process:
            return
        self._process = None
        self._transport = None
        if self.release_dir is None:
            return  # we asked it to stop
        self._exit_since_start = how
        self.log.warn("The agent {how}; restarting it", how=how)
        if self.reactor.seconds() - self._started_at > 10 * self.min_backoff + 5:
            self._backoff = self.min_backoff
        self._schedule_respawn()

    def _schedule_respawn(self) -> None:
        delay, self._backoff = self._backoff, min(self._backoff * 2, self.max_backoff)
        self._respawn = self.reactor.callLater(delay, self._do_respawn)

    def _do_respawn(self) -> None:
        self._respawn = None
        if self.release_dir is not None and self._process is None:
            self.restarts += 1
            self._spawn()

    def _cancel_respawn(self) -> None:
        if self._respawn is not None and self._respawn.active():
            self._respawn.cancel()
        self._respawn = None

    async def start(self, release_dir: Path | None) -> None:
        await self.restart(release_dir)

    async def restart(self, release_dir: Path | None) -> None:
        """Stop whatever runs, then run ``release_dir`` (``None``: leave it stopped)."""
        await self.stop()
        if release_dir is None:
            return
        self.release_dir = Path(release_dir)
        self.output.clear()
        self._exit_since_start = None
        self._backoff = self.min_backoff
        self._spawn()

    async def stop(self) -> None:
        """SIGTERM the child we spawned, SIGKILL after the grace period; wait for it."""
        self.release_dir = None
        self._cancel_respawn()
        proc, transport = self._process, self._transport
        if proc is None:
            return
        killer = self.reactor.callLater(self.grace, self._signal, transport, signal.SIGKILL)
        self._signal(transport, signal.SIGTERM)
        try:
            await proc.ended
        finally:
            if killer.active():
                killer.cancel()

    @staticmethod
    def _signal(transport, sig) -> None:
        try:
            transport.signalProcess(sig)
        except error.ProcessExitedAlready:
            pass

    async def shutdown(self) -> None:
        """The updater is going away: our child must not outlive us."""
        await self.stop()

    def exited_since_start(self) -> str | None:
        """How the agent started by the last ``restart`` died, if it did."""
        return self._exit_since_start

    async def recent_output(self) -> str:
        return self.output.text()

    def describe(self) -> dict:
        return {
            "control": self.control,
            "running": self.running,
            "pid": self.pid,
            "restarts": self.restarts,
        }
