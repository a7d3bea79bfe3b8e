"""``twistd decnet-updater`` options and start-up refusals."""

import socket
import subprocess

import pytest
from twisted.python import usage

from decnet.master import enrollment
from decnet.updater import tap
from decnet.updater.agentctl import agent_argv
from tests.support import BIN


@pytest.fixture(scope="module")
def bundles(master_home, tmp_path_factory):
    base = tmp_path_factory.mktemp("tap")
    master = enrollment.load_master(master_home)
    enrollment.enroll(master, "tap-with", "127.0.0.1", base / "with", updater=True)
    enrollment.enroll(master, "tap-without", "127.0.0.1", base / "without")
    return base


def parse(*argv):
    options = tap.Options()
    options.parseOptions(list(argv))
    return options


def test_it_refuses_to_start_without_the_updater_identity(bundles):
    with pytest.raises(usage.UsageError, match="no updater identity"):
        parse("--bundle", str(bundles / "without"))
    with pytest.raises(usage.UsageError, match="--bundle DIR is required"):
        parse()
    with pytest.raises(usage.UsageError, match="not found"):
        parse("--bundle", str(bundles / "nowhere"))


def test_options_are_validated(bundles):
    b = str(bundles / "with")
    with pytest.raises(usage.UsageError, match="agent-control"):
        parse("--bundle", b, "--agent-control", "kill-by-name")
    with pytest.raises(usage.UsageError, match="https"):
        parse("--bundle", b, "--agent-url", "http://127.0.0.1:1")
    with pytest.raises(usage.UsageError):
        parse("--bundle", b, "--keep", "0")
    options = parse("--bundle", b, "--agent-control", "spawn", "--install-dir", "rel")
    assert options["self-restart"] == "exec" and options["install-dir"].startswith("/")
    assert parse("--bundle", b)["self-restart"] == "exit"  # systemd restarts it


def spawning_service(bundles, tmp_path):
    """The updater's service tree for the enrolled bundle, spawning its agent."""
    options = parse(
        "--bundle",
        str(bundles / "with"),
        "--install-dir",
        str(tmp_path),
        "--agent-control",
        "spawn",
    )
    return tap.makeService(options)


def test_make_service_builds_the_tree(bundles, tmp_path):
    service = spawning_service(bundles, tmp_path)
    assert service.updater.agent.control == "spawn"
    assert service.updater.keep == 3


def test_the_spawned_agent_runs_from_the_release_by_its_real_path(tmp_path):
    argv = agent_argv(
        tmp_path / "releases" / "abc",
        bundle="/b",
        listen="tcp:1:interface=127.0.0.1",
        state_dir="/s",
    )
    assert argv[0] == str(tmp_path / "releases" / "abc" / "venv" / "bin" / "python")
    assert argv[1] == "-c" and "twistd" in argv[2]
    assert argv[3:] == [
        "--nodaemon",
        "--pidfile=",
        "decnet-agent",
        "--bundle",
        "/b",
        "--listen",
        "tcp:1:interface=127.0.0.1",
        "--state-dir",
        "/s",
    ]


def test_the_spawned_agent_can_have_its_own_twistd_log(tmp_path):
    argv = agent_argv(
        tmp_path / "r",
        bundle="/b",
        listen="tcp:1",
        twistd_log="/logs/agent.log",
    )
    assert argv[3:8] == ["--nodaemon", "--pidfile=", "--logfile", "/logs/agent.log", "decnet-agent"]


def test_a_port_in_use_stops_the_daemon(bundles, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [
                str(BIN / "twistd"),
                "--nodaemon",
                "--pidfile=",
                "decnet-updater",
                "--bundle",
                str(bundles / "with"),
                "--install-dir",
                str(tmp_path / "inst"),
                "--listen",
                f"tcp:{port}:interface=127.0.0.1",
                "--agent-control",
                "spawn",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode != 0
    assert "Address already in use" in result.stdout + result.stderr


def test_an_updater_stopped_before_its_port_opened_stops_cleanly(bundles, tmp_path):
    """twistd stops services that never started when start-up fails half-way."""
    service = spawning_service(bundles, tmp_path)
    outcome = []
    service.stopService().addBoth(outcome.append)
    assert outcome == [None]
