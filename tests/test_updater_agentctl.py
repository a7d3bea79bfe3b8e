"""Agent control: systemctl through spawnProcess, and a supervised child process."""

import sys

import pytest
import pytest_twisted
from twisted.internet import reactor, task

from decnet.errors import AgentControlFailed
from decnet.updater.agentctl import SpawnedAgent, SystemdAgent
from tests.support import eventually


def fake_tool(tmp_path, name, exit_code=0, output="ok"):
    script = tmp_path / name
    script.write_text(
        f'#!/bin/sh\necho "$@" >> {tmp_path}/{name}.calls\necho "{output}"\nexit {exit_code}\n'
    )
    script.chmod(0o755)
    return str(script)


def calls(tmp_path, name):
    path = tmp_path / f"{name}.calls"
    return path.read_text().splitlines() if path.exists() else []


@pytest_twisted.ensureDeferred
async def test_systemd_control_restarts_the_unit_and_never_stops_it_on_shutdown(tmp_path):
    agent = SystemdAgent(
        reactor,
        "decnet-agent.service",
        systemctl=fake_tool(tmp_path, "systemctl"),
        journalctl=fake_tool(tmp_path, "journalctl", output="agent log line"),
    )
    await agent.restart(tmp_path)
    await agent.shutdown()
    assert calls(tmp_path, "systemctl") == ["restart decnet-agent.service"]
    assert "agent log line" in await agent.recent_output()
    assert calls(tmp_path, "journalctl")[0].startswith("--unit decnet-agent.service")


@pytest_twisted.ensureDeferred
async def test_a_failing_systemctl_is_a_typed_error_with_its_output(tmp_path):
    agent = SystemdAgent(reactor, systemctl=fake_tool(tmp_path, "systemctl", 5, "unit failed"))
    with pytest.raises(AgentControlFailed) as info:
        await agent.restart(tmp_path)
    assert "exit code 5" in str(info.value)
    assert "unit failed" in info.value.details["output"]["agent"]


CHILD = """
import signal, sys, time
mode = sys.argv[1]
if mode == "crash":
    print("child up", mode, flush=True)
    sys.exit(3)
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
print("child up", mode, flush=True)
while True:
    time.sleep(0.05)
"""


def sleep(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


@pytest_twisted.ensureDeferred
async def test_a_spawned_agent_is_started_restarted_and_stopped_by_its_own_pid(tmp_path):
    (tmp_path / "good").mkdir()
    agent = SpawnedAgent(
        reactor, lambda d: [sys.executable, "-c", CHILD, d.name], grace=1, min_backoff=0.05
    )
    await agent.restart(tmp_path / "good")
    first = agent.pid
    assert agent.running and first
    await eventually(lambda: "child up good" in agent.output.text())
    await agent.restart(tmp_path / "good")
    assert agent.pid != first and agent.running
    await agent.shutdown()
    assert not agent.running and agent.exited_since_start() is None


@pytest_twisted.ensureDeferred
async def test_a_crashing_agent_is_reported_and_respawned_with_backoff(tmp_path):
    (tmp_path / "crash").mkdir()
    agent = SpawnedAgent(
        reactor,
        lambda d: [sys.executable, "-c", CHILD, d.name],
        min_backoff=0.05,
        max_backoff=0.2,
    )
    await agent.restart(tmp_path / "crash")
    await eventually(lambda: agent.exited_since_start() is not None)
    assert agent.exited_since_start() == "exited with code 3"
    await eventually(lambda: agent.restarts >= 2)
    assert "child up crash" in await agent.recent_output()
    await agent.stop()
    restarts = agent.restarts
    await sleep(0.5)
    assert agent.restarts == restarts  # stopping cancels the respawn
