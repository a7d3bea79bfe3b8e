"""``twistd decnet-listener`` options: the port's and the streams' limits, shown and validated."""

import subprocess

import pytest
from twisted.python import usage

from decnet.listener import tap
from tests.support import BIN

NEW_OPTIONS = {
    "--max-unauthenticated": "1024",
    "--max-unauthenticated-per-address": "16",
    "--handshake-timeout": "10.0",
    "--max-streams-per-worker": "8",
    "--max-open-streams": "512",
}


def parse(*argv):
    options = tap.Options()
    options.parseOptions(list(argv))
    return options


def listener_help() -> str:
    """What ``twistd decnet-listener --help`` prints."""
    return subprocess.run(
        [str(BIN / "twistd"), "decnet-listener", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def test_help_lists_every_limit_with_its_default():
    out = listener_help()
    flat = " ".join(out.split())
    for option, default in NEW_OPTIONS.items():
        assert f"{option}=" in out
        after = flat[flat.index(f"{option}=") :]
        assert f"[default: {default}]" in after[: after.index("--", 2)], option
    assert "backlog=1024" in flat


@pytest.mark.parametrize(
    "option, value, why",
    [
        ("--max-unauthenticated", "0", "positive"),
        ("--max-unauthenticated-per-address", "-1", "positive"),
        ("--handshake-timeout", "0.5", "1 to 300"),
        ("--handshake-timeout", "301", "1 to 300"),
        ("--handshake-timeout", "soon", "could not convert"),
        ("--max-streams-per-worker", "0", "positive"),
        ("--max-open-streams", "0", "positive"),
    ],
)
def test_a_bad_limit_is_refused_with_the_reason(master_home, option, value, why):
    with pytest.raises(usage.UsageError, match=why):
        parse("--home", str(master_home.home), option, value)


def test_the_per_address_cap_cannot_exceed_the_budget(master_home):
    with pytest.raises(usage.UsageError, match="cannot exceed --max-unauthenticated"):
        parse(
            "--home",
            str(master_home.home),
            "--max-unauthenticated",
            "8",
            "--max-unauthenticated-per-address",
            "9",
        )


def test_the_limits_reach_the_listener(master_home, tmp_path):
    options = parse(
        "--home",
        str(master_home.home),
        "--ingest-dir",
        str(tmp_path / "ingest"),
        "--listen",
        "tcp:0:interface=127.0.0.1",
        "--max-unauthenticated",
        "32",
        "--max-unauthenticated-per-address",
        "3",
        "--handshake-timeout",
        "4",
        "--max-streams-per-worker",
        "5",
        "--max-open-streams",
        "6",
        "--no-feed",
    )
    service = tap.makeService(options)
    factory = service.factory
    assert (factory.unauthenticated.limit, factory.unauthenticated.per_address) == (32, 3)
    assert factory.handshake_timeout == 4.0
    assert service.ingest.max_streams_per_worker == 5
    assert service.ingest.max_open_streams == 6
    assert service.port_service.gate == factory.outside_tls
    assert parse("--home", str(master_home.home))["listen"].endswith(":backlog=1024")
