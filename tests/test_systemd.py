"""sd_notify readiness and watchdog pings, against a real Unix datagram socket."""

import os
import socket

import pytest
from twisted.internet.task import Clock

from decnet.systemd import Notifier, SystemdService


@pytest.fixture
def notify_socket(tmp_path):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    yield sock, str(path)
    sock.close()


def received(sock) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096))
        except BlockingIOError:
            return out


def test_ready_and_status_reach_the_socket(notify_socket):
    sock, path = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.ready("listening on 6514")
    assert received(sock) == [b"READY=1\nSTATUS=listening on 6514"]


def test_the_abstract_namespace_is_supported():
    name = f"decnet-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.setblocking(False)
    try:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).notify("READY=1")
        assert received(sock) == [b"READY=1"]
    finally:
        sock.close()


def test_outside_systemd_everything_is_a_no_op():
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.ready() is False
    service = SystemdService(Clock(), notifier)
    service.startService()
    service.stopService()


def test_a_missing_socket_is_logged_not_raised(tmp_path):
    assert Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}).ready() is False


def test_the_watchdog_is_fed_at_half_its_interval_and_stopping_is_sent(notify_socket):
    sock, path = notify_socket
    clock = Clock()
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}
    service = SystemdService(clock, Notifier(env))
    service.startService()
    assert received(sock) == [b"WATCHDOG=1"]
    clock.advance(1.9)
    assert received(sock) == []
    clock.advance(0.1)
    assert received(sock) == [b"WATCHDOG=1"]
    service.ready()
    assert received(sock) == []  # not before the reactor's first turn
    clock.advance(0)
    service.stopService()
    assert received(sock) == [b"READY=1", b"STOPPING=1"]
    clock.advance(10)
    assert received(sock) == []


def test_a_watchdog_meant_for_another_process_is_ignored(notify_socket):
    _, path = notify_socket
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
    assert Notifier(env).watchdog_interval is None
    assert Notifier({"WATCHDOG_USEC": "0"}).watchdog_interval is None


def test_a_real_daemon_reports_ready_feeds_the_watchdog_and_says_stopping(
    notify_socket, master_home, tmp_path
):
    import signal
    import subprocess

    from tests.support import BIN, wait_for

    sock, path = notify_socket
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}
    env.pop("WATCHDOG_PID", None)
    twistd = [str(BIN / "twistd"), "--nodaemon", "--pidfile=", "decnet-listener"]
    proc = subprocess.Popen(
        [
            *twistd,
            *("--home", str(master_home.home), "--ingest-dir", str(tmp_path / "ingest")),
            *("--listen", "tcp:0:interface=127.0.0.1"),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    seen: list[bytes] = []

    def saw(predicate):
        seen.extend(received(sock))
        return predicate()

    try:
        wait_for(lambda: saw(lambda: any(m.startswith(b"READY=1") for m in seen)), 30)
        ready = next(m for m in seen if m.startswith(b"READY=1"))
        assert b"STATUS=listening for workers" in ready
        count = seen.count(b"WATCHDOG=1")
        wait_for(lambda: saw(lambda: seen.count(b"WATCHDOG=1") >= count + 2), 10)
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0].decode()
        # twistd re-raises the signal that stopped it after a clean shutdown.
        assert proc.returncode == -signal.SIGTERM and "Server Shut Down" in out, out
        assert b"STOPPING=1" in received(sock)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
