"""What the sandbox tells its operator, as data (attrs objects); ``decnet/cli`` renders it.

The sandbox never formats text for a person.  Long-running steps (``up``,
``down``, ``poke``, the live view) hand one of these objects to an injected
``report`` callable as each step happens; every command ends by returning a
report object (:class:`StatusReport`, :class:`DownReport`,
:class:`PokeReport`).  :mod:`decnet.cli.sandbox_view` turns each into lines or
``--json``, through the one escaping layer :mod:`decnet.cli.output`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from decnet.listener.workers import LogHealth

#: Where the sandbox hands each progress object (``decnet.cli.sandbox_view.SandboxConsole.show``).
Report = Callable[[Any], None]


def ignore(event: object) -> None:
    """A :data:`Report` that shows nothing (``--json``, tests)."""


@attrs.frozen
class Where:
    """An address a process listens on, or (``forwards``) the one it sends to."""

    host: str | None
    port: int | None
    forwards: bool = False


# -- the hosts (live view, status) ------------------------------------------------------


@attrs.frozen
class HostRow:
    """What the live view knows about one worker."""

    worker: str
    address: str
    agent: str  # "up", "DOWN", "decommissioned", "starting", "waiting"
    release: str | None = None
    deckies: int | None = None
    services: int | None = None
    listening: int | None = None
    lag: int | None = None  # bytes of the decoy log not yet in the master's mirror
    detail: str = ""
    # ``decnet-admin top``: the listener's view of the worker (LAST SEEN, LOG LAG); None
    # in the sandbox, whose lag is measured from the files themselves.
    logs: LogHealth | None = None

    def key(self) -> tuple:
        """What counts as a change worth reprinting the table for (not the lag)."""
        seen = None if self.logs is None else (self.logs.state, self.logs.stale)
        return (self.agent, self.release, self.deckies, self.services, self.listening, seen)


def log_lag(local_size: int | None, mirror_size: int | None) -> int:
    """Bytes of the worker's decoy log the master does not have yet.

    The mirror is the worker's file byte for byte (``docs/Logging.md``); the
    sandbox never rotates the decoy log, so the difference of the sizes is the lag.
    """
    return max(0, (local_size or 0) - (mirror_size or 0))


def row_from_status(
    worker: str,
    address: str,
    health: dict | None,
    status: dict | None,
    lag: int | None,
    problem: str | None = None,
) -> HostRow:
    """One worker's row from its agent's ``/health`` and ``/status`` answers."""
    if health is None or health.get("status") != "ok":
        detail = problem or (f"status {health.get('status')!r}" if health else "no answer")
        return HostRow(worker, address, "DOWN", lag=lag, detail=detail)
    summary = (status or {}).get("summary") or {}
    return HostRow(
        worker,
        address,
        "up",
        release=health.get("release"),
        deckies=summary.get("deckies"),
        services=summary.get("services"),
        listening=summary.get("listening"),
        lag=lag,
    )


@attrs.frozen
class HostTable:
    """The live view's host table is due (it changed, or events scrolled it away)."""

    rows: tuple[HostRow, ...]


@attrs.frozen
class FeedEvents:
    """New entries of the master's JSON feeds, in the order to show them."""

    entries: tuple[dict, ...]


# -- sandbox status ---------------------------------------------------------------------


@attrs.frozen
class ProcessRow:
    """One process of the sandbox: ``up``, a child it started, or an agent an updater runs."""

    name: str
    pid: int
    running: bool
    log: str | None
    where: Where | None = None


@attrs.frozen
class StatusReport:
    """What ``sandbox status`` found; ``found`` is false when DIR holds no sandbox."""

    root: Path
    found: bool
    phase: str | None = None
    listener: dict | None = None
    release: str | None = None
    processes: tuple[ProcessRow, ...] = ()
    hosts: tuple[HostRow, ...] = ()

    @property
    def up_running(self) -> bool:
        return any(p.name == "up" and p.running for p in self.processes)

    @property
    def orphaned(self) -> bool:
        """``up`` is gone but some of its processes still run (``sandbox down`` is needed)."""
        return not self.up_running and any(p.running for p in self.processes)

    @property
    def healthy(self) -> bool:
        """``up``, every process and every active agent are up."""
        agents_ok = all(h.agent in ("up", "decommissioned") for h in self.hosts)
        everyone = all(p.running for p in self.processes)
        return self.up_running and everyone and bool(self.hosts) and agents_ok


# -- sandbox down -----------------------------------------------------------------------


@attrs.frozen
class UpAsked:
    """``down`` sent SIGTERM to ``up`` and waits for it to stop its children."""

    pid: int


@attrs.frozen
class UpKilled:
    """``up`` did not stop within ``timeout`` seconds; ``down`` sent it SIGKILL."""

    pid: int
    timeout: float


@attrs.frozen
class LeftoversStopping:
    """``up`` is gone; ``down`` stops the children that survived it (SIGTERM)."""

    names: tuple[str, ...]


@attrs.frozen
class LeftoverKilled:
    """A leftover ignored SIGTERM for the grace period and got SIGKILL."""

    name: str
    pid: int


@attrs.frozen
class DownReport:
    """How ``sandbox down`` ended: ``still_running`` is empty once nothing runs."""

    root: Path
    found: bool
    still_running: tuple[str, ...] = ()


# -- sandbox up -------------------------------------------------------------------------


@attrs.frozen
class Preparing:
    """``up`` starts: the master and the workers' identities are made or reused."""

    root: Path


@attrs.frozen
class DaemonsStarting:
    logs_dir: Path


@attrs.frozen
class DaemonStarted:
    """A ``twistd`` child runs (``agent_port``: the agent an updater will start)."""

    name: str
    pid: int
    where: Where
    agent_port: int | None = None


@attrs.frozen
class ReleaseStarting:
    """The release of this checkout is about to be built and pushed."""


@attrs.frozen
class WheelhouseBuilding:
    """pip builds the offline wheelhouse (the first run only)."""


@attrs.frozen
class WheelhouseReady:
    path: Path
    wheels: int
    how: str  # "given", "cached" or "built"
    seconds: float | None = None  # how long building it took


@attrs.frozen
class ReleaseBuilt:
    release: str
    files: int
    size: int


@attrs.frozen
class AlreadyCurrent:
    worker: str
    release: str


@attrs.frozen
class RolloutProgress:
    """A step of the shared rollout (:class:`decnet.master.rollout.Rollout`) on ``host``."""

    host: str
    message: str


@attrs.frozen
class StillInstalling:
    workers: tuple[str, ...]
    seconds: float


@attrs.frozen
class DeployStarting:
    """The default deckies are about to be deployed through each agent."""


@attrs.frozen
class Deployed:
    """What one agent answered to ``POST /deploy`` of ``spec``."""

    worker: str
    spec: dict
    result: dict


@attrs.frozen
class DeployDone:
    total: int
    failed: tuple[str, ...]  # "<worker>: <service problem>"


@attrs.frozen
class Ready:
    seconds: float
    workers: int
    listener_port: int | None
    logs_dir: Path
    root: Path


@attrs.frozen
class ChildExited:
    """A child of ``up`` ended while nobody was waiting for it."""

    name: str
    how: str | None
    words: str  # the last line of its log
    log: Path


@attrs.frozen
class Stopping:
    count: int


@attrs.frozen
class Stopped:
    seconds: float
    root: Path
