"""``decnet-admin`` against compromised workers: the real console script, real mTLS fakes.

Each command runs as a subprocess (it has its own reactor) while this test's
reactor serves the fake workers (:mod:`tests.hostile_worker`).  A subprocess
that does not end by its deadline is killed, and that is a failure.
"""

import json
import os

import attrs
import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor

from decnet import config
from decnet.master import enrollment
from tests.hostile_worker import (
    EVIL,
    FakeWorker,
    Reply,
    fresh_master,
    health,
    no_control_characters,
    status,
)
from tests.support import BIN, free_port

SLOW = 60.0  # the deadline of a command that is not about deadlines


@attrs.frozen
class Run:
    out: str
    err: str
    code: int | None
    killed: bool

    @property
    def rows(self) -> dict[str, list[str]]:
        """Table rows by their first word (after the header and the dashes)."""
        return {line.split()[0]: line.split() for line in self.out.splitlines()[2:] if line}


class _Collect(protocol.ProcessProtocol):
    def __init__(self):
        self.out, self.err = [], []
        self.ended = defer.Deferred()

    def outReceived(self, data):
        self.out.append(data)

    def errReceived(self, data):
        self.err.append(data)

    def processEnded(self, reason):
        self.ended.callback(reason.value.exitCode)


async def admin(home, *args, deadline: float = SLOW) -> Run:
    """Run ``decnet-admin --home HOME ARGS``; kill it if it has not ended after ``deadline`` s."""
    collect = _Collect()
    env = {k: v for k, v in os.environ.items() if k != config.ENV_HOME}
    process = reactor.spawnProcess(
        collect,
        str(BIN / "decnet-admin"),
        ["decnet-admin", "--home", str(home), *args],
        env=env,
    )
    killer = reactor.callLater(deadline, process.signalProcess, "KILL")
    code = await collect.ended
    killed = not killer.active()
    if not killed:
        killer.cancel()
    out, err = b"".join(collect.out), b"".join(collect.err)
    return Run(out.decode("utf-8"), err.decode("utf-8"), code, killed)


def enroll_all(master_home, tmp_path_factory, label, names):
    base = tmp_path_factory.mktemp(label)
    master = fresh_master(master_home, base / "home")
    bundles = {}
    for name in names:
        bundles[name] = enrollment.enroll(
            master,
            name,
            "127.0.0.1",
            base / name,
            updater=True,
            agent_port=free_port(),
            updater_port=free_port(),
        )
    return master.paths.home, bundles


async def start(bundles, routes_by_host) -> list[FakeWorker]:
    fakes = []
    for name, routes in routes_by_host.items():
        host = bundles[name].host
        fake = FakeWorker(bundles[name].bundle_dir, routes)
        fakes.append(await fake.start(reactor, host.agent_port, host.updater_port))
    return fakes


HEALTHY = {
    ("agent", "health"): Reply(health(release="good-release")),
    ("agent", "status"): Reply(status()),
    ("updater", "health"): Reply({"status": "ok", "release": "good-release"}),
}
STALLED = {
    ("agent", "health"): Reply(health(), stall=True),
    ("agent", "status"): Reply(status(), stall=True),
}

# -- a stalled worker ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def stall_fleet(master_home, tmp_path_factory):
    return enroll_all(master_home, tmp_path_factory, "cli-stall", ["good", "stuck"])


@pytest.mark.parametrize("command", ["check", "status"])
@pytest_twisted.ensureDeferred
async def test_a_stalled_worker_never_delays_the_line_of_a_healthy_one(stall_fleet, command):
    home, bundles = stall_fleet
    fakes = await start(bundles, {"good": HEALTHY, "stuck": STALLED})
    try:
        run = await admin(home, command, "--timeout", "3", deadline=3 + 1)
    finally:
        for fake in fakes:
            await fake.stop()
    assert not run.killed, f"{command} did not exit within its timeout + 1 s: {run}"
    assert run.code == 2  # one host unreachable
    lines = run.out.splitlines()
    # The healthy host's line came first: printed as soon as it answered, not after the
    # stalled one's deadline.
    assert [line.split()[0] for line in lines[2:4]] == ["good", "stuck"]
    assert ("healthy" if command == "check" else "listening") in run.rows["good"]
    assert "stuck at 127.0.0.1:" in lines[3] and "did not answer within" in lines[3]
    assert run.err == ""


# -- bad replies --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def liar_fleet(master_home, tmp_path_factory):
    return enroll_all(master_home, tmp_path_factory, "cli-liar", ["good", "liar"])


LIAR = {
    ("agent", "health"): Reply({"status": "ok", "uptime": "forever"}),
    ("agent", "status"): Reply({"host": "liar", "summary": {}}),
    ("agent", "deploy"): Reply({"problems": [1, 2]}, 400),
    ("agent", "teardown"): Reply(b"not json", 200),
    ("updater", "releases"): Reply({"releases": [{"id": None}]}),
    ("updater", "rollback"): Reply({"problems": [1, 2]}, 409),
}


@pytest_twisted.ensureDeferred
async def test_a_bad_reply_is_that_hosts_row_and_every_other_host_is_printed(liar_fleet, tmp_path):
    home, bundles = liar_fleet
    fakes = await start(bundles, {"good": HEALTHY, "liar": LIAR})
    spec = tmp_path / "spec.json"
    spec.write_text('{"deckies": []}')
    try:
        check = await admin(home, "check")
        state = await admin(home, "status")
        state_json = await admin(home, "status", "--json")
        singles = [
            await admin(home, *args)
            for args in (
                ("deploy", "liar", "--spec", str(spec)),
                ("teardown", "liar"),
                ("releases", "liar"),
                ("rollback", "liar"),
            )
        ]
    finally:
        for fake in fakes:
            await fake.stop()
    assert check.code == 2 and check.rows["good"][2] == "healthy"  # a bad reply: unreachable
    assert check.rows["liar"][2:4] == ["BAD", "REPLY"]
    assert "uptime: must be a number, not a string" in check.out
    assert state.code == 2 and "listening" in state.rows["good"]
    assert state.rows["liar"][4:6] == ["BAD", "REPLY"]
    assert "deckies: is required" in state.out
    doc = json.loads(state_json.out)
    assert list(doc["hosts"]) == ["good"]
    assert doc["errors"]["liar"].startswith("bad reply from liar at 127.0.0.1:")
    for run in (check, state, state_json, *singles):
        assert not run.killed and "Traceback" not in run.err, run
    for run, why in zip(
        singles,
        [
            "HTTP 400: problems[0]: must be a string",
            "HTTP 200, and the body is not JSON",
            "releases[0].id: must be a string, not null",
            "HTTP 409: problems[0]: must be a string",
        ],
        strict=True,
    ):
        assert run.code == 1 and run.out == ""
        assert run.err.startswith("decnet-admin: error: bad reply from ")
        assert why in run.err and len(run.err.splitlines()) == 1


@pytest_twisted.ensureDeferred
async def test_a_redirect_on_deploy_is_one_error_naming_the_host(liar_fleet, tmp_path):
    home, bundles = liar_fleet
    to = "http://127.0.0.1:19999/"
    routes = {("agent", "deploy"): Reply({}, 307, {"location": to})}
    fakes = await start(bundles, {"liar": routes})
    spec = tmp_path / "spec.json"
    spec.write_text('{"deckies": []}')
    try:
        run = await admin(home, "deploy", "liar", "--spec", str(spec))
        as_json = await admin(home, "deploy", "liar", "--spec", str(spec), "--json")
    finally:
        for fake in fakes:
            await fake.stop()
    assert run.code == 1 and run.out == ""
    assert run.err == (
        "decnet-admin: error: bad reply from liar at 127.0.0.1:"
        f'{bundles["liar"].host.agent_port}: HTTP 307 redirect to "{to}"; '
        "the master never follows redirects\n"
    )
    assert as_json.code == 1
    assert json.loads(as_json.out) == {"problems": [run.err.split("error: ", 1)[1].strip()]}


# -- escape sequences in every field ------------------------------------------------------


def _evil_routes(fail: bool) -> dict:
    service = {
        "type": EVIL,
        "bind": EVIL,
        "port": 6379,
        "state": EVIL,
        "reason": EVIL,
        "address": EVIL,
        "connections": 1,
        "events": 2,
    }
    applied = {"action": EVIL, "state": EVIL, "address": EVIL, "reason": EVIL}
    apply = {
        "spec_hash": EVIL,
        "changed": True,
        "ok": False,
        "failed": [EVIL],
        "deckies": {"web-01": {"redis": applied}},
        "removed": [{"decky": "old-01", "service": "ftp"}],
    }
    routes = {
        ("agent", "health"): Reply(
            {"status": EVIL if fail else "ok", "host": EVIL, "version": EVIL, "release": EVIL}
        ),
        ("agent", "status"): Reply(
            {
                "host": EVIL,
                "spec_hash": EVIL,
                # A hostile decky *name* is a bad reply; its quoted key must be inert too.
                "deckies": {EVIL if fail else "web-01": {"services": {"redis": service}}},
                "summary": {"deckies": 1, "services": 1, "listening": 1},
            }
        ),
        ("updater", "health"): Reply({"status": "ok", "release": EVIL}),
        ("updater", "releases"): Reply(
            {
                "current": EVIL,
                "releases": [
                    {"id": EVIL, "installed_at": EVIL, "git_sha": EVIL, "current": True},
                    {"id": EVIL, "rollback_target": True},
                ],
                "updater_release": EVIL,
            }
        ),
    }
    if fail:
        problem = {"problems": [EVIL, EVIL], "result": "rolled_back"}
        routes |= {
            ("agent", "deploy"): Reply({"problems": [EVIL, EVIL]}, 400),
            ("agent", "teardown"): Reply({"problems": [EVIL]}, 404),
            ("updater", "update"): Reply(
                problem | {"current": EVIL, "release": EVIL, "output": {"install": EVIL}}, 409
            ),
            ("updater", "rollback"): Reply(problem | {"result": EVIL}, 409),
        }
    else:
        routes |= {
            ("agent", "deploy"): Reply(apply),
            ("agent", "teardown"): Reply(apply),
            ("updater", "update"): Reply(
                {"result": "updated", "release": EVIL, "detail": EVIL, "installed": True}
            ),
            ("updater", "rollback"): Reply(
                {"result": "rolled_back", "release": EVIL, "previous": EVIL, "detail": EVIL}
            ),
        }
    return routes


@pytest.fixture(scope="module")
def rogue_fleet(master_home, tmp_path_factory):
    return enroll_all(master_home, tmp_path_factory, "cli-rogue", ["rogue", "rogue2"])


def _commands(spec, wheelhouse) -> list[tuple[str, ...]]:
    update = ("update", "--host", "rogue", "--host", "rogue2", "--wheelhouse", str(wheelhouse))
    fleet = [("check",), ("status",), update]
    single = [
        ("rollback",),
        ("releases",),
        ("deploy", "--spec", str(spec)),
        ("teardown", "--decky", "web-01"),
    ]
    return fleet + [(cmd[0], host, *cmd[1:]) for cmd in single for host in ("rogue", "rogue2")]


@pytest_twisted.ensureDeferred
async def test_escape_sequences_from_a_worker_never_reach_the_terminal(
    rogue_fleet, tmp_path, wheelhouse
):
    home, bundles = rogue_fleet
    fakes = await start(bundles, {"rogue": _evil_routes(False), "rogue2": _evil_routes(True)})
    spec = tmp_path / "spec.json"
    spec.write_text('{"deckies": []}')
    commands = _commands(spec, wheelhouse)
    try:
        # A few at a time: the machine has two cores.
        limit = defer.DeferredSemaphore(3)
        runs = await defer.gatherResults(
            [
                limit.run(lambda a=args, j=json_flag: defer.ensureDeferred(admin(home, *a, *j)))
                for args in commands
                for json_flag in ((), ("--json",))
            ]
        )
    finally:
        for fake in fakes:
            await fake.stop()
    shown_escaped = "\\x1b]0;PWNED\\x07\\x1b[2J\\x9b31m\\x7f\\x00\\x0d\\x0afake line\\u202etxt"
    quoted = "\\u001b]0;PWNED\\u0007\\u001b[2J"  # a hostile key, quoted in a problem
    for (args, json_flag), run in zip(
        [(a, j) for a in commands for j in (False, True)], runs, strict=True
    ):
        label = " ".join(args) + (" --json" if json_flag else "")
        assert not run.killed and "Traceback" not in run.err, label
        assert no_control_characters(run.out + run.err) == [], label
        if json_flag:
            doc = json.loads(run.out)  # valid JSON, even when the command failed
            assert EVIL in json.dumps(doc, ensure_ascii=False) or quoted in run.out, label
        else:
            assert shown_escaped in run.out + run.err or quoted in run.out + run.err, label


@pytest_twisted.ensureDeferred
async def test_a_worker_lying_about_hundreds_of_failed_services_is_one_bounded_degraded_row(
    rogue_fleet,
):
    home, bundles = rogue_fleet
    failed = {
        "type": "redis",
        "bind": "127.0.0.1",
        "port": 6379,
        "state": "failed",
        "reason": EVIL,
        "connections": 0,
        "events": 0,
    }
    deckies = {f"d{i}": {"services": {"redis": failed}} for i in range(300)}
    liar = {
        ("agent", "health"): Reply(health()),
        ("agent", "status"): Reply(
            {"deckies": deckies, "summary": {"deckies": 300, "services": 300, "listening": 0}}
        ),
        ("updater", "health"): Reply({"status": "ok", "release": None}),
    }
    fakes = await start(bundles, {"rogue": liar, "rogue2": HEALTHY})
    try:
        run = await admin(home, "check", "--timeout", "10", deadline=20)
        as_json = await admin(home, "check", "--json", "--timeout", "10", deadline=20)
    finally:
        for fake in fakes:
            await fake.stop()
    assert run.code == 1 and not run.killed, run
    assert run.rows["rogue"][2] == "degraded" and run.rows["rogue2"][2] == "healthy"
    assert "300 services failed: d0/redis:" in run.out
    assert no_control_characters(run.out) == []
    assert max(len(line) for line in run.out.splitlines()) < 400  # one cut cell, not 300 reasons
    rogue = next(r for r in json.loads(as_json.out) if r["name"] == "rogue")
    assert len(rogue["failed"]) == 300 and rogue["failed"][0]["reason"] == EVIL
    assert rogue["updater"]["state"] == "waiting"
