"""The master's listener list: what ``decnet-admin enroll`` and ``bundle refresh`` hand out.

Kept in ``<home>/listeners.json`` as ``{"listeners": ["HOST:PORT", ...]}``, in
order.  Every change is a read-modify-write under the file's lock and lands
with one atomic, durable replace, so two operators editing at once both keep
their edit and a crash leaves the old list or the new one.  Blocking (file
I/O); the CLI calls it directly.
"""

from __future__ import annotations

import json

import attrs

from decnet import config, pki
from decnet.errors import ConfigError, ValidationError
from decnet.fsutil import atomic_write, lock_path_for, locked


@attrs.frozen
class ListenerEdit:
    """What an edit did: the list after it, and whether it changed anything."""

    listeners: tuple[str, ...]
    changed: bool


def read_listeners(paths: config.MasterPaths) -> list[str]:
    """The current list (empty when none was set: bundles then name the master alone)."""
    try:
        doc = json.loads(paths.listeners.read_text())
    except FileNotFoundError:
        return []
    except ValueError:
        raise ValidationError(
            f"{paths.listeners} is not valid JSON; fix or remove it (it only holds the "
            "listener list)"
        ) from None
    listed = doc.get("listeners") if isinstance(doc, dict) else None
    if listed == []:
        return []
    try:
        return pki.validate_listeners(listed)
    except ValidationError as exc:
        raise ValidationError([f"{paths.listeners}: {p}" for p in exc.problems]) from None


def _write(paths: config.MasterPaths, listeners: list[str]) -> None:
    doc = {"listeners": listeners}
    try:
        atomic_write(paths.listeners, (json.dumps(doc, indent=2) + "\n").encode())
    except OSError as exc:  # a full disk, a read-only home: the old list stays in force
        raise ConfigError(
            f"cannot write {paths.listeners} ({exc.strerror or exc}); the list is unchanged"
        ) from None


def add_listener(
    paths: config.MasterPaths, listener: str, *, position: int | None = None
) -> ListenerEdit:
    """Add ``listener`` (at ``position``, 0-based; at the end by default).  Adding one that
    is already listed changes nothing."""
    spelled = pki.format_listener(*pki.parse_listener(listener))
    paths.home.mkdir(parents=True, exist_ok=True)
    with locked(lock_path_for(paths.listeners)):
        current = read_listeners(paths)
        if spelled in current:
            return ListenerEdit(tuple(current), False)
        if len(current) >= pki.MAX_LISTENERS:
            raise ValidationError(f"the list already holds {pki.MAX_LISTENERS} listeners")
        at = len(current) if position is None else max(0, min(position, len(current)))
        current.insert(at, spelled)
        _write(paths, current)
        return ListenerEdit(tuple(current), True)


def remove_listener(paths: config.MasterPaths, listener: str) -> ListenerEdit:
    """Remove ``listener``; one that is not listed is an error naming the list."""
    spelled = pki.format_listener(*pki.parse_listener(listener))
    with locked(lock_path_for(paths.listeners)):
        current = read_listeners(paths)
        if spelled not in current:
            listed = ", ".join(current) or "none"
            raise ValidationError(f"listener {spelled} is not in the list (listed: {listed})")
        current.remove(spelled)
        _write(paths, current)
        return ListenerEdit(tuple(current), True)
