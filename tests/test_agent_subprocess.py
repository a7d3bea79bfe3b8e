"""End to end: the real ``twistd decnet-agent`` plugin: deploy, SIGKILL, restart, deckies back."""

import itertools
import json
import signal
import socket
import subprocess

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor

from decnet import config
from decnet.master import enrollment
from decnet.master.agent_client import AgentClient
from decnet.tls import TLSIdentity
from tests.support import BIN, free_port, wait_for

_NAMES = itertools.count(1)  # host names must be unique in the session's registry


class AgentProcess:
    def __init__(self, tmp_path, bundle_dir):
        self.tmp = tmp_path
        self.bundle_dir = bundle_dir
        self.port_file = tmp_path / "agent.port"
        self.log_file = tmp_path / "decnet.log"
        self.state_dir = tmp_path / "state"
        self.proc = None
        self.runs = 0

    def start(self):
        self.port_file.unlink(missing_ok=True)
        self.runs += 1
        self.twistd_log = self.tmp / f"twistd-{self.runs}.log"
        self.proc = subprocess.Popen(
            [
                str(BIN / "twistd"),
                "--nodaemon",
                "--pidfile=",
                f"--logfile={self.twistd_log}",
                "decnet-agent",
                "--bundle",
                str(self.bundle_dir),
                "--listen",
                "tcp:0:interface=127.0.0.1",
                "--state-dir",
                str(self.state_dir),
                "--log-file",
                str(self.log_file),
                "--port-file",
                str(self.port_file),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def port():
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited {self.proc.returncode}: {self.log()}")
            try:
                return int(self.port_file.read_text())
            except (FileNotFoundError, ValueError):
                return None

        return wait_for(port, what="the agent's port file")

    def log(self) -> str:
        try:
            return self.twistd_log.read_text()[-4000:]
        except FileNotFoundError:
            return ""

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture
def enrolled(master_home, tmp_path):
    master = enrollment.load_master(master_home)
    name = f"proc-{next(_NAMES)}"
    return enrollment.enroll(master, name, "127.0.0.1", tmp_path / "bundle", updater=True)


@pytest.fixture
def agent_process(tmp_path, enrolled):
    process = AgentProcess(tmp_path, enrolled.bundle_dir)
    yield process
    process.kill()


@pytest_twisted.ensureDeferred
async def test_deckies_come_back_after_the_agent_is_killed_and_restarted(
    agent_process, enrolled, master_home
):
    identity = TLSIdentity.master(master_home)
    api_port = agent_process.start()
    telnet_port, banner_port = free_port(), free_port()
    spec = {
        "deckies": [
            {
                "name": "box-1",
                "services": [
                    {"type": "telnet", "bind": "127.0.0.1", "port": telnet_port},
                    {
                        "type": "tcp-banner",
                        "bind": "127.0.0.1",
                        "port": banner_port,
                        "banner": "hi",
                    },
                ],
            }
        ]
    }
    client = AgentClient(reactor, identity, attrs.evolve(enrolled.host, agent_port=api_port))
    result = await client.deploy(spec)
    assert result["ok"], result
    assert accepts(telnet_port) and accepts(banner_port)
    saved = agent_process.state_dir / config.AGENT_STATE_FILE
    assert saved.stat().st_mode & 0o777 == 0o600
    assert json.loads(saved.read_text())["spec_hash"] == result["spec_hash"]

    agent_process.kill()
    assert agent_process.proc.returncode == -signal.SIGKILL
    assert not accepts(telnet_port)

    api_port = agent_process.start()
    wait_for(lambda: accepts(telnet_port) and accepts(banner_port), what="restored deckies")
    client = AgentClient(reactor, identity, attrs.evolve(enrolled.host, agent_port=api_port))
    status = await client.status()
    assert status["spec_hash"] == result["spec_hash"]
    services = status["deckies"]["box-1"]["services"]
    assert {name: s["state"] for name, s in services.items()} == {
        "telnet": "listening",
        "tcp-banner": "listening",
    }
    # The connections made to the restored deckies became event lines, and the
    # log holds only whole lines although the first run was killed.
    wait_for(
        lambda: agent_process.log_file.read_bytes().count(b" box-1 telnet - disconnect ") >= 1,
        what="telnet events",
    )
    lines = agent_process.log_file.read_bytes().split(b"\n")
    assert lines[-1] == b""
    assert all(line.startswith(b"<13") and line.endswith(b"]") for line in lines[:-1])


def run_agent(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "twistd"), "--nodaemon", "--pidfile=", "decnet-agent", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_agent_refuses_to_start_without_a_bundle(tmp_path):
    done = run_agent()
    assert done.returncode != 0
    assert "--bundle is required" in done.stdout + done.stderr


def test_the_agent_names_the_missing_bundle_file(tmp_path, enrolled):
    (enrolled.bundle_dir / "worker.key").unlink()
    done = run_agent("--bundle", str(enrolled.bundle_dir))
    assert done.returncode != 0
    assert (
        f"private key not found: {enrolled.bundle_dir / 'worker.key'}" in done.stdout + done.stderr
    )


def test_a_failed_api_bind_stops_the_agent_with_an_error(tmp_path, enrolled):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_agent(
            "--bundle",
            str(enrolled.bundle_dir),
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--state-dir",
            str(tmp_path / "state"),
            "--log-file",
            str(tmp_path / "decnet.log"),
        )
    assert done.returncode == 1
    assert "Cannot listen on" in done.stdout + done.stderr
