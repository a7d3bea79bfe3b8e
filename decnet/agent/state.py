"""The agent's desired state on disk: the last accepted spec, re-applied at start.

One JSON file in the state directory, replaced atomically (write, fsync,
rename, fsync the directory) through :func:`decnet.fsutil.atomic_write`, always
from a thread.  A file that cannot be read back (hand-edited, or from a newer
agent) is moved aside and the agent starts with nothing deployed: the master
can always deploy again, whereas an agent that refuses to start cannot be
fixed remotely.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from twisted.logger import Logger

from decnet.agent.spec import DeploymentSpec, parse_spec
from decnet.errors import ValidationError
from decnet.fsutil import atomic_write, ensure_private_dir
from decnet.interfaces import IDecnetReactor
from decnet.threads import run_in_pool

FORMAT = "decnet-agent-state/1"


class DesiredState:
    """Load and save the desired :class:`DeploymentSpec` in ``path``."""

    log = Logger()

    def __init__(self, path: str | os.PathLike, reactor: IDecnetReactor):
        self.path = Path(path)
        self._reactor = reactor

    def _thread(self, fn, *args):
        return run_in_pool(self._reactor, fn, *args)

    def load(self):
        """A Deferred firing with the saved spec, or ``None`` when there is none."""
        return self._thread(self.load_blocking)

    def save(self, spec: DeploymentSpec):
        return self._thread(self.save_blocking, spec)

    def load_blocking(self) -> DeploymentSpec | None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            doc = json.loads(raw)
            if doc.get("format") != FORMAT:
                raise ValueError(f"unexpected format {doc.get('format')!r}")
            return parse_spec(doc["spec"])
        except (ValueError, KeyError, TypeError, AttributeError, ValidationError) as exc:
            aside = self.path.with_name(self.path.name + ".unreadable")
            os.replace(self.path, aside)
            self.log.error(
                "Desired state {path} is unreadable ({error}); moved to {aside}, "
                "starting with nothing deployed",
                path=str(self.path),
                error=str(exc),
                aside=str(aside),
            )
            return None

    def save_blocking(self, spec: DeploymentSpec) -> None:
        ensure_private_dir(self.path.parent)
        doc = {"format": FORMAT, "spec": spec.canonical(), "spec_hash": spec.digest}
        atomic_write(self.path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode(), 0o600)
