"""``sandbox.json``: which processes a sandbox runs, and whether a recorded PID is still them.

The file is written atomically by ``sandbox up`` (and cleaned by ``sandbox
down``); ``status``, ``down`` and ``poke`` only read it::

    {"format": "decnet-sandbox/1",
     "net": 1,
     "phase": "starting" | "running" | "stopping" | "stopped",
     "up": {"pid": 4242, "start": 123456, "argv": [...]} | null,
     "listener": {"host": "127.0.0.1", "port": 40123} | null,
     "release": "4d0c90aa69f02cf7" | null,
     "processes": {"listener": {"pid", "start", "argv", "log"}, "w1-updater": ..., ...},
     "workers": {"w1": {"address", "agent_port", "updater_port", "decoy_log", "spec"}, ...}}

A PID alone is not an identity: once a process is gone its number is reused.
Every record carries the process's **start time** (field 22 of
``/proc/<pid>/stat``, clock ticks since boot), and a PID counts as "still that
process" only when the start time matches.  Only the recorded PIDs are ever
looked at; ``/proc`` is never scanned.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import attrs

from decnet.errors import ConfigError
from decnet.fsutil import atomic_write

FORMAT = "decnet-sandbox/1"
PHASES = ("starting", "running", "stopping", "stopped")


@attrs.frozen
class ProcessRecord:
    pid: int
    start: int | None
    argv: tuple[str, ...] = ()
    log: str | None = None

    def as_dict(self) -> dict:
        return {"pid": self.pid, "start": self.start, "argv": list(self.argv), "log": self.log}

    @classmethod
    def from_dict(cls, doc: dict) -> ProcessRecord:
        return cls(
            pid=int(doc["pid"]),
            start=doc.get("start"),
            argv=tuple(doc.get("argv") or ()),
            log=doc.get("log"),
        )


def empty_state(net: int) -> dict:
    return {
        "format": FORMAT,
        "net": net,
        "phase": "stopped",
        "up": None,
        "listener": None,
        "release": None,
        "processes": {},
        "workers": {},
    }


def load(path: Path) -> dict | None:
    """The sandbox's state, or ``None`` when there is none; ``ConfigError`` if unreadable."""
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a DECNET sandbox state file ({FORMAT})")
    return doc


def dump(doc: dict) -> bytes:
    """The file's bytes (made where ``doc`` lives, so a thread never reads a changing dict)."""
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def write(path: Path, data: bytes) -> None:
    """Replace the state file atomically (blocking: the thread pool's job in ``up``)."""
    atomic_write(path, data, 0o600)


def save(path: Path, doc: dict) -> None:
    write(path, dump(doc))


def processes(doc: dict) -> dict[str, ProcessRecord]:
    return {name: ProcessRecord.from_dict(p) for name, p in (doc.get("processes") or {}).items()}


def up_record(doc: dict) -> ProcessRecord | None:
    return ProcessRecord.from_dict(doc["up"]) if doc.get("up") else None


# -- process identity ----------------------------------------------------------

PROC = Path("/proc")


def parse_stat(text: str) -> tuple[str, int]:
    """``(state, start time)`` from the text of ``/proc/<pid>/stat``.

    The command name (field 2) is in parentheses and may itself contain spaces
    and parentheses, so the fields are counted from the *last* ``)``.
    """
    rest = text[text.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state); field 22 (starttime) is rest[19].
    return rest[0], int(rest[19])


def start_time(pid: int, proc: Path = PROC) -> int | None:
    """The start time of process ``pid``, or ``None`` if it does not exist (or is a zombie)."""
    try:
        state, start = parse_stat((proc / str(pid) / "stat").read_text())
    except (FileNotFoundError, ProcessLookupError, PermissionError, ValueError, IndexError):
        return None
    return None if state in ("Z", "X") else start


def is_running(record: ProcessRecord, proc: Path = PROC) -> bool:
    """Whether ``record.pid`` is still the very process that was recorded."""
    if not (proc / "self" / "stat").exists():  # no procfs: the PID is all we have
        try:
            os.kill(record.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    started = start_time(record.pid, proc)
    return started is not None and (record.start is None or started == record.start)


def signal_if_running(record: ProcessRecord, sig: int = signal.SIGTERM, proc: Path = PROC) -> bool:
    """Send ``sig`` to the recorded process if it is still that process; whether it was sent."""
    if not is_running(record, proc):
        return False
    try:
        os.kill(record.pid, sig)
    except ProcessLookupError:
        return False
    return True
