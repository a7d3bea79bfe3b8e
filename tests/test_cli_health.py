"""``decnet-admin check / status / hosts``: healthy, degraded and unreachable hosts, for real.

Three hosts of one master:

* ``hc-ok``: a real ``twistd decnet-updater`` that has no release yet, and a real
  agent (in this test's reactor) on the agent port of its enrollment;
* ``hc-busy``: a real agent whose decoy could not listen: its port is in use;
* ``hc-off``: nothing listens on its agent port.

The CLI runs as a subprocess (its own reactor), started without blocking ours.
"""

import json
import os
import re
import socket
import time

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.utils import getProcessOutputAndValue

from decnet import config, pki
from decnet.agent.service import AgentService
from decnet.fsutil import atomic_write
from decnet.listener.workers import WorkerStates, _encode, state_path
from decnet.master import enrollment
from decnet.tls import TLSIdentity
from tests.support import BIN, LocalUpdater, eventually, record_ports


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    base = tmp_path_factory.mktemp("health")
    paths = config.MasterPaths.resolve(base / "home")
    enrollment.init_master(paths)
    master = enrollment.load_master(paths)
    updater = LocalUpdater(base, paths, "hc-ok")
    busy = enrollment.enroll(master, "hc-busy", "127.0.0.1", base / "busy")
    with socket.socket() as closed, socket.socket() as held:
        closed.bind(("127.0.0.1", 0))
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        enrollment.enroll(
            master, "hc-off", "127.0.0.1", base / "off", agent_port=closed.getsockname()[1]
        )
        updater.start()
        try:
            yield paths, updater, busy, held.getsockname()[1]
        finally:
            updater.stop()


def agent_service(bundle_dir, listen, state):
    bundle = pki.WorkerBundle.load(bundle_dir)
    return AgentService(
        reactor,
        bundle=bundle,
        identity=TLSIdentity.from_bundle(bundle, "worker"),
        listen=listen,
        state_dir=state / "state",
        log_file=state / "decnet.log",
    )


@pytest_twisted.async_yield_fixture(scope="module")
async def agents(fleet, tmp_path_factory):
    paths, updater, busy, held = fleet
    ok = agent_service(
        updater.base / "bundle",
        f"tcp:{updater.agent_port}:interface=127.0.0.1",
        tmp_path_factory.mktemp("ok-agent"),
    )
    bad = agent_service(busy.bundle_dir, "tcp:0:interface=127.0.0.1", tmp_path_factory.mktemp("b"))
    for service in (ok, bad):
        service.startService()
    port = await bad.api.ready
    record_ports(paths, "hc-busy", agent_port=port.getHost().port)
    await ok.api.ready
    spec = {
        "deckies": [
            {"name": "web-01", "services": [{"type": "redis", "bind": "127.0.0.1", "port": held}]}
        ]
    }
    spec_file = paths.home.parent / "busy-spec.json"
    spec_file.write_text(json.dumps(spec))
    _out, err, code = await admin(fleet, "deploy", "hc-busy", "--spec", str(spec_file))
    assert code == 1, err  # the service could not listen
    yield ok, bad
    for service in (ok, bad):
        await service.stopService()


async def admin(fleet, *args):
    paths = fleet[0]
    env = {k: v for k, v in os.environ.items() if k != config.ENV_HOME}
    out, err, code = await getProcessOutputAndValue(
        str(BIN / "decnet-admin"), ["--home", str(paths.home), *args], env=env
    )
    return out.decode(), err.decode(), code


def rows(out: str) -> dict[str, str]:
    return {line.split()[0]: line for line in out.splitlines()[2:] if line.startswith("hc-")}


@pytest_twisted.ensureDeferred
async def test_a_decoy_that_failed_with_address_in_use_makes_check_and_status_degraded(
    fleet, agents
):
    out, err, code = await admin(fleet, "check", "hc-busy")
    assert code == 1, (out, err)
    row = rows(out)["hc-busy"]
    assert row.split()[2] == "degraded"
    assert "1 service failed: web-01/redis: cannot listen on" in row
    assert "address already in use" in row

    out, err, code = await admin(fleet, "status", "hc-busy")
    assert code == 1, (out, err)
    assert "failed" in out and "address already in use" in out
    assert "hc-busy: degraded: 1 of 1 services failed" in out

    out, err, code = await admin(fleet, "status", "hc-busy", "--json")
    assert code == 1 and json.loads(out)["verdicts"] == {"hc-busy": "degraded"}


@pytest_twisted.ensureDeferred
async def test_check_exits_0_healthy_1_degraded_2_unreachable(fleet, agents):
    out, err, code = await admin(fleet, "check", "hc-ok")
    assert code == 0, (out, err)
    row = rows(out)["hc-ok"]
    assert row.split()[2] == "healthy"
    assert "waiting" in row.split() and "updater up, waiting for the first release" in row
    assert out.splitlines()[0].split()[:5] == ["NAME", "ADDRESS", "HEALTH", "RELEASE", "DECKIES"]

    _out, _err, code = await admin(fleet, "check", "hc-ok", "hc-busy")
    assert code == 1

    out, err, code = await admin(fleet, "check")
    assert code == 2, (out, err)
    assert sorted(rows(out)) == ["hc-busy", "hc-off", "hc-ok"]
    assert rows(out)["hc-off"].split()[2] == "DOWN" and "cannot reach" in rows(out)["hc-off"]
    assert out.splitlines()[-1] == "1 healthy, 1 degraded, 1 unreachable"

    out, _err, code = await admin(fleet, "check", "--json")
    assert code == 2
    verdicts = {r["name"]: r["verdict"] for r in json.loads(out)}
    assert verdicts == {"hc-ok": "healthy", "hc-busy": "degraded", "hc-off": "unreachable"}
    ok = next(r for r in json.loads(out) if r["name"] == "hc-ok")
    assert ok["updater"] == {
        "state": "waiting",
        "release": None,
        "detail": "updater up, waiting for the first release",
    }


@pytest_twisted.ensureDeferred
async def test_hosts_and_check_show_last_seen_and_log_lag_and_flag_stale_workers(fleet, agents):
    paths = fleet[0]
    now = time.time()
    states = WorkerStates()
    states.connected("hc-ok", now - 5)
    states.stream("hc-ok", "decnet", "ack", 0)
    states.committed("hc-ok", "decnet", 1000, 10, 1000, now - 5)
    states.status("hc-ok", "decnet", 1000 + 2048, 1000, now - 5)
    states.connected("hc-busy", now - 900)
    states.disconnected("hc-busy", now - 600)
    # A compromised worker's error text reaches the state file (and JSON) unescaped, never a tty.
    states.error("hc-busy", "\x1b]0;owned\x07 \u202etxt.exe", now - 600)
    paths.ingest_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(state_path(paths.ingest_dir), _encode(states.document(now)))

    out, err, code = await admin(fleet, "hosts")
    assert code == 0, err
    # (the last column, EXPIRES, is e.g. "2027-12-31 (396d)")
    table = {
        name: re.sub(r" +\d{4}-\d\d-\d\d \(\d+d\)$", "", row) for name, row in rows(out).items()
    }
    assert table["hc-ok"].split()[-3:] == ["now", "2.0", "KiB"]
    seen, *rest = table["hc-busy"].split()[-4:]
    assert re.fullmatch(r"10m\d\ds", seen) and rest == ["ago", "STALE", "unknown"]
    assert table["hc-off"].split()[-3:] == ["never", "STALE", "unknown"]
    assert "\x1b" not in out

    out, _err, code = await admin(fleet, "hosts", "--stale", "1h", "--json")
    logs = {h["name"]: h["logs"] for h in json.loads(out)}
    assert logs["hc-ok"]["lag"] == 2048 and logs["hc-ok"]["state"] == "connected"
    assert logs["hc-busy"]["stale"] is False and logs["hc-busy"]["state"] == "seen"
    assert logs["hc-busy"]["last_error"] == "\x1b]0;owned\x07 \u202etxt.exe"

    out, err, code = await admin(fleet, "check", "hc-ok")
    assert code == 0, (out, err)
    assert "now" in rows(out)["hc-ok"].split() and "2.0 KiB" in rows(out)["hc-ok"]
    out, err, code = await admin(fleet, "check", "hc-ok", "--stale", "1s")
    assert code == 0  # connected now: never stale

    # hc-busy is degraded anyway; its silence is named too.
    out, err, code = await admin(fleet, "check", "hc-busy", "--stale", "5m")
    assert code == 1 and "logs: not seen for 10m" in rows(out)["hc-busy"]

    _out, err, code = await admin(fleet, "hosts", "--stale", "5 minutes")
    assert code == 2 and "is not a duration" in err


# -- top ------------------------------------------------------------------------------------


class Watched(protocol.ProcessProtocol):
    """A ``decnet-admin top`` subprocess: its output as it arrives, and how it ended."""

    def __init__(self):
        self.out = b""
        self.err = b""
        self.ended = defer.Deferred()

    def outReceived(self, data):
        self.out += data

    def errReceived(self, data):
        self.err += data

    def processEnded(self, reason):
        self.ended.callback(reason.value.exitCode)


def start_top(fleet, *args) -> tuple[Watched, object]:
    paths = fleet[0]
    env = {k: v for k, v in os.environ.items() if k != config.ENV_HOME}
    watched = Watched()
    argv = [str(BIN / "decnet-admin"), "--home", str(paths.home), "top", "--interval", "1", *args]
    transport = reactor.spawnProcess(watched, argv[0], argv, env=env)
    return watched, transport


def feed_entry(worker: str, user: str) -> bytes:
    entry = {
        "source_worker": worker,
        "timestamp": "2026-11-30T16:00:00.123Z",
        "hostname": "web-01",
        "app_name": "ssh",
        "msgid": "login",
        "structured_data": [{"id": "decnet@32473", "params": [["user", user]]}],
        "mirror_offset": 0,
    }
    return json.dumps(entry).encode() + b"\n"


@pytest_twisted.ensureDeferred
async def test_top_shows_the_hosts_above_new_events_of_old_and_new_workers_until_ctrl_c(
    fleet, agents
):
    paths = fleet[0]
    feed = paths.ingest_dir / "hc-ok" / "decnet.jsonl"
    feed.parent.mkdir(parents=True, exist_ok=True)
    feed.write_bytes(feed_entry("hc-ok", "before-top-started"))
    watched, transport = start_top(fleet)
    try:
        await eventually(lambda: b"hc-off" in watched.out and b"DOWN" in watched.out, what="rows")
        with open(feed, "ab") as f:
            f.write(feed_entry("hc-ok", "root\x1b]0;owned\x07"))
        late = paths.ingest_dir / "hc-late" / "decnet.jsonl"
        late.parent.mkdir()
        late.write_bytes(feed_entry("hc-late", "admin"))
        await eventually(lambda: b"user=admin" in watched.out, what="the new worker's event")
        await eventually(lambda: b"owned" in watched.out, what="the hostile event")
    finally:
        transport.signalProcess("INT")
    code = await watched.ended
    out = watched.out.decode()
    assert code == 130, watched.err
    assert "Traceback" not in watched.err.decode()
    header = next(line for line in out.splitlines() if line.startswith("WORKER"))
    assert header.split() == [
        *("WORKER", "ADDRESS", "AGENT", "RELEASE", "DECKIES", "LISTENING"),
        *("LAST", "SEEN", "LOG", "LAG"),
    ]
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("hc-")}
    assert rows["hc-ok"].split()[2] == "healthy"
    assert rows["hc-busy"].split()[2] == "degraded" and "address already in use" in out
    assert rows["hc-off"].split()[2] == "DOWN"
    assert "before-top-started" not in out  # only what arrives after it started
    assert "\x1b" not in out and "user=root\\x1b]0;owned\\x07" in out


@pytest_twisted.ensureDeferred
async def test_top_json_is_one_valid_json_document_per_line(fleet, agents):
    watched, transport = start_top(fleet, "--json")
    try:
        await eventually(lambda: b'"hosts"' in watched.out, what="a host table")
    finally:
        transport.signalProcess("INT")
    assert await watched.ended == 130
    docs = [json.loads(line) for line in watched.out.decode().splitlines()]
    hosts = next(d for d in docs if d["type"] == "hosts")["hosts"]
    assert {h["worker"] for h in hosts} == {"hc-ok", "hc-busy", "hc-off"}


@pytest_twisted.ensureDeferred
async def test_a_mistyped_host_name_says_so_and_json_stays_json(fleet):
    _out, err, code = await admin(fleet, "check", "hc-okk")
    assert code == 1
    assert err == (
        "decnet-admin: error: no host named 'hc-okk' is enrolled (see `decnet-admin hosts`)\n"
    )
    out, _err, code = await admin(fleet, "check", "hc-okk", "--json")
    assert code == 1 and json.loads(out) == {"problems": [err.split("error: ", 1)[1].strip()]}
