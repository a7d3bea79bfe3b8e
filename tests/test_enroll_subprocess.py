"""Token enrollment end to end with the real programs: ``decnet-admin enroll --token``,
``twistd decnet-enroll``, ``decnet-worker join``, then the joined bundle shipping logs
through ``twistd decnet-forwarder`` to ``twistd decnet-listener``, and a decommission
after which the forwarder says it is refused instead of reconnecting forever."""

from __future__ import annotations

import json
import signal
import subprocess

import pytest

from decnet import pki
from decnet.master import enroll_tokens
from decnet.master.registry import Registry
from tests.enroll_support import fresh_master
from tests.logpipe_support import run_twistd, start_forwarder, start_listener, syslog_line
from tests.support import BIN, wait_for
from tests.test_logpipe_subprocess import stop

ADMIN = str(BIN / "decnet-admin")
WORKER = str(BIN / "decnet-worker")

pytestmark = pytest.mark.slow


def run(*argv: str, check: int | None = 0) -> subprocess.CompletedProcess:
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )
    if check is not None:
        assert result.returncode == check, result.stdout + result.stderr
    return result


@pytest.fixture
def enroll_daemon(master_home, tmp_path):
    master = fresh_master(master_home, tmp_path)
    port_file = tmp_path / "enroll.port"
    proc = run_twistd(
        "decnet-enroll",
        [
            "--home",
            master.paths.home,
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--port-file",
            port_file,
        ],
        tmp_path / "enroll.log",
    )

    def bound():
        if proc.poll() is not None:
            raise AssertionError(f"decnet-enroll exited: {proc.stderr.read().decode()[-2000:]}")
        return port_file.exists() and port_file.read_text().strip()

    port = int(wait_for(bound, what="decnet-enroll to bind"))
    yield master, port
    stop(proc)


def test_a_worker_joins_ships_logs_and_once_decommissioned_is_told_it_is_refused(
    enroll_daemon, tmp_path
):
    master, port = enroll_daemon
    home = str(master.paths.home)
    issued = json.loads(
        run(
            ADMIN, "--home", home, "enroll", "e2e-01", "--address", "127.0.0.1", "--token", "--json"
        ).stdout
    )
    assert issued["join_command"].startswith("decnet-worker join https://127.0.0.1:8443 --token ")
    bundle = tmp_path / "bundle"
    argv = [
        WORKER,
        "join",
        f"https://127.0.0.1:{port}",
        "--token",
        issued["token"],
        "--ca-fingerprint",
        pki.colon_fingerprint(issued["ca_fingerprint"]),
        "--dir",
        str(bundle),
    ]
    joined = json.loads(run(*argv, "--json").stdout)
    assert joined["name"] == "e2e-01" and joined["bundle"] == str(bundle)
    assert (
        Registry(master.paths.registry).get("e2e-01").worker_fingerprint
        == (joined["fingerprints"]["worker"])
    )
    # The master holds no private key of the worker.
    worker_key = (bundle / "worker.key").read_bytes()
    assert not any(
        worker_key in p.read_bytes() for p in master.paths.home.rglob("*") if p.is_file()
    )

    # A replay of the same command: refused, said in one line, JSON on stderr with --json.
    again = run(*argv[:-1], str(tmp_path / "again"), check=1)
    assert again.stderr.startswith("decnet-worker: error: the master refused the token: ")
    assert "already been used" in again.stderr and "Traceback" not in again.stderr
    again_json = run(*argv[:-1], str(tmp_path / "again"), "--json", check=1)
    assert again_json.stdout == ""
    assert "already been used" in json.loads(again_json.stderr)["problems"][0]

    # The joined bundle works with the real daemons: logs reach the master's ingest.
    log_file, ingest = tmp_path / "decnet.log", tmp_path / "ingest"
    listener, syslog_port = start_listener(home, ingest, tmp_path / "listener.log")
    forwarder = start_forwarder(
        bundle, log_file, tmp_path / "fw.sqlite", syslog_port, tmp_path / "forwarder-0.log"
    )
    try:
        lines = b"".join(syslog_line(i) + b"\n" for i in range(5))
        log_file.write_bytes(lines)
        mirror = ingest / "e2e-01" / "decnet.log"
        wait_for(
            lambda: mirror.exists() and mirror.read_bytes() == lines, timeout=60, what="ingest"
        )

        # Decommission (no agent runs here), then the worker restarts its forwarder.
        done = run(ADMIN, "--home", home, "decommission", "e2e-01", "--yes", "--no-teardown")
        assert "Decommissioned e2e-01" in done.stdout
        listener.send_signal(signal.SIGHUP)  # reload the revocation list now
        forwarder.kill()
        forwarder.wait()
        forwarder_log = tmp_path / "forwarder-1.log"
        forwarder = start_forwarder(
            bundle, log_file, tmp_path / "fw.sqlite", syslog_port, forwarder_log
        )
        said = "refused by the master: this worker's certificate is revoked or unknown"
        wait_for(
            lambda: forwarder_log.exists() and said in forwarder_log.read_text(),
            timeout=60,
            what="the forwarder to say it is refused",
        )
        text = forwarder_log.read_text()
        assert text.count(said) == 1
    finally:
        stop(forwarder)
        stop(listener)

    # The name stays taken, and the operator is told why.
    reuse = run(
        ADMIN, "--home", home, "enroll", "e2e-01", "--address", "127.0.0.1", "--token", check=1
    )
    assert "'e2e-01' was decommissioned at" in reuse.stderr


def test_kill_9_of_decnet_worker_at_any_moment_then_the_same_command_completes_the_join(
    enroll_daemon, tmp_path
):
    """Whatever step the kill hits (keys made, CSRs sent, answer received, bundle half
    installed), running the same command again ends with the bundle the registry pins."""
    import random
    import time

    master, port = enroll_daemon
    rng = random.Random(13)
    for i in range(4):
        name = f"kill-{i}"
        issued = enroll_tokens.issue_token(master, name, "127.0.0.1", updater=True)
        bundle = tmp_path / name
        argv = [
            WORKER,
            "join",
            f"https://127.0.0.1:{port}",
            "--token",
            issued.token,
            "--ca-fingerprint",
            issued.ca_fingerprint,
            "--dir",
            str(bundle),
        ]
        victim = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.2, 1.2))  # a random moment (fault schedule, not sync)
        victim.kill()
        victim.wait()
        if not bundle.exists():
            again = run(*argv, "--json")
            assert json.loads(again.stdout)["name"] == name
        host = Registry(master.paths.registry).get(name)
        loaded = pki.WorkerBundle.load(bundle)
        for role, fp in (
            ("worker", host.worker_fingerprint),
            ("updater", host.updater_fingerprint),
        ):
            assert pki.fingerprint(pki.load_cert(loaded.cert_path(role))) == fp
        run(*argv, check=1)  # and a bundle is never overwritten


def test_decnet_enroll_help_has_examples_and_a_bad_home_names_the_file_and_init(tmp_path):
    text = run(str(BIN / "twistd"), "decnet-enroll", "--help").stdout
    assert "Examples:" in text and "--max-attempts" in text and "--port-file" in text
    bad = run(
        str(BIN / "twistd"),
        "--nodaemon",
        "--pidfile=",
        "decnet-enroll",
        "--home",
        str(tmp_path / "nope"),
        check=None,
    )
    assert bad.returncode != 0
    said = bad.stdout + bad.stderr
    assert "unusable master home" in said and "decnet-admin init" in said
    assert "nope/ca/ca.crt" in said and "Traceback" not in said


def test_decnet_worker_help_has_examples_and_usage_errors_exit_2():
    text = run(WORKER, "join", "--help").stdout
    assert "examples:" in text and "--ca-fingerprint" in text and "/etc/decnet/bundle" in text
    missing = run(WORKER, "join", "https://m", check=2)
    assert "--token" in missing.stderr
    bad_fp = run(WORKER, "join", "https://m", "--token", "t", "--ca-fingerprint", "xyz", check=1)
    assert "not a SHA-256 fingerprint" in bad_fp.stderr
