"""Which release the running code belongs to.

A release installed by the updater lives in ``<install>/releases/<id>/`` with
its own virtualenv in ``venv/`` and a ``release.json`` written at install time
(``{"id": ..., "installed_at": ..., "git_sha": ...}``).  Daemons started from
that venv find it next to ``sys.prefix``; ``$DECNET_RELEASE_ID`` overrides it
(the updater sets it when it supervises the agent itself).  Code run from a
checkout has no release: ``None``.

A daemon started from a release *pins* it (:func:`pin_running_release`): it
holds a shared ``flock`` on that release's ``release.json`` for as long as the
process lives.  The updater never deletes a release whose ``release.json`` it
cannot lock exclusively (``ReleaseStore.in_use``), so the forwarder keeps the
release it was started from even after the agent has moved on.  A lock, not a
scan of ``/proc``: it needs no permission on other users' processes
(``ProtectProc=invisible``), and the kernel drops it when the process dies,
even by ``kill -9``.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from pathlib import Path

ENV_RELEASE_ID = "DECNET_RELEASE_ID"
RELEASE_FILE = "release.json"


def release_info(prefix: str | os.PathLike | None = None) -> dict | None:
    """The ``release.json`` of the release whose venv is ``prefix`` (default: ours)."""
    path = Path(prefix or sys.prefix).parent / RELEASE_FILE
    try:
        info = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("id"), str) else None


def release_id() -> str | None:
    """The running release's id, or ``None`` when running outside a release."""
    env = os.environ.get(ENV_RELEASE_ID, "").strip()
    if env:
        return env
    info = release_info()
    return info["id"] if info else None


_pins: dict[Path, int] = {}  # release.json -> the descriptor holding its shared lock


def release_file(prefix: str | os.PathLike | None = None) -> Path:
    """The ``release.json`` of the release whose venv is ``prefix`` (default: ours)."""
    return Path(prefix or sys.prefix).parent / RELEASE_FILE


def pin_running_release(prefix: str | os.PathLike | None = None) -> Path | None:
    """Hold a shared ``flock`` on our release's ``release.json`` until this process exits.

    Returns the file pinned, or ``None`` when not running from a release (a
    checkout, a development venv).  Idempotent.  The descriptor is
    close-on-exec: an ``exec`` onto another release (``update-self``) pins that
    one instead.  Blocks only while the updater is deleting this very release
    (it holds the exclusive lock for a rename), which is milliseconds.
    """
    path = release_file(prefix)
    if path in _pins:
        return path
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    fcntl.flock(fd, fcntl.LOCK_SH)
    _pins[path] = fd
    return path
