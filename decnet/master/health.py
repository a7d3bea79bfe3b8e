"""How healthy one host is, from what its daemons and the listener said (pure).

``decnet-admin check`` (and ``status``, ``top``) asks a host's agent for
``/health`` and ``/status``, its updater for ``/health``, and reads the
listener's per-worker state (:mod:`decnet.listener.workers`); this module
turns those answers, already validated against their schemas
(:mod:`decnet.replies`), into one verdict and the problems behind it:

* ``unreachable``: the agent gave no valid answer (down, refused, a bad reply);
* ``degraded``: the agent answers, but a decoy service failed (a port already
  in use, say), its ``/status`` is unavailable, the updater is down, or the
  listener has not seen the worker for longer than ``--stale`` (or never);
* ``healthy``: none of these.

An updater that answers but has not installed a release yet is healthy
("updater up, waiting for the first release").  A host enrolled without an
updater has nothing to probe there.  Without a listener state file (the
listener never ran with this ingest directory) the log pipeline is unknown,
not a problem.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs

from decnet.listener.workers import NEVER, NO_STATE, LogHealth

HEALTHY = "healthy"
DEGRADED = "degraded"
UNREACHABLE = "unreachable"

UPDATER_UP = "up"
UPDATER_WAITING = "waiting"
UPDATER_DOWN = "DOWN"
UPDATER_NONE = "none"
WAITING_TEXT = "updater up, waiting for the first release"

FAILED = "failed"  # the agent's state of a service that could not start


@attrs.frozen
class FailedService:
    decky: str
    service: str
    reason: str


def failed_services(status: dict[str, Any] | None) -> tuple[FailedService, ...]:
    """Every service of a validated ``GET /status`` reply in state ``failed``."""
    if status is None:
        return ()
    return tuple(
        FailedService(decky, name, s.get("reason") or "no reason given")
        for decky, info in sorted(status["deckies"].items())
        for name, s in sorted(info["services"].items())
        if s["state"] == FAILED
    )


@attrs.frozen
class UpdaterHealth:
    state: str  # UPDATER_UP, UPDATER_WAITING, UPDATER_DOWN, UPDATER_NONE
    release: str | None = None
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


def updater_health(
    enrolled: bool, reply: dict[str, Any] | None, error: str | None
) -> UpdaterHealth:
    """The updater's row from its validated ``/health`` reply, or the error of asking."""
    if not enrolled:
        return UpdaterHealth(UPDATER_NONE, detail="enrolled without an updater")
    if reply is None:
        return UpdaterHealth(UPDATER_DOWN, detail=error or "no answer")
    # ``current``: the agent's release; updaters before it named only their own (``release``).
    current = reply.get("current", reply.get("release"))
    if reply["status"] != "ok":
        return UpdaterHealth(UPDATER_DOWN, current, f"status {reply['status']!r}")
    if not current:
        return UpdaterHealth(UPDATER_WAITING, None, WAITING_TEXT)
    return UpdaterHealth(UPDATER_UP, current)


def duration(seconds: float) -> str:
    """``42s``, ``7m12s``, ``3h05m``, ``2d04h``: how long ago, for a person."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def log_problems(logs: LogHealth | None, now: float, stale_after: float) -> list[str]:
    if logs is None or logs.state == NO_STATE:
        return []
    problems = []
    if logs.listener_silent:
        problems.append("the listener's state file is not being updated (is it running?)")
    if logs.state == NEVER:
        problems.append("the listener has never seen this worker's forwarder")
    elif logs.stale and logs.last_seen is not None:
        problems.append(
            f"logs: not seen for {duration(now - logs.last_seen)} (--stale {duration(stale_after)})"
        )
    return problems


def verdict(
    *,
    reachable: bool,
    agent_problem: str | None,
    status_problem: str | None,
    failed: Iterable[FailedService],
    updater: UpdaterHealth,
    log_issues: Iterable[str],
) -> tuple[str, tuple[str, ...]]:
    """One host's verdict and every problem behind it, most important first."""
    if not reachable:
        return UNREACHABLE, (agent_problem or "no answer",)
    problems = [] if agent_problem is None else [agent_problem]
    failed = list(failed)
    if failed:
        noun = "service" if len(failed) == 1 else "services"
        problems.append(
            f"{len(failed)} {noun} failed: "
            + "; ".join(f"{f.decky}/{f.service}: {f.reason}" for f in failed)
        )
    if status_problem is not None:
        problems.append(f"status unavailable: {status_problem}")
    if updater.state == UPDATER_DOWN:
        problems.append(f"updater DOWN: {updater.detail}")
    problems += log_issues
    return (DEGRADED if problems else HEALTHY), tuple(problems)


def exit_code(verdicts: Iterable[str]) -> int:
    """0 when every host is healthy, 1 when any is degraded, 2 when any is unreachable."""
    seen = set(verdicts)
    if UNREACHABLE in seen:
        return 2
    return 1 if DEGRADED in seen else 0
