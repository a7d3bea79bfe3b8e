"""A real ``twistd decnet-agent`` with few file descriptors: decoy floods never take /health."""

from __future__ import annotations

import resource
import socket
import subprocess

import attrs
import pytest_twisted
from twisted.internet import reactor

from decnet.agent.decoys.budget import default_connection_budget
from decnet.master import enrollment
from decnet.master.agent_client import AgentClient
from decnet.tls import TLSIdentity
from tests.support import BIN, wait_for

NOFILE = 128


def _low_nofile() -> None:  # runs in the child between fork and exec
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


def start_agent(tmp_path, bundle_dir) -> tuple[subprocess.Popen, int]:
    port_file = tmp_path / "agent.port"
    proc = subprocess.Popen(
        [
            str(BIN / "twistd"),
            "--nodaemon",
            "--pidfile=",
            f"--logfile={tmp_path / 'twistd.log'}",
            "decnet-agent",
            "--bundle",
            str(bundle_dir),
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--state-dir",
            str(tmp_path / "state"),
            "--log-file",
            str(tmp_path / "decnet.log"),
            "--port-file",
            str(port_file),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # Only setrlimit() runs between fork and exec: safe with threads around.
        preexec_fn=_low_nofile,
    )

    def port():
        if proc.poll() is not None:
            raise AssertionError(f"the agent exited {proc.returncode}")
        try:
            return int(port_file.read_text())
        except (FileNotFoundError, ValueError):
            return None

    return proc, wait_for(port, what="the agent's port file")


def served_or_refused(port: int) -> socket.socket | None:
    """The connection if the decoy served it (banner), ``None`` if it was refused at once."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        data = s.recv(16)
    except TimeoutError:
        s.close()
        raise AssertionError("a decoy connection was neither served nor refused") from None
    except ConnectionResetError:
        data = b""
    if data == b"hi\n":
        return s
    assert data == b"", data
    s.close()
    return None


@pytest_twisted.ensureDeferred
async def test_exhausting_the_decoys_never_makes_health_fail(master_home, tmp_path):
    master = enrollment.load_master(master_home)
    enrolled = enrollment.enroll(master, "fds-w1", "127.0.0.1", tmp_path / "bundle")
    proc, api_port = start_agent(tmp_path, enrolled.bundle_dir)
    held: list[socket.socket] = []
    try:
        client = AgentClient(
            reactor,
            TLSIdentity.master(master_home),
            attrs.evolve(enrolled.host, agent_port=api_port),
        )
        service = {"type": "tcp-banner", "bind": "127.0.0.1", "port": 0, "banner": "hi\n"}
        service["max_connections"] = 10000  # only the agent-wide budget applies
        deployed = await client.deploy({"deckies": [{"name": "box", "services": [service]}]})
        assert deployed["ok"], deployed
        decoy_port = int(deployed["deckies"]["box"]["tcp-banner"]["address"].rsplit(":", 1)[1])

        budget = default_connection_budget(NOFILE)  # 96 sockets, the listener is one
        refused = 0
        for _ in range(budget + 40):
            s = served_or_refused(decoy_port)
            if s is None:
                refused += 1
            else:
                held.append(s)
        # The attacker keeps connecting while the master probes: the agent
        # still answers (the repro: the master saw it DOWN).
        for _ in range(3):
            for _ in range(3):
                assert served_or_refused(decoy_port) is None
                refused += 1
            health = await client.health()
            assert health["status"] == "ok"
        assert len(held) == budget - 1
        assert refused == 41 + 9
        status = await client.status()
        assert status["deckies"]["box"]["services"]["tcp-banner"]["refused"] == refused
        await client.close()
        log = (tmp_path / "twistd.log").read_text()
        assert log.count("Refusing decoy connections") == 1  # once for the burst
        assert "EMFILE" not in log and "Too many open files" not in log
    finally:
        for s in held:
            s.close()
        proc.kill()
        proc.wait(timeout=10)
