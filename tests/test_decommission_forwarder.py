"""``decommission`` stops the worker's forwarder through its updater, once it has shipped
what it read: the pure drain decision, the updater's service control, and the real
console script against real daemons, an unreachable worker and a lying one."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import Clock

from decnet import revocation
from decnet.errors import AgentControlFailed
from decnet.listener.service import ListenerService
from decnet.listener.tap import load_listener_identity
from decnet.listener.workers import NEVER, NO_STATE
from decnet.master import enrollment
from decnet.master.registry import Registry
from decnet.master.retire import Drain, drain_verdict, drained_text, read_drain, wait_drained
from decnet.updater.agentctl import SpawnedAgent, SystemdAgent
from decnet.updater.service import LocalAgent
from tests.enroll_support import fresh_master
from tests.hostile_worker import EVIL, FakeWorker, Reply, no_control_characters
from tests.logpipe_support import start_forwarder, syslog_line
from tests.support import (
    admin_output,
    eventually,
    free_port,
    record_ports,
    started_agent,
    started_updater,
)
from tests.test_updater_agentctl import calls, fake_tool

FORWARDER = "decnet-forwarder.service"


# -- the drain decision (pure) ------------------------------------------------------------


def _state(written_at=100.0, connected=True, streams=None, lag=0):
    if streams is None:
        streams = {"decnet": {"mode": "ack", "reported_at": 99.0, "lag": lag}}
    worker = {"connected": connected, "connections": int(connected), "lag": lag, "streams": streams}
    return {"format": 1, "written_at": written_at, "workers": {"w": worker}}


def _stream(mode="ack", reported_at=99.0, lag=0):
    return {"mode": mode, "reported_at": reported_at, "lag": lag}


@pytest.mark.parametrize(
    ("doc", "since", "expected"),
    [
        (None, 50.0, Drain(True, None, state=NO_STATE)),  # no listener state: nothing to wait for
        (_state(connected=False, lag=7), 50.0, Drain(True, 7, state=NEVER)),  # cannot drain
        (_state(lag=0), 50.0, Drain(True, 0, connected=True)),  # a STATUS after the teardown
        (_state(lag=0), 99.5, Drain(False, 0, connected=True)),  # lag 0, but from before it
        (_state(lag=4096), 50.0, Drain(False, 4096, connected=True)),  # still shipping
        (_state(lag=False), 50.0, Drain(False, None, connected=True)),  # not a number: no
        (  # acknowledged, but no STATUS yet: it comes within a second
            _state(streams={"decnet": _stream(reported_at=None, lag=None)}, lag=None),
            50.0,
            Drain(False, None, connected=True),
        ),
        (  # plain mode only: no STATUS ever, nothing to wait for
            _state(streams={"plain": _stream("plain", None, None)}, lag=None),
            50.0,
            Drain(True, None, connected=True),
        ),
        (_state(streams={}), 50.0, Drain(True, None, connected=True)),
        (  # one stream has not reported since
            _state(streams={"a": _stream(), "b": _stream(reported_at=10.0)}),
            50.0,
            Drain(False, 0, connected=True),
        ),
    ],
)
def test_the_forwarder_is_drained_only_with_a_status_after_the_teardown_and_no_lag(
    doc, since, expected
):
    assert drain_verdict(doc, "w", since, now=100.0) == expected


def test_a_state_file_of_a_stopped_listener_vouches_for_no_connection():
    assert drain_verdict(_state(written_at=0.0, lag=5), "w", 0.0, now=1000.0).settled


def test_what_a_stopped_forwarder_left_is_said_in_bytes_or_as_unknown():
    assert drained_text(Drain(True, 0)) == "it had shipped every line it read"
    assert "4096 bytes it had not shipped stay in the worker's log" in drained_text(
        Drain(False, 4096)
    )
    assert "not connected" in drained_text(Drain(True, None, state=NEVER))
    assert "no log listener state" in drained_text(Drain(True, None, state=NO_STATE))


def test_the_wait_reads_until_drained_on_the_injected_clock():
    clock = Clock()
    reads = iter([Drain(False, 10), Drain(False, 3), Drain(True, 0)])
    d = defer.ensureDeferred(
        wait_drained(clock, lambda: defer.succeed(next(reads)), timeout=10, interval=0.5)
    )
    clock.advance(0.5)
    assert not d.called
    clock.advance(0.5)
    assert d.called
    assert d.result == Drain(True, 0)


def test_the_wait_gives_up_at_its_deadline_with_the_last_lag():
    clock = Clock()
    d = defer.ensureDeferred(
        wait_drained(clock, lambda: defer.succeed(Drain(False, 9)), timeout=2, interval=0.5)
    )
    clock.pump([0.5] * 3)
    assert not d.called
    clock.advance(0.5)
    assert d.result == Drain(False, 9)


# -- the updater's service control ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_systemd_control_stops_the_forwarder_unit_and_reports_it(tmp_path):
    control = SystemdAgent(
        reactor, systemctl=fake_tool(tmp_path, "systemctl"), companions=(FORWARDER,)
    )
    assert await control.stop_companions() == [FORWARDER]
    assert calls(tmp_path, "systemctl") == [f"stop {FORWARDER}"]


@pytest_twisted.ensureDeferred
async def test_a_refused_stop_is_a_typed_error_with_systemctls_output(tmp_path):
    control = SystemdAgent(
        reactor,
        systemctl=fake_tool(tmp_path, "systemctl", 4, "Access denied"),
        companions=(FORWARDER,),
    )
    with pytest.raises(
        AgentControlFailed, match=r"systemctl stop decnet-forwarder\.service failed"
    ):
        await control.stop_companions()


@pytest_twisted.ensureDeferred
async def test_a_spawned_agents_updater_says_it_does_not_run_the_forwarder():
    assert await SpawnedAgent(reactor, lambda release: ["true"]).stop_companions() is None


# -- the real console script ----------------------------------------------------------------


@pytest.fixture
def master(master_home, tmp_path):
    return fresh_master(master_home, tmp_path)


def stop_script(tmp_path: Path, pid_file: Path) -> str:
    """A ``systemctl`` for the test: ``stop decnet-forwarder.service`` SIGTERMs the real
    forwarder process and returns once it has exited, as systemctl does."""
    script = tmp_path / "systemctl"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {tmp_path}/systemctl.calls\n'
        f'if [ "$1 $2" = "stop {FORWARDER}" ]; then\n'
        f"  pid=$(cat {pid_file}); kill -TERM $pid\n"
        "  while [ -d /proc/$pid ] && ! grep -q '^State:.*Z' /proc/$pid/status; do\n"
        "    sleep 0.05\n"
        "  done\n"
        "fi\n"
    )
    script.chmod(0o755)
    return str(script)


def updater_agent(agent_port: int, **control) -> LocalAgent:
    return LocalAgent(host="127.0.0.1", port=agent_port, **control)


def enroll_unreachable(master, name: str, tmp_path: Path) -> enrollment.Enrollment:
    """An enrolled host whose agent and updater ports nothing listens on (yet)."""
    return enrollment.enroll(
        master,
        name,
        "127.0.0.1",
        tmp_path / "bundle",
        updater=True,
        agent_port=free_port(),
        updater_port=free_port(),
    )


def revoked(master, name: str) -> bool:
    host = Registry(master.paths.registry).get(name)
    entries = revocation.RevocationSet(master.paths.revocations)
    return host.decommissioned and host.worker_fingerprint in entries


@pytest_twisted.ensureDeferred
async def test_it_stops_a_real_forwarder_through_the_updater_after_it_shipped_every_line(
    master, tmp_path
):
    """Agent, updater and listener are the real services; the forwarder is a real twistd
    process, which the updater stops through (a stand-in for) systemctl."""
    enrolled = enrollment.enroll(master, "dec-fw", "127.0.0.1", tmp_path / "bundle", updater=True)
    log_file = tmp_path / "decnet.log"
    agent = await started_agent(enrolled.bundle_dir, tmp_path, log_file=log_file)
    pid_file = tmp_path / "forwarder.pid"
    updater = await started_updater(
        enrolled.bundle_dir,
        tmp_path,
        updater_agent(agent.port, control="systemd", systemctl=stop_script(tmp_path, pid_file)),
    )
    record_ports(
        master.paths,
        "dec-fw",
        agent_port=agent.port,
        updater_port=updater.port.getHost().port,
    )
    listener = ListenerService(
        reactor,
        identity=load_listener_identity(master.paths),  # the identity bundles pin
        revocations=revocation.RevocationSet(master.paths.revocations),
        ingest_dir=tmp_path / "ingest",
        listen="tcp:0:interface=127.0.0.1",
    )
    listener.startService()
    port = (await listener.port_service.ready).getHost().port
    lines = b"".join(syslog_line(i) + b"\n" for i in range(200))
    with open(log_file, "ab") as fh:
        fh.write(lines)
    forwarder = start_forwarder(
        enrolled.bundle_dir, log_file, tmp_path / "offsets.sqlite", port, tmp_path / "fwd.log"
    )
    pid_file.write_text(str(forwarder.pid))
    mirror = tmp_path / "ingest" / "dec-fw" / "decnet.log"
    try:
        await eventually(lambda: mirror.exists() and mirror.read_bytes() == lines, what="shipping")
        await eventually(  # the listener's state file says so (written within a second)
            lambda: read_drain(tmp_path / "ingest", "dec-fw", 0, time.time()).connected,
            what="the listener's state file",
        )
        with open(log_file, "ab") as fh:  # the last lines, just before the decommission
            fh.write(syslog_line(999) + b"\n")
        out, err, code = await admin_output(
            master.paths.home,
            "decommission",
            "dec-fw",
            "--yes",
            "--json",
            "--ingest-dir",
            str(tmp_path / "ingest"),
        )
        assert code == 0, err
        doc = json.loads(out)
        assert doc["forwarder"] == {
            "state": "done",
            "detail": f"stopped {FORWARDER}; it had shipped every line it read",
            "unshipped_bytes": 0,
        }
        assert calls(tmp_path, "systemctl") == [f"stop {FORWARDER}"]
        assert forwarder.wait(10) is not None  # stopped by the updater, not by this test
        assert mirror.read_bytes() == log_file.read_bytes()
        assert revoked(master, "dec-fw")
    finally:
        if forwarder.poll() is None:
            forwarder.kill()
            forwarder.wait(10)
        for service in (listener, updater, agent):
            await service.stopService()


@pytest_twisted.ensureDeferred
async def test_an_updater_that_does_not_run_the_forwarder_says_so_and_the_host_is_revoked(
    master, tmp_path
):
    enrolled = enrollment.enroll(master, "dec-sp", "127.0.0.1", tmp_path / "bundle", updater=True)
    updater = await started_updater(
        enrolled.bundle_dir, tmp_path, updater_agent(free_port(), control="spawn")
    )
    record_ports(master.paths, "dec-sp", updater_port=updater.port.getHost().port)
    try:
        out, err, code = await admin_output(master.paths.home, "decommission", "dec-sp", "--yes")
    finally:
        await updater.stopService()
    assert code == 0, err
    assert "forwarder        skipped: its updater does not run the forwarder" in out
    steps = [line for line in out.splitlines() if line.startswith("dec-sp: ")]
    assert steps == [  # progress, step by step, before the outcome
        "dec-sp: tearing down the deckies through the agent",
        "dec-sp: waiting for the forwarder to ship what it read",
        "dec-sp: stopping the forwarder through the updater",
    ]
    assert "teardown         failed: cannot reach" in out
    assert revoked(master, "dec-sp")


@pytest_twisted.ensureDeferred
async def test_an_unreachable_agent_and_updater_are_two_failed_steps_and_the_host_is_revoked(
    master, tmp_path
):
    enroll_unreachable(master, "dec-gone", tmp_path)
    out, err, code = await admin_output(
        master.paths.home, "decommission", "dec-gone", "--yes", "--json"
    )
    assert code == 0, err
    doc = json.loads(out)
    assert doc["teardown"]["state"] == "failed" and "cannot reach" in doc["teardown"]["detail"]
    assert doc["forwarder"]["state"] == "failed" and "cannot reach" in doc["forwarder"]["detail"]
    assert doc["forwarder"]["unshipped_bytes"] is None
    assert revoked(master, "dec-gone")


LIES = {
    "stopped units": Reply({"result": "stopped", "units": [EVIL]}),
    "a result that is not one": Reply({"result": EVIL, "units": []}),
    "an error body": Reply({"problems": [EVIL]}, 500),
}


@pytest.mark.parametrize(
    ("lie", "as_json"),
    [
        ("stopped units", False),
        ("stopped units", True),
        ("a result that is not one", False),
        ("an error body", True),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_lying_worker_is_shown_escaped_and_revoked_all_the_same(
    master, tmp_path, lie, as_json
):
    enrolled = enroll_unreachable(master, "dec-liar", tmp_path)
    routes = {
        ("agent", "teardown"): Reply({"ok": EVIL, "removed": EVIL}),
        ("updater", "forwarder/stop"): LIES[lie],
    }
    fake = await FakeWorker(enrolled.bundle_dir, routes).start(
        reactor, enrolled.host.agent_port, enrolled.host.updater_port
    )
    flags = ["--json"] if as_json else []
    try:
        out, err, code = await admin_output(
            master.paths.home, "decommission", "dec-liar", "--yes", *flags
        )
    finally:
        await fake.stop()
    assert ("updater", "POST", "forwarder/stop") in fake.requests
    assert code == 0 and "Traceback" not in err, err
    assert no_control_characters(out + err) == []
    assert revoked(master, "dec-liar")
    if as_json:
        step = json.loads(out)["forwarder"]
        assert step["state"] == ("done" if lie == "stopped units" else "failed")
        assert lie != "stopped units" or EVIL in step["detail"]
    else:
        shown = [line for line in out.splitlines() if line.startswith("  forwarder ")]
        assert len(shown) == 1, out
        assert lie != "stopped units" or "\\x1b]0;PWNED" in shown[0]


@pytest_twisted.ensureDeferred
async def test_the_help_describes_the_forwarder_step_and_its_options(master):
    text, _, code = await admin_output(master.paths.home, "decommission", "--help")
    assert code == 0 and "stop the forwarder through NAME's updater" in " ".join(text.split())
    assert "--drain-timeout DURATION" in text and "--ingest-dir DIR" in text
