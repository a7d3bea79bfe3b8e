"""Agent control: systemctl through spawnProcess, and a supervised child process."""

import os
import signal
import sys

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

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


# -- on a fake clock with fake process transports ---------------------------------------


def test_a_spawned_agent_dies_with_the_updater_and_inherits_neither_systemd_nor_its_release(
    tmp_path, monkeypatch
):
    """Under systemd the updater holds NOTIFY_SOCKET and the watchdog: a spawned agent that
    inherited them would send READY/WATCHDOG as if it were the updater's unit."""
    from tests.test_process import FakeProcessReactor

    for name, value in {
        "NOTIFY_SOCKET": "/run/systemd/notify",
        "WATCHDOG_USEC": "30000000",
        "WATCHDOG_PID": str(os.getpid()),
        "DECNET_RELEASE_ID": "r-updater",
        "PYTHONPATH": "/updater/src",
    }.items():
        monkeypatch.setenv(name, value)
    fake = FakeProcessReactor()
    agent = SpawnedAgent(fake, lambda d: [str(d / "venv/bin/python"), "-c", "agent"])
    d = defer.ensureDeferred(agent.restart(tmp_path))
    assert d.called
    (child,) = fake.spawned
    assert child.path == str(tmp_path)
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "DECNET_RELEASE_ID"):
        assert name not in child.env
    assert "PYTHONPATH" not in child.env and child.env["PATH"] == os.environ["PATH"]
    # PR_SET_PDEATHSIG: SIGTERM when the updater dies, checked against our PID.
    assert "prctl" in child.argv[4]
    assert child.argv[5:8] == [str(os.getpid()), str(int(signal.SIGTERM)), "0"]
    assert child.argv[8:] == [str(tmp_path / "venv/bin/python"), "-c", "agent"]


def test_a_crash_looping_agent_backs_off_and_a_long_run_resets_the_backoff(tmp_path):
    from tests.test_process import FakeProcessReactor

    fake = FakeProcessReactor()
    agent = SpawnedAgent(fake, lambda d: ["/python"], min_backoff=0.5, max_backoff=2)
    defer.ensureDeferred(agent.restart(tmp_path))
    waits = []
    for _ in range(4):
        fake.spawned[-1].end(code=1)
        waits.append(fake.getDelayedCalls()[0].getTime() - fake.seconds())
        fake.advance(waits[-1])
    assert waits == [0.5, 1, 2, 2] and agent.restarts == 4
    assert agent.exited_since_start() == "exited with code 1"
    fake.advance(11)  # more than 10 * min_backoff + 5 s of good health
    fake.spawned[-1].end(signal=9)
    assert fake.getDelayedCalls()[0].getTime() - fake.seconds() == 0.5
    assert agent.exited_since_start() == "was killed by signal 9"
    assert agent.describe() == {"control": "spawn", "running": False, "pid": None, "restarts": 4}
    stopped = defer.ensureDeferred(agent.stop())
    assert stopped.called and fake.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_systemd_control_starts_the_forwarder_only_once_a_release_is_ready(tmp_path):
    """The forwarder's ExecStart runs from `current`: the updater starts its unit after a
    release is current and healthy (not at restart), and a failure to do so is only logged."""
    from twisted.logger import globalLogPublisher

    agent = SystemdAgent(
        reactor,
        systemctl=fake_tool(tmp_path, "systemctl"),
        companions=("decnet-forwarder.service",),
    )
    await agent.restart(tmp_path)
    assert calls(tmp_path, "systemctl") == ["restart decnet-agent.service"]
    await agent.release_ready()
    assert calls(tmp_path, "systemctl")[1:] == ["start decnet-forwarder.service"]

    warnings = []
    globalLogPublisher.addObserver(warnings.append)
    try:
        failing = tmp_path / "failing"
        failing.mkdir()
        broken = SystemdAgent(
            reactor,
            systemctl=fake_tool(failing, "systemctl", 1, "Access denied"),
            companions=("decnet-forwarder.service",),
        )
        await broken.release_ready()  # does not raise: the update itself succeeded
    finally:
        globalLogPublisher.removeObserver(warnings.append)
    (warned,) = [e for e in warnings if "Cannot start" in (e.get("log_format") or "")]
    assert warned["unit"] == "decnet-forwarder.service" and "Access denied" in warned["output"]
