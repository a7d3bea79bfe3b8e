"""The sandbox's process and network glue: poke's attacker scripts against the real decoys,
children in their own process groups, ``down`` by recorded PID, the CLI's refusals."""

import json
import os
import signal
import subprocess
import sys

import pytest
import pytest_twisted
from twisted.internet import reactor

from decnet.agent.decoys import ssh as ssh_decoy
from decnet.cli.main import main
from decnet.cli.sandbox import down_command, status_command
from decnet.sandbox import layout, poke, state
from decnet.sandbox.children import Children
from tests.support import BIN, wait_for
from tests.test_decoys import Harness

SLEEPER = "import time; time.sleep(120)"
STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"


@pytest_twisted.async_yield_fixture
async def decoys(tmp_path):
    harness = Harness(tmp_path)
    yield harness
    await harness.close()


@pytest_twisted.ensureDeferred
async def test_poke_has_a_real_conversation_with_every_service_type(decoys, monkeypatch):
    monkeypatch.setattr(ssh_decoy.DecoyUserAuth, "passwordDelay", 0)
    spec = layout.default_spec(1, 1)["deckies"]
    services = [{**s, "bind": "127.0.0.1", "port": 0} for d in spec for s in d["services"]]
    # One decky holding every type (distinct names), on ephemeral ports.
    await decoys.deploy(*services)
    targets = [
        poke.Target(
            "w1", "web-01", s["type"], s["type"], "127.0.0.1", decoys.port(s["type"]), "banner" in s
        )
        for s in services
    ]
    outcomes = [await poke.converse(reactor, t, choice=lambda seq: seq[0]) for t in targets]
    for o in outcomes:
        assert o.ok, (o.target.type, o.did)
        assert o.src_port
    for t in targets:
        await decoys.settle(t.type)
    lines = b"".join(decoys.lines()).decode()
    assert 'user="root" password="123456" result="refused"' in lines  # ssh, telnet, ftp, http
    assert 'mechanism="PLAIN" user="root@corp.example" password="123456"' in lines
    assert 'command="CONFIG" argc="3" args="SET dir /var/spool/cron"' in lines
    assert 'method="form" user="root" password="123456"' in lines
    assert 'data="\\\\x16\\\\x03\\\\x01' in lines
    for o in outcomes:  # every conversation ended with a disconnect event carrying its port
        assert f'src_port="{o.src_port}"' in lines
        assert f'src_port="{o.src_port}" dst_ip="127.0.0.1" dst_port="{o.target.port}" reason=' in (
            lines
        ), o.target.type


@pytest_twisted.ensureDeferred
async def test_a_refused_connection_is_an_outcome_not_an_exception():
    from tests.support import free_port

    target = poke.Target("w1", "web-01", "telnet", "telnet", "127.0.0.1", free_port())
    outcome = await poke.converse(reactor, target)
    assert not outcome.ok and outcome.did.startswith("failed: ")


# -- children ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_children_lead_their_own_process_group_and_stop_on_sigterm(tmp_path):
    children = Children(reactor, grace=10)
    child = children.spawn("sleeper", [sys.executable, "-c", SLEEPER], tmp_path / "s.log")
    pid = child.record.pid
    assert child.record.start == state.start_time(pid)
    wait_for(lambda: os.getpgid(pid) == pid, 10, what="setpgrp")  # Ctrl-C stays with `up`
    assert children.records() == {"sleeper": child.record}
    await children.stop_all([["sleeper"]])
    assert child.how == "was killed by signal 15"
    assert children.records() == {}


@pytest_twisted.ensureDeferred
async def test_a_child_that_ignores_sigterm_is_killed_after_the_grace(tmp_path):
    exits = []
    children = Children(reactor, grace=0.5, on_exit=exits.append)
    child = children.spawn("stubborn", [sys.executable, "-c", STUBBORN], tmp_path / "s.log")
    wait_for(lambda: b"SigIgn" in _status(child.record.pid), 10, what="the handler")
    await children.stop_all([])
    assert child.how == "was killed by signal 9"
    assert exits == []  # stopping is not an unexpected exit


@pytest_twisted.ensureDeferred
async def test_an_unexpected_exit_is_reported(tmp_path):
    exits = []
    children = Children(reactor, on_exit=exits.append)
    child = children.spawn("short", [sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "l")
    await child.when_ended()
    assert exits == [child] and child.how == "exited with code 3"


def _status(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            text = fh.read()
    except OSError:
        return b""
    ignored = next(line for line in text.splitlines() if line.startswith(b"SigIgn"))
    return b"SigIgn" if int(ignored.split()[1], 16) & (1 << (signal.SIGTERM - 1)) else b""


# -- down and status from another terminal ---------------------------------------------


def _orphan(code: str = SLEEPER) -> subprocess.Popen:
    """A process in its own process group, as `up`'s children are."""
    return subprocess.Popen([sys.executable, "-c", code], start_new_session=True)


@pytest_twisted.ensureDeferred
async def test_down_stops_survivors_by_recorded_pid_and_spares_a_reused_pid(tmp_path, capsys):
    sb = layout.SandboxLayout.at(tmp_path)
    survivor, stranger = _orphan(), _orphan()
    try:
        wait_for(lambda: state.start_time(stranger.pid), 10, what="the processes")
        doc = state.empty_state(1)
        doc["phase"] = "running"
        doc["up"] = state.ProcessRecord(999_999_999, 1).as_dict()  # `up` was kill -9'd
        doc["processes"] = {
            "w1-forwarder": state.ProcessRecord(
                survivor.pid, state.start_time(survivor.pid)
            ).as_dict(),
            # The kernel gave this PID to someone else since: never touched.
            "w1-updater": state.ProcessRecord(
                stranger.pid, state.start_time(stranger.pid) - 1
            ).as_dict(),
        }
        state.save(sb.state_file, doc)
        assert await status_command(reactor, sb, as_json=False) == 1
        said = capsys.readouterr().out.splitlines()
        assert any("`sandbox up` is gone" in line for line in said), said
        assert await down_command(reactor, sb) == 0
        assert survivor.wait(10) == -signal.SIGTERM
        assert stranger.poll() is None
        said = capsys.readouterr().out.splitlines()
        assert "Stopping 1 leftover processes: w1-forwarder" in said
        assert said[-1] == "Nothing of the sandbox runs any more."
        after = state.load(sb.state_file)
        assert after["processes"] == {} and after["up"] is None and after["phase"] == "stopped"
        assert await down_command(reactor, sb) == 0  # again: nothing to do
    finally:
        for p in (survivor, stranger):
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest_twisted.ensureDeferred
async def test_status_and_down_of_a_directory_without_a_sandbox(tmp_path, capsys):
    sb = layout.SandboxLayout.at(tmp_path / "none")
    assert await status_command(reactor, sb, as_json=False) == 1
    assert "No sandbox in" in capsys.readouterr().out.splitlines()[0]
    assert await down_command(reactor, sb) == 0
    assert "nothing to stop" in capsys.readouterr().out


# -- the command line ---------------------------------------------------------------------


def test_every_sandbox_action_explains_itself(capsys):
    for action in ("up", "status", "down", "poke"):
        with pytest.raises(SystemExit) as exc:
            main(["sandbox", action, "--help"])
        assert exc.value.code == 0
        text = capsys.readouterr().out
        assert "--dir" in text
    with pytest.raises(SystemExit):
        main(["sandbox", "up", "--workers", "0"])
    assert "must be 1-" in capsys.readouterr().err


def test_up_refuses_while_processes_of_an_earlier_up_survive(tmp_path, capsys):
    survivor = _orphan()
    try:
        wait_for(lambda: state.start_time(survivor.pid), 10, what="the process")
        doc = state.empty_state(1)
        doc["processes"] = {
            "listener": state.ProcessRecord(survivor.pid, state.start_time(survivor.pid)).as_dict()
        }
        state.save(tmp_path / "sandbox.json", doc)
        assert main(["sandbox", "up", "--dir", str(tmp_path)]) == 1
        assert "sandbox down" in capsys.readouterr().err
        assert main(["sandbox", "up", "--dir", str(tmp_path), "--net", "5"]) == 1
        assert "was set up with --net 1" in capsys.readouterr().err
    finally:
        survivor.kill()
        survivor.wait()


def test_poke_without_a_sandbox_says_so_also_in_json(tmp_path):
    # A subprocess: the command runs its own reactor.
    result = subprocess.run(
        [str(BIN / "decnet-admin"), "sandbox", "poke", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "no sandbox in" in result.stderr
    as_json = subprocess.run(
        [str(BIN / "decnet-admin"), "sandbox", "poke", "--json", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert as_json.returncode == 1  # stdout stays one JSON document, as for every command
    assert json.loads(as_json.stdout)["problems"][0].startswith("no sandbox in")
