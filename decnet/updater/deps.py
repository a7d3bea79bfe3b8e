"""Dependency environments by content, and the worker's wheel store.

Layout under one install directory (next to ``releases/``)::

    deps/<deps_id>/              one dependency environment: a venv holding exactly the
                                 wheel set whose sha256 is <deps_id>; read-only once complete
      deps.json                  written last: {"id", "wheels": [{"file", "sha256"}], "python"}
    deps/.trash/                 environments being deleted
    wheels/<sha256>/<file>.whl   every dependency wheel a retained environment was built from
    wheels/.tmp-*                a wheel being stored (a crash leaves it; start-up removes it)

An environment is built once (pip, offline, ``--no-deps`` from the stored
wheels), byte-compiled once, made read-only, and only then marked complete
with ``deps.json``; it is never changed afterwards.  A release's venv uses one
through a ``.pth`` file (:mod:`decnet.updater.installer`), so an environment is
kept while any retained release (agent or updater) refers to it, and deleted
with the last of them (:func:`plan_deps_prune`, pure).  A stored wheel is kept
while a retained environment was built from it: ``GET /wheels`` reports these,
and the master sends only the wheels a worker lacks.

Crash safety follows the release store: a directory without its marker is
incomplete and removed at start-up (:meth:`DepsStore.reconcile`); deletions
rename into ``.trash`` first, so a half-deleted environment never looks
complete; a wheel appears in the store by one rename of its directory.  Every
method blocks: the updater calls them in a thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import stat
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import attrs

from decnet import config
from decnet.fsutil import atomic_write, fsync_dir
from decnet.updater.manifest import Wheel, wheel_file_problem
from decnet.updater.releases import discard_via_trash

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_TRASH = ".trash"
_TMP_PREFIX = ".tmp-"


def is_sha256(value: object) -> bool:
    return isinstance(value, str) and bool(_SHA256_RE.fullmatch(value))


@attrs.frozen
class DepsPrune:
    """What :func:`plan_deps_prune` deletes."""

    envs: tuple[str, ...] = ()
    wheels: tuple[str, ...] = ()


def plan_deps_prune(
    envs: Mapping[str, Iterable[str]], referenced: Iterable[str], wheels: Iterable[str]
) -> DepsPrune:
    """Environments no retained release refers to, and wheels no kept environment uses.

    ``envs`` maps each complete environment to the wheel sha256s it was built
    from; ``referenced`` are the environments of every retained release (both
    stores); ``wheels`` are the stored wheel sha256s.
    """
    keep = set(referenced)
    doomed = tuple(sorted(env for env in envs if env not in keep))
    used: set[str] = set()
    for env, shas in envs.items():
        if env in keep:
            used.update(shas)
    return DepsPrune(doomed, tuple(sorted(w for w in wheels if w not in used)))


def _chmod(path: Path | str, mode: int) -> None:
    # World-readable on purpose: the agent and the forwarder run this code as their own users.
    os.chmod(path, mode)


def _make_writable(path: Path) -> None:
    """Give the owner write permission on every directory below ``path`` (to delete it)."""
    for dirpath, _dirs, _files in os.walk(path):
        with contextlib.suppress(FileNotFoundError):
            _chmod(dirpath, 0o755)


def _rmtree(path: Path) -> None:
    """Remove a tree that may have been made read-only."""
    if path.is_dir() and not path.is_symlink():
        _make_writable(path)
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def make_read_only(path: Path, *, top: bool = True) -> None:
    """Take every write bit away below ``path`` (and from ``path`` itself if ``top``)."""
    for dirpath, dirnames, filenames in os.walk(path, topdown=False):
        directory = Path(dirpath)
        for name in filenames:
            entry = directory / name
            mode = entry.lstat().st_mode
            if stat.S_ISREG(mode):
                os.chmod(entry, stat.S_IMODE(mode) & ~0o222)
        for name in dirnames:
            entry = directory / name
            if not entry.is_symlink():
                _chmod(entry, 0o555)
    if top:
        _chmod(path, 0o555)


class DepsStore:
    """``deps/`` and ``wheels/`` under ``root``.  Every method blocks; call them in a thread.

    ``crash_hook`` is for tests, as in :class:`~decnet.updater.releases.ReleaseStore`.
    """

    def __init__(self, root: str | os.PathLike, crash_hook: Callable[[str], None] | None = None):
        self.root = Path(root).absolute()
        self.deps_dir = self.root / config.DEPS_DIR
        self.wheels_dir = self.root / config.WHEEL_STORE_DIR
        self.trash_dir = self.deps_dir / _TRASH
        self._crash_hook = crash_hook

    def _step(self, name: str) -> None:
        if self._crash_hook is not None:
            self._crash_hook(name)

    def ensure_layout(self) -> None:
        for path in (self.deps_dir, self.wheels_dir):
            if not path.is_dir():
                path.mkdir(mode=0o755, parents=True, exist_ok=True)
                fsync_dir(path.parent)

    # -- reading -----------------------------------------------------------

    def env_dir(self, env: str) -> Path:
        if not is_sha256(env):
            raise ValueError(f"{env!r} is not a dependency environment id")
        return self.deps_dir / env

    def is_complete(self, env: str) -> bool:
        return (self.env_dir(env) / config.DEPS_ENV_FILE).is_file()

    def site_packages(self, env: str) -> Path:
        """The environment's ``site-packages`` (the one a release's ``.pth`` adds)."""
        found = sorted((self.env_dir(env) / "lib").glob("python*/site-packages"))
        if not found:
            raise FileNotFoundError(f"dependency environment {env} has no site-packages")
        return found[0]

    def envs(self) -> dict[str, frozenset[str]]:
        """Every complete environment and the wheel sha256s it was built from."""
        out: dict[str, frozenset[str]] = {}
        if not self.deps_dir.is_dir():
            return out
        for entry in self.deps_dir.iterdir():
            if not is_sha256(entry.name):
                continue
            try:
                doc = json.loads((entry / config.DEPS_ENV_FILE).read_text())
            except (FileNotFoundError, ValueError):
                continue
            wheels = doc.get("wheels") if isinstance(doc, dict) else None
            shas = [w.get("sha256") for w in wheels or () if isinstance(w, dict)]
            out[entry.name] = frozenset(str(s) for s in shas if is_sha256(s))
        return out

    def wheel_path(self, sha256: str) -> Path | None:
        """The stored wheel with this sha256, or ``None``."""
        if not is_sha256(sha256):
            return None
        directory = self.wheels_dir / sha256
        found = [p for p in directory.glob("*.whl") if p.is_file()] if directory.is_dir() else []
        return found[0] if len(found) == 1 else None

    def wheels(self) -> list[str]:
        """The sha256s of every stored wheel."""
        if not self.wheels_dir.is_dir():
            return []
        return sorted(p.name for p in self.wheels_dir.iterdir() if self.wheel_path(p.name))

    def inventory(self) -> dict[str, list[str]]:
        """What ``GET /wheels`` answers: stored wheel sha256s and complete environments."""
        return {"wheels": self.wheels(), "deps": sorted(self.envs())}

    # -- wheels --------------------------------------------------------------

    def store_wheel(self, source: Path, wheel: Wheel) -> Path:
        """Move ``source`` (already checked to have ``wheel.sha256``) into the store."""
        if wheel_file_problem(wheel.file) or not is_sha256(wheel.sha256):
            raise ValueError(f"refusing to store {wheel.file!r}")
        existing = self.wheel_path(wheel.sha256)
        if existing is not None:
            return existing
        self.ensure_layout()
        target = self.wheels_dir / wheel.sha256
        if target.exists():  # a directory without exactly one wheel: not a stored wheel
            _rmtree(target)
        tmp = self.wheels_dir / f"{_TMP_PREFIX}{wheel.sha256}-{os.getpid()}"
        if tmp.exists():
            _rmtree(tmp)
        self._step(f"wheel:{wheel.sha256}")
        tmp.mkdir(mode=0o755)
        os.rename(source, tmp / wheel.file)
        _chmod(tmp / wheel.file, 0o444)
        self._step(f"wheel-rename:{wheel.sha256}")
        os.rename(tmp, target)
        return target / wheel.file

    # -- environments ------------------------------------------------------

    def begin_env(self, env: str) -> Path:
        """An empty directory for environment ``env`` (a leftover is removed first)."""
        self.ensure_layout()
        directory = self.env_dir(env)
        if directory.exists():
            self.discard_env(env)
        self._step(f"deps-mkdir:{env}")
        directory.mkdir(mode=0o755)
        fsync_dir(self.deps_dir)
        return directory

    def finish_env(self, env: str, wheels: Iterable[Wheel]) -> None:
        """Make ``env`` read-only and durable, then mark it complete with ``deps.json``."""
        directory = self.env_dir(env)
        self._step(f"deps-seal:{env}")
        make_read_only(directory, top=False)
        self._step(f"deps-sync:{env}")
        os.sync()
        doc = {
            "id": env,
            "python": platform.python_version(),
            "wheels": [{"file": w.file, "sha256": w.sha256} for w in wheels],
        }
        self._step(f"deps-json:{env}")
        atomic_write(directory / config.DEPS_ENV_FILE, (json.dumps(doc, indent=2) + "\n").encode())
        _chmod(directory / config.DEPS_ENV_FILE, 0o444)
        _chmod(directory, 0o555)
        fsync_dir(self.deps_dir)

    def discard_env(self, env: str) -> None:
        """Delete an environment: rename it into ``deps/.trash`` (atomic), then remove it."""
        source = self.env_dir(env)
        if source.exists():
            _chmod(source, 0o755)  # renaming a directory moves its ".." entry: it must be writable
        discard_via_trash(source, self.trash_dir, env, "deps-discard", self._step, _rmtree)

    def discard_wheel(self, sha256: str) -> None:
        if not is_sha256(sha256):
            return
        source = self.wheels_dir / sha256
        if not source.exists():
            return
        self.trash_dir.mkdir(mode=0o700, exist_ok=True)
        target = self.trash_dir / f"wheel-{sha256}-{os.getpid()}"
        self._step(f"wheel-discard:{sha256}")
        os.rename(source, target)
        _rmtree(target)

    # -- start-up and pruning ------------------------------------------------

    def reconcile(self, referenced: Iterable[str]) -> list[str]:
        """Repair what a crash left, then prune; what was done, in words.

        Removes temporary wheel directories, the trash, and every environment
        without ``deps.json`` (half built, or half deleted before the rename);
        re-seals the top of complete environments (a crash between the marker
        and the last ``chmod``); then :meth:`prune` with ``referenced``.
        """
        self.ensure_layout()
        notes: list[str] = []
        for entry in list(self.wheels_dir.iterdir()):
            if entry.name.startswith(_TMP_PREFIX) or self.wheel_path(entry.name) is None:
                _rmtree(entry)
                notes.append(f"removed an incomplete stored wheel {entry.name}")
        if self.trash_dir.exists():
            _rmtree(self.trash_dir)
        for entry in list(self.deps_dir.iterdir()):
            if not is_sha256(entry.name):
                continue
            if not (entry / config.DEPS_ENV_FILE).is_file():
                self.discard_env(entry.name)
                notes.append(f"removed the incomplete dependency environment {entry.name}")
            elif stat.S_IMODE(entry.stat().st_mode) != 0o555:
                _chmod(entry, 0o555)
        pruned = self.prune(referenced)
        if pruned.envs:
            notes.append(f"removed unreferenced dependency environments {list(pruned.envs)}")
        return notes

    def prune(self, referenced: Iterable[str]) -> DepsPrune:
        """Delete environments no retained release refers to, then unused wheels."""
        plan = plan_deps_prune(self.envs(), referenced, self.wheels())
        for env in plan.envs:
            self.discard_env(env)
        for sha256 in plan.wheels:
            self.discard_wheel(sha256)
        with contextlib.suppress(OSError):
            self.trash_dir.rmdir()
        return plan
