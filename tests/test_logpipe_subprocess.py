"""The real ``twistd decnet-listener`` / ``twistd decnet-forwarder``, killed on purpose."""

import os
import random
import signal
import socket
import subprocess
import threading
import time

import pytest

from decnet.listener.feed import read_feed
from decnet.master import enrollment
from tests.logpipe_support import (
    TWISTD,
    start_forwarder,
    start_listener,
    syslog_line,
)
from tests.support import free_port, wait_for


@pytest.fixture
def worker(master_home, tmp_path):
    """A freshly enrolled worker bundle (unique name) on the shared master."""
    name = f"fw-{os.getpid()}-{random.randrange(10**6)}"
    enrollment.enroll(enrollment.load_master(master_home), name, "127.0.0.1", tmp_path / "bundle")
    return name, tmp_path / "bundle"


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_the_listener_refuses_to_start_without_its_identity(tmp_path):
    home = tmp_path / "empty-home"
    result = subprocess.run(
        [TWISTD, "--nodaemon", "--pidfile=", "decnet-listener", "--home", str(home)],
        capture_output=True,
        timeout=60,
    )
    assert result.returncode != 0
    out = (result.stdout + result.stderr).decode()
    assert str(home / "listener" / "listener.crt") in out and "decnet-admin init" in out


def test_a_failed_bind_stops_the_listener(master_home, tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        result = subprocess.run(
            [
                TWISTD,
                "--nodaemon",
                "--pidfile=",
                "-l",
                str(tmp_path / "l.log"),
                "decnet-listener",
                "--home",
                str(master_home.home),
                "--ingest-dir",
                str(tmp_path / "ingest"),
                "--listen",
                f"tcp:{port}:interface=127.0.0.1",
            ],
            capture_output=True,
            timeout=60,
        )
    finally:
        taken.close()
    assert result.returncode != 0
    assert "Cannot listen" in (tmp_path / "l.log").read_text()


class Writer(threading.Thread):
    """Appends numbered lines continuously; rotates (rename + create) once when told."""

    def __init__(self, path):
        super().__init__(daemon=True)
        self.path = path
        self.rotate = threading.Event()
        self.stop = threading.Event()
        self.rotated = False
        self.count = 0
        self.rng = random.Random(5425)

    def run(self):
        f = open(self.path, "ab", buffering=0)
        while not self.stop.is_set():
            if self.rotate.is_set() and not self.rotated:
                f.close()
                os.rename(self.path, str(self.path) + ".1")
                f = open(self.path, "ab", buffering=0)
                self.rotated = True
            batch = b"".join(
                syslog_line(self.count + i, pad=self.rng.randrange(150)) + b"\n"
                for i in range(self.rng.randrange(1, 40))
            )
            self.count += batch.count(b"\n")
            if self.rng.random() < 0.3:  # sometimes a line is written in two parts
                cut = self.rng.randrange(1, len(batch))
                f.write(batch[:cut])
                time.sleep(0.002)
                f.write(batch[cut:])
            else:
                f.write(batch)
            time.sleep(self.rng.uniform(0.001, 0.01))
        f.close()


@pytest.mark.slow
def test_kill_9_of_either_side_at_random_moments_loses_and_duplicates_nothing(
    master_home, worker, tmp_path
):
    name, bundle = worker
    log_file = tmp_path / "decnet.log"
    ingest = tmp_path / "ingest"
    state = tmp_path / "forwarder.sqlite"
    listener, port = start_listener(master_home.home, ingest, tmp_path / "listener-0.log")
    forwarder = start_forwarder(bundle, log_file, state, port, tmp_path / "forwarder-0.log")
    writer = Writer(log_file)
    writer.start()
    rng = random.Random(9)
    kills = {"listener": 0, "forwarder": 0}
    try:
        for round_ in range(12):
            time.sleep(rng.uniform(0.3, 1.5))  # a random moment (fault schedule, not sync)
            if round_ == 6:
                writer.rotate.set()
            victim = "listener" if rng.random() < 0.5 else "forwarder"
            kills[victim] += 1
            if victim == "listener":
                listener.kill()
                listener.wait()
                listener, _ = start_listener(
                    master_home.home, ingest, tmp_path / f"listener-{round_ + 1}.log", port
                )
            else:
                forwarder.kill()
                forwarder.wait()
                forwarder = start_forwarder(
                    bundle, log_file, state, port, tmp_path / f"forwarder-{round_ + 1}.log"
                )
        writer.stop.set()
        writer.join()
        assert writer.rotated and sum(kills.values()) == 12
        expected = (tmp_path / "decnet.log.1").read_bytes() + log_file.read_bytes()
        mirror = ingest / name / "decnet.log"

        def caught_up():
            return mirror.exists() and mirror.stat().st_size >= len(expected)

        wait_for(caught_up, timeout=90, what="the mirror to catch up")
        assert mirror.read_bytes() == expected
        assert expected.count(b"\n") == writer.count
        feed_path = ingest / name / "decnet.jsonl"

        def feed_done():
            return feed_path.exists() and feed_path.read_bytes().count(b"\n") >= writer.count

        wait_for(feed_done, timeout=90, what="the JSON feed to catch up")
        feed = read_feed(feed_path)
        assert [e["structured_data"][0]["params"][0][1] for e in feed] == [
            str(i) for i in range(writer.count)
        ]
        assert {e["source_worker"] for e in feed} == {name}
    finally:
        writer.stop.set()
        stop(forwarder)
        stop(listener)


def lines(first: int, count: int) -> bytes:
    return b"".join(syslog_line(i) + b"\n" for i in range(first, first + count))


def append(path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def forwarder_up(log_path):
    """The forwarder has read its journal and follows the file (it records every file it opens)."""
    wait_for(
        lambda: log_path.exists() and "Forwarding" in log_path.read_text(errors="replace"),
        what="the forwarder to start",
    )


def mirror_of(ingest, name, expected: bytes) -> bytes:
    mirror = ingest / name / "decnet.log"
    wait_for(
        lambda: mirror.exists() and mirror.stat().st_size >= len(expected),
        timeout=60,
        what="the mirror to catch up",
    )
    return mirror.read_bytes()


@pytest.mark.slow
def test_a_rotation_before_the_first_ack_survives_kill_9_of_the_forwarder(
    master_home, worker, tmp_path
):
    """Issue #9 A, the repro: the listener is down when the forwarder starts."""
    name, bundle = worker
    log_file, state, ingest = tmp_path / "decnet.log", tmp_path / "f.sqlite", tmp_path / "ingest"
    log_file.touch()
    port = free_port()
    forwarder = start_forwarder(bundle, log_file, state, port, tmp_path / "f0.log")
    listener = None
    try:
        forwarder_up(tmp_path / "f0.log")
        append(log_file, lines(0, 100))
        os.rename(log_file, str(log_file) + ".1")
        append(log_file, lines(100, 100))
        forwarder.kill()
        forwarder.wait()
        forwarder = start_forwarder(bundle, log_file, state, port, tmp_path / "f1.log")
        forwarder_up(tmp_path / "f1.log")
        listener, _ = start_listener(master_home.home, ingest, tmp_path / "l.log", port)
        assert mirror_of(ingest, name, lines(0, 200)) == lines(0, 200)
    finally:
        stop(forwarder)
        if listener is not None:
            stop(listener)


@pytest.mark.slow
def test_rotations_of_every_style_before_the_first_connection_lose_nothing(
    master_home, worker, tmp_path
):
    name, bundle = worker
    log_file, state, ingest = tmp_path / "decnet.log", tmp_path / "f.sqlite", tmp_path / "ingest"
    port = free_port()
    append(log_file, lines(0, 50))
    forwarder = start_forwarder(bundle, log_file, state, port, tmp_path / "f0.log")
    listener = None
    try:
        forwarder_up(tmp_path / "f0.log")
        os.rename(log_file, str(log_file) + ".1")  # rename and create
        append(log_file, lines(50, 50))
        wait_for(
            lambda: "rotated" in (tmp_path / "f0.log").read_text(errors="replace"),
            what="the forwarder to notice the rotation",
        )
        os.unlink(str(log_file) + ".1")  # deleted: still readable through its descriptor
        copy = log_file.read_bytes()  # copytruncate
        (tmp_path / "decnet.log.1").write_bytes(copy)
        os.truncate(log_file, 0)
        append(log_file, lines(100, 50))
        listener, _ = start_listener(master_home.home, ingest, tmp_path / "l.log", port)
        assert mirror_of(ingest, name, lines(0, 150)) == lines(0, 150)
    finally:
        stop(forwarder)
        if listener is not None:
            stop(listener)


@pytest.mark.slow
def test_two_rotations_while_the_forwarder_is_down_are_drained_in_order(
    master_home, worker, tmp_path
):
    name, bundle = worker
    log_file, state, ingest = tmp_path / "decnet.log", tmp_path / "f.sqlite", tmp_path / "ingest"
    listener, port = start_listener(master_home.home, ingest, tmp_path / "l.log")
    append(log_file, lines(0, 40))
    forwarder = start_forwarder(bundle, log_file, state, port, tmp_path / "f0.log")
    try:
        assert mirror_of(ingest, name, lines(0, 40)) == lines(0, 40)
        forwarder.kill()
        forwarder.wait()
        append(log_file, lines(40, 40))
        os.rename(log_file, str(log_file) + ".1")
        append(log_file, lines(80, 40))
        os.rename(str(log_file) + ".1", str(log_file) + ".2")
        os.rename(log_file, str(log_file) + ".1")
        append(log_file, lines(120, 40))
        forwarder = start_forwarder(bundle, log_file, state, port, tmp_path / "f1.log")
        assert mirror_of(ingest, name, lines(0, 160)) == lines(0, 160)
    finally:
        stop(forwarder)
        stop(listener)


@pytest.mark.slow
def test_a_rotated_file_deleted_while_the_forwarder_is_down_is_a_recorded_gap(
    master_home, worker, tmp_path
):
    name, bundle = worker
    log_file, state, ingest = tmp_path / "decnet.log", tmp_path / "f.sqlite", tmp_path / "ingest"
    listener, port = start_listener(master_home.home, ingest, tmp_path / "l.log")
    append(log_file, lines(0, 10))
    forwarder = start_forwarder(bundle, log_file, state, port, tmp_path / "f0.log")
    try:
        assert mirror_of(ingest, name, lines(0, 10)) == lines(0, 10)
        forwarder.kill()
        forwarder.wait()
        append(log_file, lines(10, 10))  # never shipped...
        os.rename(log_file, str(log_file) + ".1")
        os.unlink(str(log_file) + ".1")  # ... and deleted while the forwarder is down
        append(log_file, lines(20, 10))
        forwarder = start_forwarder(bundle, log_file, state, port, tmp_path / "f1.log")
        mirror = mirror_of(ingest, name, lines(0, 10) + lines(20, 10))
        assert mirror == lines(0, 10) + lines(20, 10)
        wait_for(
            lambda: "Gap in" in (tmp_path / "l.log").read_text(errors="replace"),
            what="the listener to log the gap",
        )
        assert "gap" in (tmp_path / "f1.log").read_text(errors="replace")
    finally:
        stop(forwarder)
        stop(listener)
