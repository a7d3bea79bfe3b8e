"""Where a sandbox keeps everything, and which loopback addresses it uses (pure).

One directory holds a whole local swarm (``docs/Sandbox.md``)::

    <dir>/
      master/                 the master home: CA, registry, revoked.json, ingest/
      workers/<name>/         bundle/ install/ agent-state/ decnet.log forwarder.sqlite
      logs/<process>.log      the twistd log of every child; sandbox.log is `up`'s own
      cache/                  the offline wheelhouse, release tarballs
      sandbox.json            what runs (see :mod:`decnet.sandbox.state`)

Worker ``w<i>`` answers on ``127.0.<net>.<i>`` (agent 8765, updater 8766, as on
a real host) and its decky ``j`` binds ``127.<net>.<i>.<j>`` with unprivileged
ports.  Linux routes all of ``127.0.0.0/8`` to the loopback interface, so no
interface needs configuring and no port is shared between workers.
"""

from __future__ import annotations

import os
from pathlib import Path

import attrs

from decnet import config
from decnet.errors import ValidationError

WORKER_PREFIX = "w"

# The default decky set of every worker: all seven service types, on the
# unprivileged twin of each standard port (no capability needed).
DECKIES: tuple[tuple[str, tuple[dict, ...]], ...] = (
    (
        "web-01",
        (
            {"type": "ssh", "port": 2222, "version": "SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3"},
            {
                "type": "http",
                "port": 8080,
                "server": "Apache/2.4.62 (Debian)",
                "title": "Intranet sign in",
            },
        ),
    ),
    (
        "files-02",
        (
            {"type": "ftp", "port": 2121, "banner": "(vsFTPd 3.0.3)"},
            {"type": "telnet", "port": 2323, "banner": "Ubuntu 22.04.4 LTS"},
            {"type": "smtp", "port": 2525, "hostname": "mail.corp.example"},
        ),
    ),
    (
        "cache-03",
        (
            {"type": "redis", "port": 6379},
            # A MySQL 8 greeting's first bytes, as a scanner expects on 3306.
            {"type": "tcp-banner", "port": 3306, "banner": "J\x00\x00\x00\n8.0.36\x00"},
        ),
    ),
)


def short(path: str | os.PathLike) -> str:
    """``path`` relative to the current directory when it is below it (shorter lines)."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def worker_name(index: int) -> str:
    return f"{WORKER_PREFIX}{index}"


def validate(workers: int, net: int) -> None:
    problems = []
    if not 1 <= workers <= config.SANDBOX_MAX_WORKERS:
        problems.append(f"--workers must be 1-{config.SANDBOX_MAX_WORKERS}, got {workers}")
    if not 1 <= net <= 254:
        problems.append(f"--net must be 1-254, got {net}")
    if problems:
        raise ValidationError(problems)


def worker_address(net: int, index: int) -> str:
    return f"127.0.{net}.{index}"


def decky_address(net: int, index: int, decky: int) -> str:
    return f"127.{net}.{index}.{decky}"


def default_spec(net: int, index: int) -> dict:
    """The deployment spec of worker ``index``: :data:`DECKIES` on its decky addresses."""
    deckies = []
    for j, (name, services) in enumerate(DECKIES, start=1):
        bind = decky_address(net, index, j)
        deckies.append({"name": name, "services": [{**s, "bind": bind} for s in services]})
    return {"format": "decnet-spec/1", "deckies": deckies}


def spec_targets(spec: dict) -> list[dict]:
    """Every service of ``spec`` as ``{"decky", "service", "type", "address", "port"}``."""
    out = []
    for decky in spec["deckies"]:
        for service in decky["services"]:
            out.append(
                {
                    "decky": decky["name"],
                    "service": service.get("name", service["type"]),
                    "type": service["type"],
                    "address": service["bind"],
                    "port": service["port"],
                }
            )
    return out


@attrs.frozen
class WorkerLayout:
    """One worker's files and addresses."""

    name: str
    index: int
    net: int
    root: Path

    @property
    def address(self) -> str:
        return worker_address(self.net, self.index)

    @property
    def bundle(self) -> Path:
        return self.root / "bundle"

    @property
    def install_dir(self) -> Path:
        return self.root / "install"

    @property
    def agent_state(self) -> Path:
        return self.root / "agent-state"

    @property
    def decoy_log(self) -> Path:
        """The agent's RFC 5424 event log, which the forwarder ships."""
        return self.root / "decnet.log"

    @property
    def forwarder_state(self) -> Path:
        return self.root / config.FORWARDER_STATE_FILE

    @property
    def agent_port(self) -> int:
        return config.AGENT_PORT

    @property
    def updater_port(self) -> int:
        return config.UPDATER_PORT

    def spec(self) -> dict:
        return default_spec(self.net, self.index)


@attrs.frozen
class SandboxLayout:
    """The paths of one sandbox directory."""

    root: Path

    @classmethod
    def at(cls, directory: str | os.PathLike) -> SandboxLayout:
        return cls(Path(directory).expanduser().absolute())

    @property
    def master(self) -> config.MasterPaths:
        return config.MasterPaths(self.root / "master")

    @property
    def workers_dir(self) -> Path:
        return self.root / "workers"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    @property
    def state_file(self) -> Path:
        return self.root / config.SANDBOX_STATE_FILE

    @property
    def lock_file(self) -> Path:
        return self.root / ".up.lock"

    @property
    def listener_port_file(self) -> Path:
        return self.master.home / "listener.port"

    def log(self, process: str) -> Path:
        return self.logs_dir / f"{process}.log"

    def worker(self, index: int, net: int) -> WorkerLayout:
        name = worker_name(index)
        return WorkerLayout(name, index, net, self.workers_dir / name)

    def feed(self, worker: str, stream: str = config.DEFAULT_STREAM) -> Path:
        """The master's JSON lines feed of ``worker`` (``docs/Logging.md``)."""
        return self.master.ingest_dir / worker / f"{stream}.jsonl"

    def mirror(self, worker: str, stream: str = config.DEFAULT_STREAM) -> Path:
        """The master's byte-exact copy of ``worker``'s decoy log."""
        return self.master.ingest_dir / worker / f"{stream}.log"
