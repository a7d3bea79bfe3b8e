"""The updater's domain logic: update, rollback, update-self, start-up reconcile.

Everything that blocks (hashing, tar, fsync, renames, rmtree) runs through
``to_thread``; venv and pip run as child processes; waiting is on the clock.
One operation runs at a time: a second one is refused with :class:`UpdaterBusy`
rather than queued behind a long install.

Outcomes, as the master sees them (``docs/Remote-Updates.md``):

* ``updated``: the new release is ``current`` and the agent reported it healthy;
* ``rolled_back``: it was switched to, failed its health check, and the
  previous release is ``current`` again and healthy (:class:`RolledBack`);
* ``failed``: refused or failed *before* the switch (nothing changed), or the
  rollback itself did not come back healthy (:class:`RollbackFailed`).
"""

from __future__ import annotations

import contextlib
import hmac
import platform
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, BinaryIO

import attrs
from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger

from decnet import __version__, config
from decnet.clock import utc_iso
from decnet.errors import (
    AgentControlFailed,
    DigestMismatch,
    HealthCheckFailed,
    InstallFailed,
    RollbackFailed,
    RolledBack,
    UnknownRelease,
    UnsafeArchive,
    UpdateError,
    UpdaterBusy,
    UpdaterStarting,
)
from decnet.release import release_id as own_release_id
from decnet.updater import archive
from decnet.updater.deps import DepsStore
from decnet.updater.manifest import Manifest, check_wheels, parse_manifest
from decnet.updater.releases import (
    OP_ROLLBACK,
    OP_SELF,
    OP_UPDATE,
    ReleaseStore,
    release_id_for,
)

_HEX = set("0123456789abcdef")
# What ``Outcome.op`` names besides the release store's operations.
OP_INSTALL = "install"


@attrs.frozen
class Outcome:
    """How one operation ended, as :attr:`Updater.outcome_listeners` are told (the metrics).

    ``result`` is the outcome the master sees (``updated``, ``rolled_back``,
    ``restarting``, ``failed``, or ``installed`` for an install step), and
    ``error`` the typed error when there was one.
    """

    op: str
    result: str
    seconds: float
    error: UpdateError | None = None


def normalize_sha256(value: str | None) -> str:
    """A lowercase 64-hex digest, or :class:`DigestMismatch` (400) saying what is wrong."""
    cleaned = (value or "").lower()
    if len(cleaned) != 64 or not set(cleaned) <= _HEX:
        raise DigestMismatch("the sha256 of the tarball (64 hex digits) is required")
    return cleaned


@attrs.frozen
class Upload:
    """A received tarball: a file positioned anywhere, and the sha256 computed as it arrived."""

    file: BinaryIO
    sha256: str
    size: int


@attrs.frozen
class Verified:
    """An upload that passed every check: its release id, what it holds, and for a wheel
    release its manifest and the dependency wheels it ships."""

    release: str
    summary: archive.Summary
    manifest: Manifest | None = None


class Updater:
    """Owns the agent's release directory, the updater's own one, and the dependency store."""

    log = Logger()

    def __init__(
        self,
        *,
        clock,
        store: ReleaseStore,
        self_store: ReleaseStore,
        installer,
        agent,
        probe,
        to_thread: Callable[..., Awaitable],
        health_timeout: float = config.DEFAULT_HEALTH_TIMEOUT,
        keep: int = config.DEFAULT_KEEP_RELEASES,
        limits: archive.Limits = archive.DEFAULT_LIMITS,
        restart_self: Callable[[Path], object] | None = None,
        restart_delay: float = 0.5,
        deps: DepsStore | None = None,
    ):
        self.clock = clock
        self.store = store
        self.self_store = self_store
        self.deps = deps if deps is not None else DepsStore(store.root)
        self.installer = installer
        self.agent = agent
        self.probe = probe
        self.to_thread = to_thread
        self.health_timeout = health_timeout
        self.keep = keep
        self.limits = limits
        self.restart_self = restart_self
        self.restart_delay = restart_delay
        self.ready = False
        self.agent_release: str | None = None
        self.busy: str | None = None
        # What the operation in flight is doing (GET /health): the master shows it as progress.
        self.phase: str | None = None
        self.restarting_onto: Path | None = None
        self.started_at = clock.seconds()
        self.outcome_listeners: list[Callable[[Outcome], None]] = []
        # Read once: after update-self switches `current`, this process still
        # runs the old code until it restarts, and must say so.
        self.own_release = own_release_id()

    # -- plumbing ------------------------------------------------------------

    @contextlib.contextmanager
    def _exclusive(self, what: str):
        if not self.ready:
            raise UpdaterStarting("the updater is still starting; try again shortly")
        if self.restarting_onto is not None:
            raise UpdaterBusy("restarting onto a new updater release; try again shortly")
        if self.busy is not None:
            raise UpdaterBusy(f"busy with {self.busy}; try again when it has finished")
        self.busy = what
        self.phase = "verifying"
        try:
            yield
        finally:
            self.busy = self.phase = None

    def _thread(self, f, *args, **kwargs):
        return self.to_thread(f, *args, **kwargs)

    async def _observed(self, op: str, work: Awaitable[Any], result: str | None = None) -> Any:
        """``await work``, telling the outcome listeners how it ended and how long it took.

        The outcome is ``result``, else the ``"result"`` of the dict ``work`` returns.
        """
        started = self.clock.seconds()
        try:
            done = await work
        except Exception as exc:
            typed = exc if isinstance(exc, UpdateError) else None
            outcome = typed.result if typed is not None else "failed"
            self._tell(Outcome(op, outcome, self.clock.seconds() - started, typed))
            raise
        self._tell(Outcome(op, result or str(done["result"]), self.clock.seconds() - started))
        return done

    def _tell(self, outcome: Outcome) -> None:
        """Tell every listener; one that breaks is logged and never changes the outcome."""
        for listener in self.outcome_listeners:
            try:
                listener(outcome)
            except Exception:
                self.log.failure("An outcome listener failed on {op}", op=outcome.op)

    # -- start-up ----------------------------------------------------------

    async def start(self) -> None:
        """Repair both release directories, then make the agent run on ``current``."""
        for store, what in ((self.store, "agent"), (self.self_store, "updater")):
            plan = await self._thread(store.reconcile)
            for note in plan.notes:
                self.log.warn("Reconciled {what} releases: {note}", what=what, note=note)
        for note in await self._thread(self._reconcile_deps):
            self.log.warn("Reconciled the dependency store: {note}", note=note)
        current = await self._thread(self.store.current_dir)
        if current is None:
            self.log.info("No agent release installed yet; waiting for a push")
            await self.agent.shutdown()
        else:
            await self.agent.start(current)
        self.agent_release = current.name if current else None
        self.ready = True
        self.log.info(
            "Updater ready: agent release {release}, updater release {own}",
            release=current.name if current else None,
            own=self.own_release,
        )

    async def stop(self) -> None:
        await self.agent.shutdown()

    # -- queries -------------------------------------------------------------

    def health(self) -> dict:
        return {
            "status": "ok" if self.ready else "starting",
            "version": __version__,
            "release": self.own_release,
            "current": self.agent_release,  # the agent's release (None: none installed yet)
            "busy": self.busy,
            "phase": self.phase,
            "agent": self.agent.describe(),
            "uptime": round(self.clock.seconds() - self.started_at, 3),
        }

    def _deps_refs(self) -> set[str]:
        """Dependency environments a retained release of either store refers to (blocking)."""
        return self.store.deps_refs() | self.self_store.deps_refs()

    def _reconcile_deps(self) -> list[str]:
        return self.deps.reconcile(self._deps_refs())

    async def wheels(self) -> dict:
        """``GET /wheels``: the dependency wheels and environments this worker already has."""
        return await self._thread(self.deps.inventory)

    async def releases(self) -> dict:
        listing = await self._thread(self.store.list_releases)
        current = next((r["id"] for r in listing if r["current"]), None)
        return {"current": current, "releases": listing, "updater_release": self.own_release}

    # -- update --------------------------------------------------------------

    async def _verify(self, upload: Upload, expected: str | None) -> Verified:
        """sha256 first (no byte is parsed before it matches), then the allow-list walk, then
        (a wheel release) the manifest against the wheels shipped and stored."""
        expected = normalize_sha256(expected)
        if not hmac.compare_digest(upload.sha256, expected):
            raise DigestMismatch(
                f"tarball sha256 is {upload.sha256}, the master announced {expected}; "
                "refused before reading it"
            )
        summary = await self._thread(archive.inspect, upload.file, self.limits)
        if summary.manifest is not None:
            manifest = parse_manifest(summary.manifest)
            await self._thread(self._check_wheels, manifest, summary)
            return Verified(manifest.release, summary, manifest)
        if not summary.has_project:
            raise UnsafeArchive(
                "not a release: no release.json, setup.cfg or pyproject.toml at the top"
            )
        return Verified(release_id_for(expected), summary)

    def _check_wheels(self, manifest: Manifest, summary: archive.Summary) -> None:
        have_env = self.deps.is_complete(manifest.deps_id)
        check_wheels(manifest, summary.wheels, self.deps.wheels(), have_env=have_env)

    async def _install(
        self, store: ReleaseStore, verified: Verified, upload: Upload, *, op: str, with_pip: bool
    ) -> str:
        """Extract and install into ``releases/<id>``; on failure remove it again."""
        release, summary, manifest = verified.release, verified.summary, verified.manifest
        self.phase = "installing"
        directory = await self._thread(store.begin_install, release, op)
        try:
            src = directory / config.RELEASE_SRC_DIR
            await self._thread(archive.extract, upload.file, src, self.limits)
            installing: Awaitable[Any] = (
                self.installer.install(directory, with_pip=with_pip)
                if manifest is None
                else self._install_wheels(store, directory, manifest, with_pip=with_pip)
            )
            output = await self._observed(OP_INSTALL, installing, "installed")
            info = {
                "installed_at": utc_iso(self.clock.seconds()),
                "git_sha": summary.build_info.get("git_sha"),
                "git_dirty": summary.build_info.get("git_dirty"),
                "sha256": upload.sha256,
                "size": upload.size,
                "files": summary.files,
                "kind": "updater" if op == OP_SELF else "agent",
                "python": platform.python_version(),
                "wheelhouse": summary.has_wheelhouse,
            }
            if manifest is not None:
                info.update(
                    deps=manifest.deps_id,
                    wheel=manifest.decnet.file,
                    wheel_sha256=manifest.decnet.sha256,
                    git_sha=manifest.build.get("git_sha"),
                    git_dirty=manifest.build.get("git_dirty"),
                    source=manifest.build.get("source"),
                )
            await self._thread(store.finish_install, release, info, output)
        except BaseException as exc:
            self.log.warn(
                "Install of {release} failed, removing it: {error}", release=release, error=exc
            )
            await self._thread(store.abort_install, release)
            if manifest is not None:
                # Wheels stored for it that no retained environment uses go again.
                await self._thread(self._prune_deps)
            raise
        return output

    def _sites_in_use(self, store: ReleaseStore) -> tuple[Path | None, Path | None]:
        """The site-packages of ``store``'s current release and of its dependency
        environment, where the byte code of unchanged files comes from (blocking)."""
        release_dir = store.current_dir()
        if release_dir is None:
            return None, None
        venv = release_dir / config.RELEASE_VENV_DIR
        release_site = next(iter(sorted(venv.glob("lib/python*/site-packages"))), None)
        deps_site = None
        with contextlib.suppress(UnknownRelease, ValueError, FileNotFoundError):
            env = store.release_info(release_dir.name).get("deps")
            if isinstance(env, str) and self.deps.is_complete(env):
                deps_site = self.deps.site_packages(env)
        return release_site, deps_site

    async def _install_wheels(
        self, store: ReleaseStore, directory: Path, manifest: Manifest, *, with_pip: bool
    ) -> str:
        """Store the shipped dependency wheels, build the dependency environment unless it
        exists, then the release's small venv with the decnet wheel."""
        wheels_dir = directory / config.RELEASE_SRC_DIR / config.RELEASE_WHEELS_DIR
        for wheel in manifest.deps:
            shipped = wheels_dir / wheel.file
            if shipped.is_file():
                await self._thread(self.deps.store_wheel, shipped, wheel)
        outputs = []
        env = manifest.deps_id
        release_site, deps_site = await self._thread(self._sites_in_use, store)
        if not await self._thread(self.deps.is_complete, env):
            self.log.info("Building dependency environment {env}", env=env)
            paths = [await self._thread(self.deps.wheel_path, w.sha256) for w in manifest.deps]
            if any(p is None for p in paths):
                raise InstallFailed(
                    "a dependency wheel vanished from the store", output={"install": ""}
                )
            env_dir = await self._thread(self.deps.begin_env, env)
            try:
                outputs.append(await self.installer.build_deps(env_dir, paths, deps_site))
                await self._thread(self.deps.finish_env, env, manifest.deps)
            except BaseException:
                await self._thread(self.deps.discard_env, env)
                raise
        else:
            self.log.info("Reusing dependency environment {env}", env=env)
        env_dir = self.deps.env_dir(env)
        site = await self._thread(self.deps.site_packages, env)
        outputs.append(
            await self.installer.install_wheel(
                directory,
                site,
                env_dir / "bin",
                wheels_dir / manifest.decnet.file,
                with_pip=with_pip,
                previous=release_site,
            )
        )
        return "\n".join(outputs)

    async def update(self, upload: Upload, expected_sha256: str | None) -> dict:
        """Install, switch, restart, confirm; roll back on any failure after the switch."""
        return await self._observed(OP_UPDATE, self._update(upload, expected_sha256))

    async def _update(self, upload: Upload, expected_sha256: str | None) -> dict:
        with self._exclusive("an update"):
            started = self.clock.seconds()
            verified = await self._verify(upload, expected_sha256)
            release = verified.release
            current = await self._thread(self.store.current)
            if release == current:
                # Nothing to install or switch; still only "updated" if it is healthy.
                health = await self.probe.wait_for(
                    release, self.health_timeout, self.agent.exited_since_start
                )
                return {
                    "result": "updated",
                    "release": release,
                    "previous": current,
                    "installed": False,
                    "health": health,
                    "detail": "already the current release",
                    "seconds": round(self.clock.seconds() - started, 3),
                }
            installed = False
            install_output = ""
            if not await self._thread(self.store.is_complete, release):
                self.log.info("Installing release {release}", release=release)
                install_output = await self._install(
                    self.store, verified, upload, op=OP_UPDATE, with_pip=False
                )
                installed = True
            health = await self._activate(release, OP_UPDATE, install_output)
            return {
                "result": "updated",
                "release": release,
                "previous": current,
                "installed": installed,
                "health": health,
                "seconds": round(self.clock.seconds() - started, 3),
            }

    async def rollback(self, to: str | None = None) -> dict:
        """Go back to the previous release (top of the history) or a named one."""
        return await self._observed(OP_ROLLBACK, self._rollback(to))

    async def _rollback(self, to: str | None) -> dict:
        with self._exclusive("a rollback"):
            started = self.clock.seconds()
            target = await self._thread(self.store.rollback_target, to)
            current = await self._thread(self.store.current)
            if target == current:
                return {
                    "result": "rolled_back",
                    "release": target,
                    "previous": current,
                    "detail": "already the current release",
                    "seconds": round(self.clock.seconds() - started, 3),
                }
            health = await self._activate(target, OP_ROLLBACK, "")
            return {
                "result": "rolled_back",
                "release": target,
                "previous": current,
                "health": health,
                "seconds": round(self.clock.seconds() - started, 3),
            }

    async def _activate(self, release: str, op: str, install_output: str) -> dict:
        """Switch ``current``, restart the agent, wait for its health; revert on failure."""
        previous = await self._thread(self.store.switch_to, release, op)
        self.phase = "health-checking"
        try:
            await self.agent.restart(self.store.release_dir(release))
            health = await self.probe.wait_for(
                release, self.health_timeout, self.agent.exited_since_start
            )
        except Exception as exc:
            if not isinstance(exc, HealthCheckFailed | AgentControlFailed):
                # A bug must not leave an unconfirmed release current.
                self.log.failure("Activating {release} crashed", release=release)
            raise await self._revert(release, previous, exc, install_output) from None
        await self._thread(self.store.commit)
        await self._settle()
        self.log.info("Release {release} is current and healthy", release=release)
        await self.agent.release_ready()
        return health

    async def _settle(self) -> None:
        """After ``current`` moved or was confirmed: prune, and remember what the agent runs."""
        await self._prune(self.store)
        self.agent_release = await self._thread(self.store.current)

    async def _prune(self, store: ReleaseStore) -> None:
        """Keep ``--keep`` releases: failed ones go first; current, previous good and
        pinned ones (a running process uses them) never go."""
        pruned = await self._thread(store.prune, self.keep)
        if pruned:
            self.log.info("Removed old releases {pruned}", pruned=pruned)
        deps = await self._thread(self._prune_deps)
        if deps.envs or deps.wheels:
            self.log.info(
                "Removed {envs} unreferenced dependency environment(s) and {wheels} wheel(s)",
                envs=len(deps.envs),
                wheels=len(deps.wheels),
            )

    def _prune_deps(self):
        return self.deps.prune(self._deps_refs())

    async def _revert(
        self, release: str, previous: str | None, cause, install_output
    ) -> UpdateError:
        """Put ``previous`` back and confirm it; the error that describes the outcome."""
        agent_output = await self.agent.recent_output()
        self.phase = "rolling back"
        self.log.warn(
            "Release {release} failed ({cause}); going back to {previous}",
            release=release,
            cause=str(cause),
            previous=previous,
        )
        await self._thread(self.store.begin_revert)
        output = {"install": install_output, "agent": agent_output}
        try:
            if previous is None:
                await self.agent.stop()
            else:
                await self.agent.restart(self.store.release_dir(previous))
                await self.probe.wait_for(
                    previous, self.health_timeout, self.agent.exited_since_start
                )
        except Exception as exc:
            if not isinstance(exc, HealthCheckFailed | AgentControlFailed):
                self.log.failure("Going back to {previous} crashed", previous=previous)
            await self._thread(self.store.finish_revert)
            await self._settle()
            return RollbackFailed(
                f"release {release} failed ({cause}) and the previous release {previous} "
                f"did not come back healthy either ({exc})",
                release=release,
                current=previous,
                rolled_back=True,
                healthy=False,
                output={**output, "rollback": await self.agent.recent_output()},
            )
        await self._thread(self.store.finish_revert)
        await self._settle()
        if previous is None:
            return HealthCheckFailed(
                f"release {release} failed ({cause}); there was no previous release to go "
                "back to, so the agent is stopped",
                release=release,
                current=None,
                rolled_back=False,
                healthy=False,
                output=output,
            )
        return RolledBack(
            f"release {release} failed ({cause}); back on {previous}, healthy",
            release=release,
            current=previous,
            rolled_back=True,
            healthy=True,
            output=output,
        )

    # -- update-self ---------------------------------------------------------

    async def update_self(self, upload: Upload, expected_sha256: str | None) -> dict:
        """Install the updater's next release and switch ``updater/current`` to it.

        No health check and no automatic rollback here: the updater cannot
        vouch for its successor.  The HTTP layer calls :meth:`restart_after`
        once the answer is on its way; the master then waits for the new
        updater to answer ``/health`` with the new release.
        """
        if self.restart_self is None:
            raise InstallFailed("this updater has no way to restart itself")
        with self._exclusive("a self-update"):
            started = self.clock.seconds()
            verified = await self._verify(upload, expected_sha256)
            release = verified.release
            if not await self._thread(self.self_store.is_complete, release):
                self.log.info("Installing updater release {release}", release=release)
                await self._install(self.self_store, verified, upload, op=OP_SELF, with_pip=True)
            previous = await self._thread(self.self_store.switch_to, release, OP_SELF)
            await self._thread(self.self_store.commit)
            await self._prune(self.self_store)
            self.restarting_onto = self.self_store.release_dir(release)
            return {
                "result": "restarting",
                "release": release,
                "previous": previous,
                "running": self.own_release,
                "seconds": round(self.clock.seconds() - started, 3),
            }

    def restart_after(self, answered) -> None:
        """When ``answered`` fires (the response went out), restart onto the new code."""
        if self.restarting_onto is None:
            return
        target = self.restarting_onto

        def later(_):
            self.clock.callLater(self.restart_delay, self._restart_onto, target)

        answered.addBoth(later)

    def _restart_onto(self, release_dir: Path) -> None:
        async def go():
            self.log.info("Restarting the updater onto {release}", release=release_dir.name)
            await (
                self.agent.shutdown()
            )  # a spawned agent is our child: the next updater restarts it
            self.restart_self(release_dir)

        ensureDeferred(go()).addErrback(lambda f: self.log.failure("Self-update restart failed", f))


__all__ = ["UpdateError", "Updater", "Upload", "normalize_sha256"]
