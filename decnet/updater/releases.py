"""The release directory: immutable releases, an atomic ``current`` link and a journal.

Layout under one root (the agent's ``--install-dir``, or ``<install-dir>/updater``
for the updater's own releases)::

    releases/<id>/          src/ venv/ install.log release.json (written last)
    current -> releases/<id>
    journal.json            {"format", "state", "op", "release", "previous", "history", "failed"}
    .trash/                 releases being deleted

A release is *complete* once its ``release.json`` exists; that file is written
last, atomically, after everything else in the release has been made durable.
Releases are never modified after that.  ``current`` is replaced by creating a
new symlink and renaming it over the old one, so it always names exactly one
release.

The journal records the transaction in flight, so a ``kill -9`` at any point is
repaired by :meth:`ReleaseStore.reconcile` on the next start:

=================  ==================================  ==================================
state              meaning                             reconcile after a crash
=================  ==================================  ==================================
``idle``           nothing in flight                   nothing to undo
``staging``        installing ``release``; ``current`` remove the incomplete release;
                   untouched                           ``current`` stays
``switched``       ``current`` may already name        put ``current`` back on
                   ``release``, not yet confirmed      ``previous`` (the last known-good)
                   healthy                             -- except ``op=self``, which rolls
                                                       forward (no automatic rollback)
``rolling_back``   putting ``current`` back on         finish it: ``current`` = ``previous``;
                   ``previous``                        ``release`` is marked failed
=================  ==================================  ==================================

and in every case: temporary links and ``.trash`` are cleared, incomplete
release directories are removed, and ``current`` is made to name a complete
release (or nothing, on a host that never had one).

``history`` is the rollback stack: releases that were current before, most
recent last, never including the current one.  ``POST /rollback`` pops it.
``failed`` lists the installed releases whose last activation failed its
health check (rolled back, including a rollback a crash interrupted); a later
successful activation clears the mark.  Pruning deletes them first, and ``GET /releases`` shows it.

Pruning (:func:`plan_prune`) keeps at most ``keep`` releases, and never deletes
the current release, the previous good one, the rollback target, or a release
that a running process has pinned (:func:`decnet.release.pin_running_release`:
a shared ``flock`` on its ``release.json``, which the store tests with a
non-blocking exclusive lock, held across the deletion's rename).

This module has two halves: pure transitions and a reconcile *planner*
(:class:`Journal`, :func:`plan_reconcile`, :func:`plan_prune`; sans-IO, unit
tested state by state) and :class:`ReleaseStore`, which performs them on disk.
The store blocks (fsync, rename, rmtree): daemons call it in a thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import attrs

from decnet import config
from decnet.errors import ConfigError, NoPreviousRelease, UnknownRelease
from decnet.fsutil import atomic_write, fsync_dir
from decnet.release import RELEASE_FILE

JOURNAL_FORMAT = "decnet-release-journal/1"

IDLE = "idle"
STAGING = "staging"
SWITCHED = "switched"
ROLLING_BACK = "rolling_back"
STATES = (IDLE, STAGING, SWITCHED, ROLLING_BACK)

OP_UPDATE = "update"  # a pushed release, confirmed by the agent's health
OP_ROLLBACK = "rollback"  # an operator's rollback to an installed release
OP_SELF = "self"  # the updater's own release: no health check, no rollback
OPS = (OP_UPDATE, OP_ROLLBACK, OP_SELF)

RELEASE_ID_RE = re.compile(rf"[0-9a-f]{{{config.RELEASE_ID_LENGTH}}}")
_TEMP_LINK_PREFIX = f".{config.CURRENT_LINK}.tmp-"


def release_id_for(sha256_hex: str) -> str:
    """The release id of a tarball: a prefix of its sha256 (content addressed)."""
    return sha256_hex[: config.RELEASE_ID_LENGTH].lower()


def is_release_id(value: object) -> bool:
    return isinstance(value, str) and bool(RELEASE_ID_RE.fullmatch(value))


def _with(items: tuple[str, ...], item: str | None) -> tuple[str, ...]:
    return items if item is None or item in items else (*items, item)


class IllegalTransition(RuntimeError):
    """A bug: the updater asked for a transition its journal state does not allow."""


# ---------------------------------------------------------------------------
# The journal and its transitions (pure)


@attrs.frozen
class Journal:
    """What the release directory is in the middle of, plus the rollback stack."""

    state: str = IDLE
    op: str | None = None
    release: str | None = None
    previous: str | None = None
    history: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()

    def to_json(self) -> bytes:
        doc = {"format": JOURNAL_FORMAT, **attrs.asdict(self)}
        doc["history"] = list(self.history)
        doc["failed"] = list(self.failed)
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Journal:
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or doc.get("format") != JOURNAL_FORMAT:
                raise ValueError("unknown format")
            journal = cls(
                state=doc["state"],
                op=doc.get("op"),
                release=doc.get("release"),
                previous=doc.get("previous"),
                history=tuple(doc.get("history") or ()),
                failed=tuple(doc.get("failed") or ()),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"release journal is malformed: {exc}") from None
        problems = []
        if journal.state not in STATES:
            problems.append(f"unknown state {journal.state!r}")
        if journal.op is not None and journal.op not in OPS:
            problems.append(f"unknown op {journal.op!r}")
        for value in (journal.release, journal.previous, *journal.history, *journal.failed):
            if value is not None and not is_release_id(value):
                problems.append(f"bad release id {value!r}")
        if problems:
            raise ConfigError("release journal is malformed: " + "; ".join(problems))
        return journal

    def _require(self, *states: str) -> None:
        if self.state not in states:
            raise IllegalTransition(f"journal is {self.state!r}, expected one of {states}")

    # -- transitions -------------------------------------------------------

    def begin_install(self, release: str, current: str | None, op: str = OP_UPDATE) -> Journal:
        """idle → staging: ``release`` is being extracted and installed."""
        self._require(IDLE)
        return attrs.evolve(self, state=STAGING, op=op, release=release, previous=current)

    def begin_switch(self, release: str, current: str | None, op: str) -> Journal:
        """idle|staging → switched: ``current`` is about to name ``release``."""
        self._require(IDLE, STAGING)
        if self.state == STAGING and self.release != release:
            raise IllegalTransition(f"staged {self.release}, asked to switch to {release}")
        return attrs.evolve(self, state=SWITCHED, op=op, release=release, previous=current)

    def commit(self) -> Journal:
        """switched → idle: the new release is confirmed; record the rollback stack."""
        self._require(SWITCHED)
        history = list(self.history)
        if self.op == OP_ROLLBACK:
            # Undo down to the release we went back to.
            if self.release in history:
                del history[len(history) - 1 - history[::-1].index(self.release) :]
        elif self.previous is not None and self.previous != self.release:
            history.append(self.previous)
        history = [h for h in history if h != self.release]
        failed = tuple(f for f in self.failed if f != self.release)
        return Journal(history=tuple(history), failed=failed)

    def begin_revert(self) -> Journal:
        """switched → rolling_back: the new release failed; ``current`` goes back."""
        self._require(SWITCHED)
        return attrs.evolve(self, state=ROLLING_BACK)

    def abort(self) -> Journal:
        """staging|rolling_back → idle: nothing changed (history kept).

        After a rollback the release that was reverted is marked failed.
        """
        self._require(STAGING, ROLLING_BACK)
        failed = self.failed
        if self.state == ROLLING_BACK:
            failed = _with(failed, self.release)
        return Journal(history=self.history, failed=failed)

    def previous_good(self, complete: Iterable[str]) -> str | None:
        """The most recent release that was current before and did not fail since."""
        have = set(complete)
        for candidate in reversed(self.history):
            if candidate in have and candidate not in self.failed:
                return candidate
        return None

    def rollback_target(self, complete: Iterable[str]) -> str:
        """The release ``POST /rollback`` goes back to: the top of the stack that still exists."""
        have = set(complete)
        for candidate in reversed(self.history):
            if candidate in have:
                return candidate
        raise NoPreviousRelease("there is no previous release to roll back to")


# ---------------------------------------------------------------------------
# Start-up reconcile (pure planner)


@attrs.frozen
class DiskState:
    """What :meth:`ReleaseStore.scan` found on disk."""

    complete: tuple[str, ...] = ()  # oldest first (by install serial)
    incomplete: frozenset[str] = frozenset()
    current: str | None = None  # the release ``current`` names (may be incomplete)
    temp_links: tuple[str, ...] = ()
    trash: bool = False


@attrs.frozen
class PointCurrent:
    release: str | None


@attrs.frozen
class DiscardRelease:
    release: str


@attrs.frozen
class RemoveTempLink:
    name: str


@attrs.frozen
class EmptyTrash:
    pass


@attrs.frozen
class WriteJournal:
    journal: Journal


@attrs.frozen
class Plan:
    actions: tuple
    journal: Journal
    current: str | None
    notes: tuple[str, ...] = ()

    @property
    def moved_current(self) -> bool:
        return any(isinstance(a, PointCurrent) for a in self.actions)


def plan_reconcile(journal: Journal, disk: DiskState) -> Plan:
    """Decide how to bring the directory back to a consistent state after a start or crash."""
    actions: list = [RemoveTempLink(name) for name in disk.temp_links]
    if disk.trash:
        actions.append(EmptyTrash())
    complete = set(disk.complete)
    target, failed, notes = _undo_interrupted(journal, disk.current, complete)
    actions += [DiscardRelease(release) for release in sorted(disk.incomplete)]
    target = _complete_target(target, disk.current, journal.history, complete, notes)
    if target != disk.current:
        actions.append(PointCurrent(target))
    history = tuple(h for h in journal.history if h in complete and h != target)
    final = Journal(history=history, failed=tuple(f for f in failed if f in complete))
    if final != journal:
        actions.append(WriteJournal(final))
    return Plan(actions=tuple(actions), journal=final, current=target, notes=tuple(notes))


def _undo_interrupted(
    journal: Journal, current: str | None, complete: set[str]
) -> tuple[str | None, tuple[str, ...], list[str]]:
    """Where ``current`` should point after the transaction the journal records (the
    table in the module docstring), the failed releases, and what was done, in words."""
    if journal.state == STAGING:
        return (
            current,
            journal.failed,
            [f"interrupted install of {journal.release}: removed, current unchanged"],
        )
    if journal.state == SWITCHED and journal.op == OP_SELF and journal.release in complete:
        return (
            journal.release,
            journal.failed,
            [f"interrupted self-update to {journal.release}: completed"],
        )
    if journal.state in (SWITCHED, ROLLING_BACK):
        back_on = journal.previous or "nothing"
        note = f"interrupted {journal.op} to {journal.release}: back on {back_on}"
        failed = journal.failed
        if journal.state == ROLLING_BACK:
            # It had failed its health check; an interrupted switch merely was
            # not confirmed (the updater died, not necessarily the release).
            failed = _with(failed, journal.release)
        return journal.previous, failed, [note]
    return current, journal.failed, []


def _complete_target(
    target: str | None,
    current: str | None,
    history: tuple[str, ...],
    complete: set[str],
    notes: list[str],
) -> str | None:
    """``target`` if it is a complete release; else, on a host that had a ``current``, the
    most recent known-good release of the rollback history rather than nothing."""
    if target is not None and target not in complete:
        notes.append(f"current named {target}, which is not a complete release")
        target = None
    if target is None and current is not None:
        for candidate in reversed(history):
            if candidate in complete:
                notes.append(f"fell back to {candidate} from the rollback history")
                return candidate
    return target


def plan_prune(
    complete: Iterable[str],
    current: str | None,
    history: Iterable[str],
    keep: int,
    *,
    failed: Iterable[str] = (),
    in_use: Iterable[str] = (),
) -> list[str]:
    """Releases to delete so that at most ``keep`` remain, failed ones first.

    Never deleted, even beyond ``keep``: ``current``, the previous good release
    (the newest history entry that has not failed), the rollback target (the
    newest history entry), and every release in ``in_use``.  The rest is kept
    newest first, releases that did not fail before those that did.
    ``complete`` is ordered oldest first; the result is in deletion order.
    """
    ordered = list(complete)
    failed = set(failed)
    kept = _protected(ordered, current, history, failed, in_use)
    good = [r for r in ordered if r not in failed]
    bad = [r for r in ordered if r in failed]
    for release in [*reversed(good), *reversed(bad)]:
        if len(kept) >= max(keep, 0):
            break
        kept.add(release)
    return [r for r in [*bad, *good] if r not in kept]


def _protected(
    ordered: list[str],
    current: str | None,
    history: Iterable[str],
    failed: set[str],
    in_use: Iterable[str],
) -> set[str]:
    """The releases :func:`plan_prune` never deletes (see there)."""
    journal = Journal(history=tuple(h for h in history if h in ordered), failed=tuple(failed))
    protected = {r for r in (current, journal.previous_good(ordered)) if r in ordered}
    protected |= {r for r in in_use if r in ordered}
    if journal.history:
        protected.add(journal.history[-1])
    return protected


# ---------------------------------------------------------------------------
# The store (blocking I/O)


def discard_via_trash(
    source: Path,
    trash_dir: Path,
    name: str,
    step_name: str,
    step: Callable[[str], None],
    rmtree: Callable[[Path], None] = shutil.rmtree,
) -> None:
    """Delete directory ``source``: rename it into ``trash_dir`` (atomic, so it never looks
    half there), make the rename durable, then remove it.  ``step`` is the crash hook."""
    if not source.exists():
        return
    trash_dir.mkdir(mode=0o700, exist_ok=True)
    target = trash_dir / f"{name}-{os.getpid()}"
    if target.exists():
        rmtree(target)
    step(f"{step_name}:{name}")
    os.rename(source, target)
    fsync_dir(source.parent)
    step(f"{step_name}-rm:{name}")
    rmtree(target)


class ReleaseStore:
    """One release directory on disk.  Every method blocks; call them from a thread.

    ``crash_hook`` is for tests: it is called with a step name before every
    durable operation, and may raise to simulate a crash at exactly that point.
    """

    def __init__(self, root: str | os.PathLike, crash_hook: Callable[[str], None] | None = None):
        self.root = Path(root).absolute()
        self.releases_dir = self.root / config.RELEASES_DIR
        self.current_link = self.root / config.CURRENT_LINK
        self.journal_path = self.root / config.JOURNAL_FILE
        self.trash_dir = self.root / config.TRASH_DIR
        self._crash_hook = crash_hook
        self.journal = Journal()

    def _step(self, name: str) -> None:
        if self._crash_hook is not None:
            self._crash_hook(name)

    # -- reading -----------------------------------------------------------

    def ensure_layout(self) -> None:
        for path in (self.root, self.releases_dir):
            if not path.is_dir():
                path.mkdir(mode=0o755, parents=True, exist_ok=True)
                fsync_dir(path.parent)

    def read_journal(self) -> Journal:
        try:
            raw = self.journal_path.read_bytes()
        except FileNotFoundError:
            return Journal()
        return Journal.from_json(raw)

    def release_dir(self, release: str) -> Path:
        if not is_release_id(release):
            raise UnknownRelease(f"{release!r} is not a release id")
        return self.releases_dir / release

    def is_complete(self, release: str) -> bool:
        return (self.release_dir(release) / RELEASE_FILE).is_file()

    def release_info(self, release: str) -> dict:
        try:
            info = json.loads((self.release_dir(release) / RELEASE_FILE).read_text())
        except (FileNotFoundError, ValueError):
            raise UnknownRelease(f"no complete release {release}") from None
        return info if isinstance(info, dict) else {}

    def deps_refs(self) -> set[str]:
        """The dependency environments (``deps/<id>``) the complete releases here refer to."""
        refs = set()
        for release in self.scan().complete:
            with contextlib.suppress(UnknownRelease):
                deps = self.release_info(release).get("deps")
                if isinstance(deps, str):
                    refs.add(deps)
        return refs

    def current(self) -> str | None:
        """The release ``current`` names, or ``None`` (missing link, or not a release path)."""
        try:
            target = os.readlink(self.current_link)
        except (FileNotFoundError, OSError):
            return None
        parts = Path(target).parts
        if len(parts) == 2 and parts[0] == config.RELEASES_DIR and is_release_id(parts[1]):
            return parts[1]
        return None

    def in_use(self, release: str) -> bool:
        """True if a running process pins ``release`` (holds a shared lock on its release.json)."""
        with self._exclusive_pin(release) as free:
            return not free

    @contextlib.contextmanager
    def _exclusive_pin(self, release: str):
        """Try an exclusive ``flock`` on ``release.json``; yields whether it was free.

        Held for the block, so a daemon cannot pin the release while it is
        being renamed into the trash.
        """
        try:
            fd = os.open(self.release_dir(release) / RELEASE_FILE, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            yield True
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    def current_dir(self) -> Path | None:
        release = self.current()
        return self.release_dir(release) if release and self.is_complete(release) else None

    def scan(self) -> DiskState:
        complete, incomplete = [], set()
        if self.releases_dir.is_dir():
            for entry in self.releases_dir.iterdir():
                if not (is_release_id(entry.name) and entry.is_dir() and not entry.is_symlink()):
                    continue
                if (entry / RELEASE_FILE).is_file():
                    complete.append((self._order(entry.name), entry.name))
                else:
                    incomplete.add(entry.name)
        temp_links: tuple[str, ...] = ()
        if self.root.is_dir():
            # A new ``current`` link, or atomic_write's temporary journal, that a
            # crash left before its rename.
            patterns = (_TEMP_LINK_PREFIX + "*", f".{config.JOURNAL_FILE}.tmp-*")
            temp_links = tuple(sorted(p.name for pat in patterns for p in self.root.glob(pat)))
        trash = self.trash_dir.is_dir() and any(self.trash_dir.iterdir())
        return DiskState(
            complete=tuple(r for _, r in sorted(complete)),
            incomplete=frozenset(incomplete),
            current=self.current(),
            temp_links=temp_links,
            trash=trash,
        )

    def _order(self, release: str) -> tuple[int, str]:
        try:
            info = self.release_info(release)
        except UnknownRelease:
            return (0, "")
        serial = info.get("serial")
        return (serial if isinstance(serial, int) else 0, str(info.get("installed_at") or ""))

    def _serial(self, release: str) -> int:
        return self._order(release)[0]

    def list_releases(self) -> list[dict]:
        """Every complete release, newest first: current, rollback target, failed, in use."""
        current = self.current()
        rollback_to = None
        disk = self.scan()
        with contextlib.suppress(NoPreviousRelease):
            rollback_to = self.journal.rollback_target(disk.complete)
        out = []
        for release in reversed(disk.complete):
            info = self.release_info(release)
            out.append(
                {
                    "id": release,
                    "installed_at": info.get("installed_at"),
                    "git_sha": info.get("git_sha"),
                    "sha256": info.get("sha256"),
                    "deps": info.get("deps"),
                    "current": release == current,
                    "rollback_target": release == rollback_to,
                    "failed": release in self.journal.failed,
                    "in_use": self.in_use(release),
                }
            )
        return out

    # -- durable primitives ------------------------------------------------

    def _write_journal(self, journal: Journal) -> None:
        self._step(f"journal:{journal.state}")
        atomic_write(self.journal_path, journal.to_json())
        self.journal = journal

    def _point_current(self, release: str | None) -> None:
        self._step(f"current:{release}")
        if release is None:
            with contextlib.suppress(FileNotFoundError):
                self.current_link.unlink()
            fsync_dir(self.root)
            return
        tmp = self.root / f"{_TEMP_LINK_PREFIX}{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(f"{config.RELEASES_DIR}/{release}", tmp)
        self._step("current:rename")
        os.replace(tmp, self.current_link)
        fsync_dir(self.root)

    def _discard(self, release: str) -> None:
        """Delete a release: rename it into ``.trash`` (atomic), then remove it."""
        discard_via_trash(self.release_dir(release), self.trash_dir, release, "discard", self._step)
        with contextlib.suppress(OSError):
            self.trash_dir.rmdir()  # only when empty

    def _empty_trash(self) -> None:
        if self.trash_dir.is_dir():
            for entry in self.trash_dir.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            self.trash_dir.rmdir()

    # -- transactions (one at a time; the updater serialises them) ---------

    def reconcile(self) -> Plan:
        """Repair whatever a crash left; returns the plan that was applied."""
        self.ensure_layout()
        journal = self.read_journal()
        plan = plan_reconcile(journal, self.scan())
        for action in plan.actions:
            if isinstance(action, RemoveTempLink):
                with contextlib.suppress(FileNotFoundError):
                    (self.root / action.name).unlink()
            elif isinstance(action, EmptyTrash):
                self._empty_trash()
            elif isinstance(action, DiscardRelease):
                self._discard(action.release)
            elif isinstance(action, PointCurrent):
                self._point_current(action.release)
            elif isinstance(action, WriteJournal):
                self._write_journal(action.journal)
        self._empty_trash()
        self.journal = plan.journal
        return plan

    def begin_install(self, release: str, op: str = OP_UPDATE) -> Path:
        """Journal ``staging`` and create the (empty) release directory."""
        journal = self.journal.begin_install(release, self.current(), op)
        directory = self.release_dir(release)
        if directory.exists():  # an incomplete leftover: start from scratch
            self._discard(release)
        self._write_journal(journal)
        self._step("mkdir")
        directory.mkdir(mode=0o755)
        fsync_dir(self.releases_dir)
        return directory

    def finish_install(self, release: str, info: dict, install_log: str = "") -> None:
        """Make the release durable, then mark it complete with ``release.json``."""
        directory = self.release_dir(release)
        (directory / config.RELEASE_INSTALL_LOG).write_text(install_log)
        # ``serial`` orders releases by install, whatever the clock says.
        serial = 1 + max((self._serial(r) for r in self.scan().complete), default=0)
        self._step("sync")
        os.sync()  # every file pip and the extractor wrote, in one call
        doc = {**info, "id": release, "serial": serial}
        body = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
        self._step("release.json")
        atomic_write(directory / RELEASE_FILE, body)

    def abort_install(self, release: str) -> None:
        """Remove a release that failed to install; ``current`` never moved."""
        self._discard(release)
        self._write_journal(self.journal.abort())

    def switch_to(self, release: str, op: str) -> str | None:
        """Journal ``switched`` and point ``current`` at ``release``; returns the previous one."""
        if not self.is_complete(release):
            raise UnknownRelease(f"no complete release {release}")
        previous = self.current()
        self._write_journal(self.journal.begin_switch(release, previous, op))
        self._point_current(release)
        return previous

    def commit(self) -> None:
        self._write_journal(self.journal.commit())

    def begin_revert(self) -> str | None:
        """Journal ``rolling_back`` and point ``current`` back at the previous release."""
        self._write_journal(self.journal.begin_revert())
        self._point_current(self.journal.previous)
        return self.journal.previous

    def finish_revert(self) -> None:
        self._write_journal(self.journal.abort())

    def prune(self, keep: int) -> list[str]:
        """Delete releases beyond ``keep`` (see :func:`plan_prune`); returns those deleted.

        A release pinned between the plan and its deletion is kept: the pin is
        checked again under the exclusive lock that is held across the rename.
        """
        disk = self.scan()
        in_use = [r for r in disk.complete if self.in_use(r)]
        doomed = plan_prune(
            disk.complete,
            disk.current,
            self.journal.history,
            keep,
            failed=self.journal.failed,
            in_use=in_use,
        )
        deleted = []
        for release in doomed:
            with self._exclusive_pin(release) as free:
                if free:
                    self._discard(release)
                    deleted.append(release)
        if deleted:
            journal = attrs.evolve(
                self.journal,
                history=tuple(h for h in self.journal.history if h not in deleted),
                failed=tuple(f for f in self.journal.failed if f not in deleted),
            )
            if journal != self.journal:
                self._write_journal(journal)
        return deleted

    def rollback_target(self, to: str | None) -> str:
        """Validate a rollback target: a named complete release, or the top of the stack."""
        disk = self.scan()
        if to is None:
            return self.journal.rollback_target(disk.complete)
        if not is_release_id(to) or to not in disk.complete:
            raise UnknownRelease(f"no complete release {to!r} is installed (see `releases`)")
        return to
