"""``decnet-admin status / check / deploy / teardown`` against a real in-process agent.

The CLI runs as a subprocess (it has its own reactor) started without blocking
this test's reactor, which serves the agent.
"""

import json
import socket

import pytest
import pytest_twisted

from decnet import config
from decnet.master import enrollment
from tests.support import admin_output, record_ports, started_agent


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A master of its own, so `check` sees exactly the hosts enrolled here.

    cli-up's agent listens on port 0 (its port is recorded once bound); cli-down's port
    is held bound but not listening, so connecting to it is refused for sure.
    """
    paths = config.MasterPaths.resolve(tmp_path_factory.mktemp("cli-master") / "home")
    enrollment.init_master(paths)
    master = enrollment.load_master(paths)
    root = tmp_path_factory.mktemp("cli-bundles")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        up = enrollment.enroll(master, "cli-up", "127.0.0.1", root / "up")
        down = closed.getsockname()[1]
        enrollment.enroll(master, "cli-down", "127.0.0.1", root / "down", agent_port=down)
        yield paths, up


@pytest_twisted.async_yield_fixture
async def agent(home, tmp_path):
    paths, up = home
    service = await started_agent(up.bundle_dir, tmp_path)
    record_ports(paths, "cli-up", agent_port=service.port)
    yield service
    await service.stopService()


async def admin(home, *args):
    paths, _ = home
    return await admin_output(paths.home, *args)


@pytest_twisted.ensureDeferred
async def test_deploy_status_and_teardown_through_the_cli(home, agent, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "deckies": [
                    {
                        "name": "web-01",
                        "services": [{"type": "redis", "bind": "127.0.0.1", "port": 0}],
                    }
                ]
            }
        )
    )
    out, err, code = await admin(home, "deploy", "cli-up", "--spec", str(spec))
    assert code == 0, err
    assert "web-01  redis    started  listening" in out
    assert "all services listening" in out

    out, err, code = await admin(home, "deploy", "cli-up", "--spec", str(spec))
    assert code == 0 and "(unchanged)" in out and "unchanged  listening" in out

    out, err, code = await admin(home, "status", "cli-up")
    assert code == 0, err
    bound = agent.engine.status()["web-01"]["redis"]["address"]
    row = ["cli-up", "web-01", "redis", "redis", "listening", bound, "0", "0"]
    assert row in [line.split() for line in out.splitlines()]

    out, err, code = await admin(home, "status", "cli-up", "--json")
    doc = json.loads(out)
    assert doc["hosts"]["cli-up"]["deckies"]["web-01"]["services"]["redis"]["address"] == bound

    out, err, code = await admin(home, "teardown", "cli-up", "--decky", "ghost")
    assert code == 1
    assert err == "decnet-admin: error: HTTP 404: no decky named 'ghost' is deployed on cli-up\n"

    out, err, code = await admin(home, "teardown", "cli-up", "--decky", "web-01")
    assert code == 0 and "web-01  redis    removed" in out


@pytest_twisted.ensureDeferred
async def test_deploy_refuses_an_invalid_spec_locally_with_every_problem(home, tmp_path):
    spec = tmp_path / "bad.json"
    spec.write_text(json.dumps({"deckies": [{"name": "X", "services": [{"type": "nope"}]}]}))
    _out, err, code = await admin(home, "deploy", "cli-up", "--spec", str(spec))
    assert code == 1
    assert err.count("decnet-admin: error: ") == 2
    assert "must be one of ssh, telnet" in err


@pytest_twisted.ensureDeferred
async def test_check_reports_every_host_and_fails_when_one_is_down(home, agent):
    out, _err, code = await admin(home, "check")
    assert code == 2  # one host unreachable
    lines = out.splitlines()
    assert lines[0].split() == (
        "NAME ADDRESS HEALTH RELEASE DECKIES UPDATER LAST SEEN LOG LAG DETAIL".split()
    )
    rows = {line.split()[0]: line for line in lines[2:4]}  # in the order they answered
    assert sorted(rows) == ["cli-down", "cli-up"]
    assert rows["cli-down"].startswith("cli-down  127.0.0.1  DOWN")
    assert "cannot reach" in rows["cli-down"]
    assert rows["cli-up"].startswith("cli-up    127.0.0.1  healthy")
    out, _err, code = await admin(home, "hosts", "--json")
    status = {h["name"]: h["status"] for h in json.loads(out)}
    assert status == {"cli-down": "unreachable", "cli-up": "active"}


@pytest_twisted.ensureDeferred
async def test_status_of_all_hosts_shows_the_unreachable_ones(home, agent):
    out, _err, code = await admin(home, "status", "--all")
    assert code == 2  # one host unreachable
    assert "cli-down  -" in out and "UNREACHABLE" in out
    assert "cli-up" in out and "(nothing deployed)" in out
