"""The command line of every daemon ``sandbox up`` starts (pure).

Each is the real ``twistd`` plugin run from the ``twistd`` next to the running
interpreter, in the foreground, without a pid file, logging to
``<dir>/logs/<name>.log``.  Addresses and ports are given explicitly, never
taken from a bundle: a bundle made by an earlier ``up`` names the listener
port of that run.
"""

from __future__ import annotations

import sys
from pathlib import Path

from decnet import config
from decnet.sandbox.layout import SandboxLayout, WorkerLayout

LISTENER = "listener"


def updater_name(worker: str) -> str:
    return f"{worker}-updater"


def forwarder_name(worker: str) -> str:
    return f"{worker}-forwarder"


def agent_name(worker: str) -> str:
    """The agent is the updater's child; only its log file carries this name."""
    return f"{worker}-agent"


def twistd_path() -> str:
    """The ``twistd`` next to this interpreter (the environment decnet runs from)."""
    return str(Path(sys.executable).parent / "twistd")


def twistd_argv(log: Path, plugin: str, *args: str) -> list[str]:
    return [twistd_path(), "--nodaemon", "--pidfile=", "--logfile", str(log), plugin, *args]


def listener_argv(layout: SandboxLayout) -> list[str]:
    """The master's listener on 127.0.0.1, an ephemeral port written to its port file."""
    return twistd_argv(
        layout.log(LISTENER),
        "decnet-listener",
        "--home",
        str(layout.master.home),
        "--listen",
        f"tcp:0:interface={config.SANDBOX_MASTER_HOST}",
        "--port-file",
        str(layout.listener_port_file),
    )


def worker_argv(log: Path, plugin: str, w: WorkerLayout, *args: str) -> list[str]:
    """A worker daemon, with that worker's enrollment bundle."""
    return twistd_argv(log, plugin, "--bundle", str(w.bundle), *args)


def updater_argv(layout: SandboxLayout, w: WorkerLayout) -> list[str]:
    """The worker's updater, supervising the agent it runs from its current release."""
    return worker_argv(
        layout.log(updater_name(w.name)),
        "decnet-updater",
        w,
        "--listen",
        f"tcp:{w.updater_port}:interface={w.address}",
        "--install-dir",
        str(w.install_dir),
        "--agent-url",
        f"https://{w.address}:{w.agent_port}",
        "--agent-control",
        "spawn",
        "--agent-state-dir",
        str(w.agent_state),
        "--agent-log-file",
        str(w.decoy_log),
        "--agent-twistd-log",
        str(layout.log(agent_name(w.name))),
        # Python compiles what it imports on first use; pip need not compile everything.
        "--no-compile",
    )


def forwarder_argv(layout: SandboxLayout, w: WorkerLayout, listener_port: int) -> list[str]:
    """The worker's forwarder: its decoy log to this run's listener, acknowledged mode only."""
    return worker_argv(
        layout.log(forwarder_name(w.name)),
        "decnet-forwarder",
        w,
        "--log-file",
        str(w.decoy_log),
        "--master-host",
        config.SANDBOX_MASTER_HOST,
        "--master-port",
        str(listener_port),
        "--state",
        str(w.forwarder_state),
        "--mode",
        "ack",
        "--max-retry-delay",
        str(config.SANDBOX_FORWARDER_RETRY),
    )
