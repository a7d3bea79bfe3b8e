"""Which release the running code belongs to.

A release installed by the updater lives in ``<install>/releases/<id>/`` with
its own virtualenv in ``venv/`` and a ``release.json`` written at install time
(``{"id": ..., "installed_at": ..., "git_sha": ...}``).  Daemons started from
that venv find it next to ``sys.prefix``; ``$DECNET_RELEASE_ID`` overrides it
(the updater sets it when it supervises the agent itself).  Code run from a
checkout has no release: ``None``.
"""

from __future__ import annotations

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
