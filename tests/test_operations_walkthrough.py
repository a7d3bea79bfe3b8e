"""docs/Operations.md, executed: its ``<!-- walkthrough -->`` blocks, in order, on loopback.

Each marked block runs in ``bash -euo pipefail`` as written, with the documented
addresses and paths mapped to this machine (:data:`SUBSTITUTIONS`).  ``systemctl``
is played by this test, which runs each daemon as a real ``twistd`` process: the
listener, the updater with ``--agent-control spawn`` (its agent is its child), and
the forwarder once an agent release is current (what the units'
``ConditionPathExists=`` and the updater do under systemd).  ``scp`` copies into
the worker's directory.  A doc step that fails, or a swarm that does not work at
the end (a decoy event must reach the master's mirror), fails the test.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from decnet import config
from tests.support import BIN, REPO_ROOT, free_port, https_get_json, wait_for

pytestmark = pytest.mark.slow

OPERATIONS = REPO_ROOT / "docs" / "Operations.md"
MASTER = "127.0.66.10"  # master.example.org
WORKER = "127.0.66.21"  # 192.0.2.21 (web-01)
WORKER_NAME = "web-01"
# The systemctl command lines the walkthrough may use, and what plays them here.
SYSTEMCTL = {
    "daemon-reload": None,
    "enable --now decnet-listener.service": "listener",
    "enable --now decnet-updater.service": "updater",
    "enable decnet-agent.service decnet-forwarder.service": "enable-worker-units",
}


def walkthrough_blocks(text: str) -> list[str]:
    """The ``sh`` blocks right after a ``<!-- walkthrough -->`` line, in page order."""
    return re.findall(r"^<!-- walkthrough -->\n```sh\n(.*?)^```", text, flags=re.M | re.S)


class World:
    """The master and the worker of the walkthrough, in one directory, on loopback."""

    def __init__(self, base: Path, wheelhouse: Path):
        self.base = base
        self.wheelhouse = wheelhouse
        self.home = base / "master-home"
        self.worker_root = base / "worker-root"  # what `scp root@web-01:/X` writes is here/X
        self.syslog_port = free_port(MASTER)
        self.calls = base / "systemctl.calls"
        self.seen_calls = 0
        self.processes: dict[str, subprocess.Popen] = {}
        self.enabled: set[str] = set()
        (base / "tmp").mkdir(parents=True)
        (base / "logs").mkdir()

    @property
    def paths(self) -> config.MasterPaths:
        return config.MasterPaths.resolve(self.home)

    @property
    def bundle(self) -> Path:
        return self.worker_root / str(self.base / "tmp" / "bundle").lstrip("/")

    @property
    def install(self) -> Path:
        return self.worker_root / "opt" / "decnet"

    @property
    def decoy_log(self) -> Path:
        return self.worker_root / "var" / "log" / "decnet" / "decnet.log"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "PATH": f"{BIN}:{os.environ['PATH']}",
            config.ENV_HOME: str(self.home),
            config.ENV_SYSLOG_PORT: str(self.syslog_port),
        }

    def substituted(self, block: str, spec: Path) -> str:
        """The block with the page's hosts and paths mapped to this machine."""
        for doc_value, here in (
            ("/tmp/", f"{self.base}/tmp/"),  # first: what replaces the others may be in /tmp
            ("/path/to/decnet/docs/example-spec.json", str(spec)),
            ("/path/to/decnet", str(REPO_ROOT)),
            ("master.example.org", MASTER),
            ("192.0.2.21", WORKER),
        ):
            block = block.replace(doc_value, here)
        return block

    def preamble(self) -> str:
        return "\n".join(
            [
                f"systemctl() {{ printf '%s\\n' \"$*\" >> {shlex.quote(str(self.calls))}; }}",
                # scp [-r] SRC root@HOST:DEST -> a copy to the worker's DEST
                'scp() { [ "$1" = -r ] && shift; mkdir -p '
                f'"{self.worker_root}$(dirname "${{2#*:}}")"; '
                f'cp -r "$1" "{self.worker_root}${{2#*:}}"; }}',
            ]
        )

    def run_block(self, block: str, spec: Path) -> subprocess.CompletedProcess:
        """Run ``block``; meanwhile do what the updater's unit control would (start the
        forwarder once a release is current), as ``check --wait`` expects."""
        script = self.preamble() + "\n" + self.substituted(block, spec)
        with subprocess.Popen(
            ["bash", "-euo", "pipefail", "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env(),
            cwd=self.base,
        ) as process:
            out: list[str] = []

            def ended() -> bool:
                self.start_forwarder_once_a_release_is_current()
                try:
                    out.extend(process.communicate(timeout=0.2))
                except subprocess.TimeoutExpired:
                    return False
                return True

            wait_for(ended, 600, interval=0.0, what="the walkthrough block")
            return subprocess.CompletedProcess(process.args, process.returncode, *out)

    # -- systemd, played ------------------------------------------------------

    def apply_systemctl(self) -> None:
        lines = self.calls.read_text().splitlines() if self.calls.exists() else []
        for line in lines[self.seen_calls :]:
            assert line in SYSTEMCTL, f"the walkthrough runs `systemctl {line}`, not emulated here"
            action = SYSTEMCTL[line]
            if action == "listener":
                self.start_listener()
            elif action == "updater":
                self.start_updater()
            elif action == "enable-worker-units":
                self.enabled |= {"agent", "forwarder"}
        self.seen_calls = len(lines)
        self.start_forwarder_once_a_release_is_current()

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        log = self.base / "logs" / f"{name}.log"
        with open(self.base / "logs" / f"{name}.out", "wb") as out:  # before logging starts
            self.processes[name] = subprocess.Popen(
                [str(BIN / "twistd"), "--nodaemon", "--pidfile=", "--logfile", str(log), *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env or self.env(),
                cwd=self.base,
                start_new_session=True,
            )

    def alive(self, name: str) -> bool:
        process = self.processes[name]
        if process.poll() is not None:
            said = [p.read_text()[-3000:] for p in sorted((self.base / "logs").glob(name + ".*"))]
            raise AssertionError(f"{name} exited with {process.returncode}:\n{said}")
        return True

    def start_listener(self) -> None:
        port_file = self.base / "listener.port"
        self.spawn(
            "listener",
            ["decnet-listener", "--home", str(self.home), "--no-feed",
             "--listen", f"tcp:{self.syslog_port}:interface={MASTER}",
             "--port-file", str(port_file)],
        )  # fmt: skip
        wait_for(lambda: self.alive("listener") and port_file.exists(), 60, what="the listener")

    def start_updater(self) -> None:
        # pip inside the updater installs the release offline, from the test's wheelhouse
        # (on a real worker: the index in /etc/pip.conf, or --wheelhouse on the master).
        env = {**self.env(), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(self.wheelhouse)}
        self.spawn(
            "updater",
            ["decnet-updater", "--bundle", str(self.bundle),
             "--listen", f"tcp:{config.UPDATER_PORT}:interface={WORKER}",
             "--install-dir", str(self.install),
             "--agent-url", f"https://{WORKER}:{config.AGENT_PORT}",
             "--agent-control", "spawn",
             "--agent-state-dir", str(self.worker_root / "var/lib/decnet/agent"),
             "--agent-log-file", str(self.decoy_log),
             "--health-timeout", "60", "--no-compile"],
            env=env,
        )  # fmt: skip

        def ready() -> bool:
            doc = https_get_json(config.UPDATER_PORT, self.paths, host=WORKER)
            return self.alive("updater") and bool(doc) and doc.get("status") == "ok"

        wait_for(ready, 60, what="the updater")

    def start_forwarder_once_a_release_is_current(self) -> None:
        current = self.install / "current"
        if "forwarder" not in self.enabled or "forwarder" in self.processes:
            return
        if not current.exists():
            return  # ConditionPathExists=/opt/decnet/current/...: a clean no-op
        self.spawn(
            "forwarder",
            ["decnet-forwarder", "--bundle", str(self.bundle),
             "--log-file", str(self.decoy_log),
             "--state", str(self.worker_root / "var/lib/decnet/forwarder/offsets.sqlite")],
        )  # fmt: skip

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def loopback_spec(base: Path) -> Path:
    """docs/example-spec.json with every service bound to the worker's loopback address."""
    doc = json.loads((REPO_ROOT / "docs" / "example-spec.json").read_text())
    for decky in doc["deckies"]:
        for service in decky["services"]:
            service["bind"] = WORKER
    spec = base / "example-spec.json"
    spec.write_text(json.dumps(doc))
    return spec


def test_the_walkthrough_blocks_cover_a_master_and_a_worker_from_init_to_deploy_and_renew():
    commands = " ".join(walkthrough_blocks(OPERATIONS.read_text()))
    for step in ("decnet-admin init", "decnet-admin enroll", "decnet-admin update",
                 "decnet-admin check", "decnet-admin deploy", "decnet-admin renew"):  # fmt: skip
        assert step in commands, step


def test_operations_md_walkthrough_runs_on_loopback_and_the_swarm_works(tmp_path, wheelhouse):
    world = World(tmp_path / "w", wheelhouse)
    spec = loopback_spec(tmp_path)
    blocks = walkthrough_blocks(OPERATIONS.read_text())
    try:
        for number, block in enumerate(blocks, 1):
            result = world.run_block(block, spec)
            logs = {p.name: p.read_text()[-2000:] for p in (world.base / "logs").iterdir()}
            assert result.returncode == 0, (
                f"walkthrough block {number} failed:\n{block}\n--- stdout\n{result.stdout}\n"
                f"--- stderr\n{result.stderr}\n--- logs\n{logs}"
            )
            world.apply_systemctl()
        assert {"listener", "updater", "forwarder"} <= set(world.processes)
        # The swarm works: an attacker's request to a decky reaches the master's mirror.
        http = next(
            s for d in json.loads(spec.read_text())["deckies"] for s in d["services"]
            if s["type"] == "http"
        )  # fmt: skip
        with socket.create_connection((WORKER, http["port"]), timeout=10) as conn:
            conn.sendall(b"GET /walkthrough-probe HTTP/1.0\r\nHost: x\r\n\r\n")
            conn.recv(100)
        mirror = world.home / "ingest" / WORKER_NAME

        def arrived() -> bool:
            world.alive("forwarder")
            return any(b"walkthrough-probe" in f.read_bytes() for f in mirror.glob("*.log"))

        wait_for(arrived, 60, what="the decoy event at the master's mirror")
    finally:
        world.stop()
