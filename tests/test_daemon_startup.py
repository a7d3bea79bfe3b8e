"""How every ``twistd decnet-*`` daemon fails to start: one line, the right exit code.

Real ``twistd`` subprocesses: a bad option, a bad ``--listen`` endpoint, a port
already in use, and ``--version``.
"""

from __future__ import annotations

import socket
import subprocess

import pytest

from decnet import __version__
from decnet.master import enrollment
from tests.support import BIN

DAEMONS = ("agent", "updater", "forwarder", "listener")
LISTENING = ("agent", "updater", "listener")


def twistd(*argv: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "twistd"), "--nodaemon", "--pidfile=", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def identities(master_home, tmp_path_factory):
    """What each listening daemon needs to get as far as binding its port."""
    base = tmp_path_factory.mktemp("startup")
    master = enrollment.load_master(master_home)
    enrollment.enroll(master, "startup-1", "127.0.0.1", base / "bundle", updater=True)
    bundle = str(base / "bundle")
    return base, {
        "agent": ["--bundle", bundle, "--state-dir", str(base / "agent-state"),
                  "--log-file", str(base / "decoys.log")],
        "updater": ["--bundle", bundle, "--install-dir", str(base / "install"),
                    "--agent-control", "spawn"],
        "listener": ["--home", str(master_home.home), "--no-feed",
                     "--ingest-dir", str(base / "ingest")],
    }  # fmt: skip


@pytest.mark.parametrize("daemon", DAEMONS)
def test_a_bad_option_is_one_line_and_exit_2_without_the_whole_help(daemon):
    result = twistd(f"decnet-{daemon}", "--no-such-option")
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert f"twistd decnet-{daemon}: error: option --no-such-option not recognized" in (
        result.stderr
    )


@pytest.mark.parametrize("daemon", DAEMONS)
def test_version_prints_decnets_version_not_twisteds(daemon):
    result = twistd(f"decnet-{daemon}", "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"twistd decnet-{daemon} (DECNET) {__version__}\n"


@pytest.mark.parametrize("daemon", LISTENING)
@pytest.mark.parametrize("endpoint", ["bogus:endpoint", "tcp:notaport", "tcp:1:nosuch=1"])
def test_a_listen_endpoint_twisted_cannot_parse_is_a_one_line_usage_error(
    identities, daemon, endpoint
):
    base, argv = identities
    result = twistd(f"decnet-{daemon}", *argv[daemon], "--listen", endpoint, cwd=base)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert f"{endpoint!r} is not an endpoint" in result.stderr


@pytest.mark.parametrize("daemon", LISTENING)
def test_a_port_in_use_is_one_clear_line_no_traceback_and_exit_1(identities, daemon):
    base, argv = identities
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        listen = f"tcp:{port}:interface=127.0.0.1"
        result = twistd(f"decnet-{daemon}", *argv[daemon], "--listen", listen, cwd=base)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output, output
    assert output.count("Address already in use") == 1, output
    assert f"Cannot listen on {listen}" in output
