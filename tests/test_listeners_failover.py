"""A worker moves between two real listeners (loopback, real certificates) and every line
lands exactly once across their mirrors: each mirror is a series of segments, and a
listener the worker arrives at starts its segment where the worker's acknowledged offset
stands (``decnet-syslog/2``), never at its own older mark."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor
from twisted.logger import formatEvent, globalLogPublisher

from decnet import pki
from decnet.forwarder.rendezvous import rendezvous_order
from decnet.forwarder.service import ForwarderService
from decnet.listener import storage
from decnet.listener.service import ListenerService
from decnet.master import enrollment
from decnet.revocation import RevocationSet
from decnet.tls import TLSIdentity
from tests.logpipe_support import syslog_line
from tests.support import eventually


def segments(mirror: Path) -> list[tuple[int, bytes]]:
    """``(stream offset, bytes)`` of each segment of a mirror, from its commit index: a
    segment starts at offset 0 and after each "moved" record."""
    data = mirror.read_bytes() if mirror.exists() else b""
    index = mirror.with_suffix(".idx")
    records = storage.read_records(index) if index.exists() else []
    out: list[tuple[int, bytes]] = []
    start_mirror, start_stream = 0, 0
    for record in records:
        if record.moved:
            if record.mirror_end > start_mirror:
                out.append((start_stream, data[start_mirror : record.mirror_end]))
            start_mirror, start_stream = record.mirror_end, record.stream_end
    if len(data) > start_mirror:
        out.append((start_stream, data[start_mirror:]))
    return out


def assert_exactly_once(expected: bytes, *mirrors: Path) -> None:
    """The segments of all ``mirrors``, ordered by stream offset, tile ``expected``
    exactly: no byte missing, none twice."""
    pieces = sorted(s for m in mirrors for s in segments(m))
    at = 0
    for start, data in pieces:
        assert start == at, f"segment at {start}, expected {at} (overlap or hole)"
        assert data == expected[at : at + len(data)]
        at += len(data)
    assert at == len(expected)


def forwarder(bundle: pki.WorkerBundle, log_file: Path, state: Path, **kw) -> ForwarderService:
    """A started forwarder shipping ``log_file`` to the bundle's listeners."""
    fwd = ForwarderService(
        reactor,
        identity=TLSIdentity.from_bundle(bundle, "worker"),
        listeners=bundle.listeners,
        master_fingerprint=bundle.master_fingerprint,
        log_file=log_file,
        state_file=state,
        poll_interval=0.1,
        max_retry_delay=0.5,
        **kw,
    )
    fwd.startService()
    return fwd


def _lines(first: int, count: int) -> bytes:
    return b"".join(syslog_line(i) + b"\n" for i in range(first, first + count))


@pytest_twisted.ensureDeferred
async def test_a_worker_moves_to_the_second_listener_and_back_with_every_line_once(
    master_home, tmp_path
):
    identity = TLSIdentity.master(master_home)

    def listener(tag: str, port: int = 0) -> ListenerService:
        service = ListenerService(
            reactor,
            identity=identity,
            revocations=RevocationSet(master_home.revocations),
            ingest_dir=tmp_path / f"ingest-{tag}",
            listen=f"tcp:{port}:interface=127.0.0.1",
        )
        service.startService()
        return service

    one, two = listener("one"), listener("two")
    ports = {
        "one": one.port_service.port.getHost().port,
        "two": two.port_service.port.getHost().port,
    }
    name = f"move-{os.getpid()}-{random.randrange(10**6)}"
    listed = [f"127.0.0.1:{ports['one']}", f"127.0.0.1:{ports['two']}"]
    master = enrollment.load_master(master_home)
    enrollment.enroll(master, name, "127.0.0.1", tmp_path / "b", listeners=listed)
    bundle = pki.WorkerBundle.load(tmp_path / "b")
    order = rendezvous_order(name, bundle.listeners)
    # Name the listeners by the worker's preference.
    by_port = {ports["one"]: ("one", one), ports["two"]: ("two", two)}
    first_tag, first = by_port[order[0][1]]
    second_tag, second = by_port[order[1][1]]
    mirrors = [tmp_path / f"ingest-{t}" / name / "decnet.log" for t in (first_tag, second_tag)]

    events: list[str] = []

    def observe(event: dict) -> None:
        events.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    log_file = tmp_path / "decnet.log"
    log_file.write_bytes(_lines(0, 3000))
    fwd = forwarder(bundle, log_file, tmp_path / "f.sqlite", return_after=3.0)
    try:
        # Mid-stream: the preferred listener has some lines, not all, when it stops.
        await eventually(
            lambda: mirrors[0].exists() and mirrors[0].stat().st_size > 0, what="first lines"
        )
        await first.stopService()
        with open(log_file, "ab") as f:
            f.write(_lines(3000, 1000))
        expected = log_file.read_bytes()
        await eventually(
            lambda: fwd.shipper.core.acked == len(expected), what="everything acknowledged"
        )
        assert fwd.factory.target == listed[order[1] == bundle.listeners[1]]
        assert_exactly_once(expected, *mirrors)
        # Back on the preferred listener (its old mark is below the worker's offset).
        first = listener(first_tag, order[0][1])
        await eventually(
            lambda: (
                fwd.factory.target == f"127.0.0.1:{order[0][1]}" and fwd.factory.current is not None
            ),
            what="the return to the preferred listener",
        )
        with open(log_file, "ab") as f:
            f.write(_lines(4000, 500))
        expected = log_file.read_bytes()
        await eventually(
            lambda: fwd.shipper.core.acked == len(expected), what="the rest acknowledged"
        )
        assert_exactly_once(expected, *mirrors)
        assert len(segments(mirrors[0])) == 2 and len(segments(mirrors[1])) == 1
    finally:
        globalLogPublisher.removeObserver(observe)
        await fwd.stopService()
        await first.stopService()
        await second.stopService()
    text = "\n".join(events)
    first_at, second_at = f"127.0.0.1:{order[0][1]}", f"127.0.0.1:{order[1][1]}"
    assert f"Moving from {first_at} to {second_at}:" in text
    assert f"Moving from {second_at} to {first_at}: returning to the preferred listener" in text
    assert f"Worker {name} arrived on stream decnet" in text


@pytest_twisted.ensureDeferred
async def test_a_refreshed_bundle_moves_the_worker_without_a_restart_and_loses_nothing(
    master_home, tmp_path
):
    identity = TLSIdentity.master(master_home)
    services = []

    def listener(tag: str) -> ListenerService:
        service = ListenerService(
            reactor,
            identity=identity,
            revocations=RevocationSet(master_home.revocations),
            ingest_dir=tmp_path / f"ingest-{tag}",
            listen="tcp:0:interface=127.0.0.1",
        )
        service.startService()
        services.append(service)
        return service

    old, new = listener("old"), listener("new")
    old_at = f"127.0.0.1:{old.port_service.port.getHost().port}"
    new_at = f"127.0.0.1:{new.port_service.port.getHost().port}"
    name = f"refresh-{os.getpid()}-{random.randrange(10**6)}"
    master = enrollment.load_master(master_home)
    enrollment.enroll(master, name, "127.0.0.1", tmp_path / "b", listeners=[old_at])
    bundle = pki.WorkerBundle.load(tmp_path / "b")
    mirrors = [tmp_path / f"ingest-{t}" / name / "decnet.log" for t in ("old", "new")]
    log_file = tmp_path / "decnet.log"
    log_file.write_bytes(_lines(0, 1000))
    fwd = forwarder(
        bundle, log_file, tmp_path / "f.sqlite", bundle_dir=bundle.directory, bundle_check=0.2
    )
    try:
        first = log_file.read_bytes()
        await eventually(
            lambda: fwd.shipper is not None and fwd.shipper.core.acked == len(first),
            what="the first lines",
        )
        pki.replace_bundle_listeners(bundle.directory, [new_at])
        await eventually(
            lambda: fwd.factory.target == new_at and fwd.factory.current is not None,
            what="the move to the new listener",
        )
        with open(log_file, "ab") as f:
            f.write(_lines(1000, 1000))
        expected = log_file.read_bytes()
        await eventually(lambda: fwd.shipper.core.acked == len(expected), what="the rest")
        assert_exactly_once(expected, *mirrors)
        assert segments(mirrors[1])[0][0] == len(first)  # the new listener starts there
    finally:
        await fwd.stopService()
        for service in services:
            await service.stopService()
