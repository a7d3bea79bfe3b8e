"""The revocation list: which certificate fingerprints nobody may present any more.

The master writes ``<home>/revoked.json`` (``decnet-admin decommission``);
daemons load it at start and reload it when it changes (polled on the injected
clock) or on ``SIGHUP``.  Format (documented in ``docs/Security.md``)::

    {"format": "decnet-revocations/1",
     "revoked": [{"fingerprint": "<sha256 hex>", "cn": "...", "role": "...",
                  "revoked_at": "<ISO 8601 UTC>"}, ...]}

A reload swaps the in-memory set; connections whose peer is unaffected are
never touched.  Subscribers are told which fingerprints became revoked so a
daemon can cut live connections of a peer that was just decommissioned.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from decnet.errors import ConfigError, ValidationError
from decnet.fsutil import atomic_write, lock_path_for, locked
from decnet.interfaces import IDecnetReactor
from decnet.pki import normalize_fingerprint
from decnet.threads import run_in_pool

FORMAT = "decnet-revocations/1"
RELOAD_INTERVAL = 2.0


def read_entries(path: str | os.PathLike) -> list[dict]:
    """Parse a revocation file; a missing file is an empty list, a bad one an error."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    try:
        doc = json.loads(raw)
        if doc.get("format") != FORMAT or not isinstance(doc.get("revoked"), list):
            raise ValueError("unexpected format")
        entries = [dict(e) for e in doc["revoked"]]
        for entry in entries:
            entry["fingerprint"] = normalize_fingerprint(entry["fingerprint"])
        return entries
    except (ValueError, TypeError, KeyError, AttributeError, ValidationError) as exc:
        raise ConfigError(f"revocation file {path} is malformed: {exc}") from None


def add_entries(path: str | os.PathLike, new: Iterable[dict]) -> list[dict]:
    """Add entries (deduplicated by fingerprint); return the ones that were not there yet.

    The read, the merge and the atomic rewrite happen under an ``flock`` on
    ``.revoked.json.lock``, so two ``decommission`` runs at once both land
    (without it, the later rename silently dropped the other's entries).  The
    file is rewritten only when something was added.
    """
    with locked(lock_path_for(path)):
        entries = read_entries(path)
        known = {e["fingerprint"] for e in entries}
        added = []
        for entry in new:
            fp = normalize_fingerprint(entry["fingerprint"])
            if fp not in known:
                added.append({**entry, "fingerprint": fp})
                known.add(fp)
        if added:
            doc = {"format": FORMAT, "revoked": entries + added}
            body = json.dumps(doc, indent=2, sort_keys=True) + "\n"
            atomic_write(path, body.encode())
    return added


class RevocationSet:
    """The fingerprints currently revoked, optionally backed by a file."""

    log = Logger()

    def __init__(self, path: str | os.PathLike | None = None, fingerprints: Iterable[str] = ()):
        self.path = Path(path) if path is not None else None
        self._fingerprints = frozenset(normalize_fingerprint(f) for f in fingerprints)
        self._stamp: tuple | None = None
        self._subscribers: list[Callable[[frozenset[str]], None]] = []
        if self.path is not None:
            self.reload()

    def __contains__(self, fp: str) -> bool:
        return fp in self._fingerprints

    def __len__(self) -> int:
        return len(self._fingerprints)

    def subscribe(self, callback: Callable[[frozenset[str]], None]) -> None:
        """Call ``callback(newly_revoked)`` after each reload that revoked something."""
        self._subscribers.append(callback)

    def _file_stamp(self, path: Path) -> tuple | None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def read_if_changed(self) -> frozenset[str] | None:
        """The fingerprints in the file, or ``None`` if it has not changed.

        Blocking (a stat and a small read): daemons reach it through
        :class:`RevocationWatcher`, which runs it in the thread pool.  Raises
        :class:`ConfigError` for a malformed file.  A set without a file never changes.
        """
        if self.path is None:
            return None
        stamp = self._file_stamp(self.path)
        if self._stamp is not None and stamp == self._stamp:
            return None
        fingerprints = frozenset(e["fingerprint"] for e in read_entries(self.path))
        self._stamp = stamp
        return fingerprints

    def apply(self, fingerprints: frozenset[str] | None) -> bool:
        """Swap in a new set (``None`` = unchanged); tell subscribers what was added."""
        if fingerprints is None:
            return False
        added = fingerprints - self._fingerprints
        changed = fingerprints != self._fingerprints
        self._fingerprints = fingerprints
        if changed:
            self.log.info(
                "Revocation list now holds {count} fingerprints ({added} new)",
                count=len(fingerprints),
                added=len(added),
            )
        for callback in self._subscribers if added else ():
            callback(frozenset(added))
        return changed

    def reload(self) -> bool:
        """Synchronous reload, for start-up and the CLI."""
        return self.apply(self.read_if_changed())


class RevocationWatcher(Service):
    """Reload a :class:`RevocationSet` periodically (and on demand, e.g. SIGHUP)."""

    log = Logger()

    def __init__(
        self, revocations: RevocationSet, reactor: IDecnetReactor, interval: float = RELOAD_INTERVAL
    ):
        self.revocations = revocations
        self._reactor = reactor
        self._loop = LoopingCall(self.check)
        self._loop.clock = reactor
        self.interval = interval

    def startService(self):
        super().startService()
        self._loop.start(self.interval, now=False)

    def stopService(self):
        if self._loop.running:
            self._loop.stop()
        return super().stopService()

    def check(self):
        """Reload in a thread; a malformed file keeps the previous list and logs why."""
        rs = self.revocations
        d = run_in_pool(self._reactor, rs.read_if_changed)
        d.addCallback(rs.apply)
        d.addErrback(self._failed)
        return d

    def _failed(self, failure):
        if failure.check(ConfigError):
            self.log.error(
                "Keeping the previous revocation list: {error}", error=failure.getErrorMessage()
            )
        else:
            self.log.failure("Revocation reload failed", failure)
