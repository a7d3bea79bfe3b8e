"""Pushing one release to many hosts: bounded concurrency, canaries, per-host outcomes.

The plan is pure (:func:`plan_rollout`: who is eligible, who is a canary, who is
skipped and why); :class:`Rollout` runs it with an injected client factory and
clock, so it is tested without a network.  Every host ends with exactly one
:class:`HostResult`; a host's failure never stops the others, except that a
canary that did not end ``updated`` stops the rollout before the rest begins.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import attrs
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from decnet import config
from decnet.errors import DecnetError, RemoteError
from decnet.master.registry import Host
from decnet.master.tar_tree import ReleaseArchive

UPDATED = "updated"
ROLLED_BACK = "rolled_back"
FAILED = "failed"
SKIPPED = "skipped"


@attrs.frozen
class HostResult:
    host: str
    result: str
    release: str | None = None
    seconds: float | None = None
    detail: str = ""
    updater_release: str | None = None  # after --include-self
    # What the updater captured of a failed release (``install``: pip, ``agent``: the
    # agent's last output, ``rollback``): the whole text, for --json and the table's tail.
    output: dict[str, str] = attrs.field(factory=dict)
    sent: int | None = None  # bytes of the tarball pushed to this host (agent update)

    @property
    def ok(self) -> bool:
        return self.result == UPDATED

    def as_dict(self) -> dict:
        return attrs.asdict(self)


@attrs.frozen
class RolloutPlan:
    canaries: tuple[Host, ...]
    rest: tuple[Host, ...]
    skipped: tuple[HostResult, ...]


def skip_reason(host: Host) -> str | None:
    if host.decommissioned:
        return "decommissioned"
    if not host.has_updater:
        return "no updater certificate (enroll it with --updater)"
    return None


def plan_rollout(hosts: Sequence[Host], canary: int = 0) -> RolloutPlan:
    """Split ``hosts`` (in order) into canaries, the rest, and those skipped with a reason."""
    eligible, skipped = [], []
    for host in hosts:
        reason = skip_reason(host)
        if reason:
            skipped.append(HostResult(host.name, SKIPPED, detail=reason))
        else:
            eligible.append(host)
    canary = max(0, min(canary, len(eligible)))
    return RolloutPlan(tuple(eligible[:canary]), tuple(eligible[canary:]), tuple(skipped))


def _problems(exc: RemoteError) -> str:
    return "; ".join(exc.problems) or str(exc)


def captured_output(body: object) -> dict[str, str]:
    """The ``output`` map of an updater's error answer: text values only (a lying worker
    may send anything there; what is not a string is left out)."""
    output = body.get("output") if isinstance(body, dict) else None
    if not isinstance(output, dict):
        return {}
    return {k: v for k, v in output.items() if isinstance(k, str) and isinstance(v, str)}


class ReleaseTarget(Protocol):
    """What :class:`Rollout` needs of one host's updater (an ``UpdaterClient``)."""

    async def update(
        self,
        archive: ReleaseArchive,
        timeout: float | None = None,
        sent: Callable[[int], None] | None = None,
    ) -> dict: ...

    async def health(self, timeout: float = ...) -> dict: ...

    async def update_self(self, archive: ReleaseArchive, timeout: float | None = None) -> dict: ...

    async def wait_for_release(self, release: str, timeout: float = ...) -> dict: ...

    async def close(self) -> None: ...


#: Seconds between two looks at a host's ``/health`` phase while its update runs.
PHASE_POLL = 1.0
#: Upload progress is reported in steps of this many percent.
UPLOAD_STEP = 10


class Rollout:
    """Run a :class:`RolloutPlan`; ``progress(host, message)`` is called as hosts advance.

    ``archive_for(client)``, when given, chooses each host's tarball (a wheel release
    carries only the dependency wheels that host lacks); otherwise every host gets
    ``archive``.  Progress phases per host: ``uploading N%``, then the updater's own
    phase from its ``/health`` (``installing``, ``health-checking``, ``rolling back``),
    then the outcome.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        client_factory: Callable[[Host], ReleaseTarget],
        archive: ReleaseArchive,
        *,
        concurrency: int = config.DEFAULT_UPDATE_CONCURRENCY,
        include_self: bool = False,
        progress: Callable[[str, str], None] = lambda host, message: None,
        timeout: float = config.DEFAULT_UPDATE_TIMEOUT,
        self_wait: float = config.DEFAULT_SELF_UPDATE_WAIT,
        archive_for: Callable[[ReleaseTarget], Awaitable[ReleaseArchive]] | None = None,
        phase_poll: float = PHASE_POLL,
    ):
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.clock = clock
        self.client_factory = client_factory
        self.archive = archive
        self.concurrency = concurrency
        self.include_self = include_self
        self.progress = progress
        self.timeout = timeout
        self.self_wait = self_wait
        self.archive_for = archive_for
        self.phase_poll = phase_poll

    async def run(self, plan: RolloutPlan) -> list[HostResult]:
        results: list[HostResult] = list(plan.skipped)
        if plan.canaries:
            names = ", ".join(h.name for h in plan.canaries)
            self.progress("-", f"canary phase: {names}")
            canary_results = await self._wave(plan.canaries)
            results += canary_results
            bad = [r for r in canary_results if not r.ok]
            if bad:
                why = ", ".join(f"{r.host} ended {r.result}" for r in bad)
                self.progress("-", f"stopping the rollout: canary {why}")
                results += [
                    HostResult(h.name, SKIPPED, detail=f"rollout stopped: canary {why}")
                    for h in plan.rest
                ]
                return results
        results += await self._wave(plan.rest)
        return results

    async def _wave(self, hosts: Sequence[Host]) -> list[HostResult]:
        if not hosts:
            return []
        semaphore = defer.DeferredSemaphore(self.concurrency)
        runs = [semaphore.run(self._start, h) for h in hosts]
        return list(await defer.gatherResults(runs, consumeErrors=True))

    def _start(self, host: Host) -> defer.Deferred[HostResult]:
        return defer.ensureDeferred(self._one(host))

    async def _one(self, host: Host) -> HostResult:
        started = self.clock.seconds()
        elapsed = lambda: round(self.clock.seconds() - started, 2)  # noqa: E731
        release = self.archive.release_id
        try:
            client = self.client_factory(host)
        except DecnetError as exc:
            return HostResult(host.name, FAILED, seconds=elapsed(), detail=str(exc))
        try:
            try:
                archive = await self._archive_for(client)
                self.progress(host.name, f"pushing release {release} ({archive.size} bytes)")
                body = await self._update(client, host.name, archive)
            except RemoteError as exc:
                outcome = exc.body.get("result") if isinstance(exc.body, dict) else None
                result = ROLLED_BACK if outcome == ROLLED_BACK else FAILED
                current = exc.body.get("current") if isinstance(exc.body, dict) else None
                self.progress(host.name, f"{result}: {_problems(exc)}")
                return HostResult(
                    host.name,
                    result,
                    current,
                    elapsed(),
                    f"HTTP {exc.status}: {_problems(exc)}",
                    output=captured_output(exc.body),
                )
            except DecnetError as exc:
                self.progress(host.name, f"failed: {exc}")
                return HostResult(host.name, FAILED, None, elapsed(), str(exc))
            detail = body.get("detail") or (
                "installed and healthy" if body.get("installed") else "activated and healthy"
            )
            self.progress(host.name, f"updated to {release} ({elapsed():.1f}s)")
            if not self.include_self:
                return HostResult(host.name, UPDATED, release, elapsed(), detail, sent=archive.size)
            return await self._self_update(client, host, elapsed, detail, archive)
        except Exception as exc:  # a bug must not take the other hosts down with it
            self.log.failure("Rollout to {host} crashed", host=host.name)
            return HostResult(host.name, FAILED, None, elapsed(), f"internal error: {exc!r}")
        finally:
            await client.close()

    async def _archive_for(self, client: ReleaseTarget) -> ReleaseArchive:
        if self.archive_for is None:
            return self.archive
        return await self.archive_for(client)

    async def _update(self, client: ReleaseTarget, host: str, archive: ReleaseArchive) -> dict:
        """``client.update``, reporting the upload in steps and then the updater's phase."""
        shown = [-1]
        total = max(archive.size, 1)

        def sent(count: int) -> None:
            percent = min(100, count * 100 // total)
            step = 100 if percent == 100 else percent - percent % UPLOAD_STEP
            if step > shown[0]:
                shown[0] = step
                self.progress(host, f"uploading {step}%")

        push = defer.ensureDeferred(client.update(archive, timeout=self.timeout, sent=sent))
        sleeping: list[defer.Deferred] = []
        watch = defer.ensureDeferred(self._watch_phase(client, host, push, sleeping))
        watch.addErrback(lambda f: self.log.failure("Watching {host} failed", f, host=host))
        try:
            return await push
        finally:
            for pending in sleeping:
                pending.cancel()  # the watcher ends now, not a poll interval later

    async def _watch_phase(
        self, client: ReleaseTarget, host: str, push: defer.Deferred, sleeping: list
    ) -> None:
        """While ``push`` runs, show each new phase the updater reports on ``/health``."""
        last = None
        while not push.called:
            nap = task.deferLater(self.clock, self.phase_poll, lambda: None)
            sleeping[:] = [nap]
            try:
                await nap
            except defer.CancelledError:
                return
            sleeping.clear()
            try:
                doc = await client.health(timeout=max(self.phase_poll * 2, 1.0))
            except DecnetError:
                continue
            phase = doc.get("phase")
            if isinstance(phase, str) and phase != last and not push.called:
                last = phase
                self.progress(host, phase)

    async def _self_update(
        self,
        client: ReleaseTarget,
        host: Host,
        elapsed: Callable[[], float],
        detail: str,
        archive: ReleaseArchive,
    ) -> HostResult:
        release = archive.release_id
        self.progress(host.name, "updating the updater itself")
        try:
            await client.update_self(archive, timeout=self.timeout)
            self.progress(host.name, "waiting for the new updater to answer")
            await client.wait_for_release(release, timeout=self.self_wait)
        except RemoteError as exc:
            why = f"HTTP {exc.status}: {_problems(exc)}"
        except DecnetError as exc:
            why = str(exc)
        else:
            self.progress(host.name, f"updater now on {release}")
            return HostResult(
                host.name, UPDATED, release, elapsed(), f"{detail}; updater too", release
            )
        self.progress(host.name, f"updater self-update failed: {why}")
        return HostResult(
            host.name,
            FAILED,
            release,
            elapsed(),
            f"agent updated to {release}; updater self-update failed: {why}",
        )
