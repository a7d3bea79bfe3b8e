"""The forwarder's delivery core and its shell, byte by byte: a real tailer, a
real SQLite journal and the real protocol on a ``StringTransport``, with the
thread lane run inline and a ``Clock``.

Each rule that makes delivery exactly-once has a test here that fails if the
rule is broken: the position is persisted, only after an ACK, RESUME is
obeyed, and a generation is released only once it is acknowledged to its end.
"""

import os
import sqlite3

import pytest
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from decnet import config
from decnet.forwarder import core
from decnet.forwarder.client import ForwarderFactory, Shipper
from decnet.forwarder.journal import FileIdentity, GenerationRecord
from decnet.forwarder.offsets import JournalStore
from decnet.forwarder.tail import Piece, Tailer
from decnet.syslog import ackproto
from decnet.syslog.framing import OctetCountingDecoder, encode_frame
from decnet.threads import inline_runner

STREAM = "decnet"


class Rig:
    """One forwarder (tailer, journal, core, shell) and one connection to a fake listener."""

    def __init__(self, tmp_path, *, window=core.DEFAULT_WINDOW):
        self.path = tmp_path / "decnet.log"
        self.path.touch()
        self.state = tmp_path / "forwarder.sqlite"
        self.clock = Clock()
        self.store = JournalStore(self.state, self.clock.seconds)
        self.tailer = Tailer(self.path)
        journal = self.store.load(STREAM)
        self.tailer.start(journal)
        self.store.commit(STREAM, records=self.tailer.take_records())
        delivery = core.DeliveryCore(STREAM, acked=journal.acked, max_payload=4096, window=window)
        self.shipper = Shipper(delivery, self.tailer, self.store, self.clock, inline_runner)
        self.factory = ForwarderFactory(self.shipper, stream=STREAM, mode="ack", target="m")

    def connect(self, alpn: bytes = config.ACK_ALPN):
        self.proto = self.factory.buildProtocol(None)
        self.transport = StringTransport()
        self.transport.negotiatedProtocol = alpn
        self.proto.makeConnection(self.transport)
        self.proto.handshakeCompleted()
        return self.take()

    def take(self) -> bytes:
        out = self.transport.value()
        self.transport.clear()
        return out

    def say(self, body: bytes) -> None:
        """The listener sends ``body`` in one frame, delivered one byte at a time."""
        for byte in encode_frame(body):
            self.proto.dataReceived(bytes([byte]))

    def write(self, data: bytes) -> None:
        with open(self.path, "ab") as f:
            f.write(data)
        self.shipper.notify()

    def acked_on_disk(self) -> int:
        return JournalStore(self.state, self.clock.seconds).load(STREAM).acked


def data_frame(start: int, end: int, payload: bytes) -> bytes:
    return encode_frame(ackproto.encode_data(start, end, payload))


def test_hello_then_data_after_resume_byte_for_byte(tmp_path):
    rig = Rig(tmp_path)
    assert rig.connect() == encode_frame(b"H 1 decnet")
    rig.write(b"one\n")
    assert rig.take() == b""  # nothing before RESUME
    rig.say(b"R 0")
    assert rig.take() == data_frame(0, 4, b"one\n")
    rig.write(b"two\nthr")
    assert rig.take() == data_frame(4, 8, b"two\n")


def test_the_acknowledged_offset_is_persisted(tmp_path):
    rig = Rig(tmp_path)
    rig.connect()
    rig.say(b"R 0")
    rig.write(b"one\ntwo\n")
    rig.say(b"A 8")
    assert rig.acked_on_disk() == 8
    assert rig.shipper.core.durable_acked == 8


def test_nothing_is_persisted_before_the_ack(tmp_path):
    rig = Rig(tmp_path)
    rig.connect()
    rig.say(b"R 0")
    rig.write(b"one\ntwo\n")
    assert rig.take() == data_frame(0, 8, b"one\ntwo\n")
    assert rig.acked_on_disk() == 0
    rig.say(b"A 4")
    assert rig.acked_on_disk() == 4


def test_resume_is_obeyed_forward_and_backward(tmp_path):
    rig = Rig(tmp_path)
    rig.write(b"one\ntwo\nthree\n")
    rig.connect()
    rig.say(b"R 4")  # the master already has "one\n"
    assert rig.take() == data_frame(4, 14, b"two\nthree\n")
    rig.proto.connectionLost(Failure(ConnectionDone()))
    rig.connect()
    rig.say(b"R 8")  # it lost nothing but our ACK
    assert rig.take() == data_frame(8, 14, b"three\n")
    assert rig.acked_on_disk() == 8  # its mark is recorded as ours


def test_a_generation_is_released_only_when_acknowledged_to_its_end(tmp_path):
    rig = Rig(tmp_path)
    rig.connect()
    rig.say(b"R 0")
    rig.write(b"g1 line a\ng1 line b\n")  # 20 bytes
    os.rename(rig.path, tmp_path / "decnet.log.1")
    rig.write(b"g2\n")
    rig.take()
    rig.say(b"A 10")  # half of the first generation
    assert len(rig.tailer.gens) == 2
    # The connection drops: the master only has 10 bytes; the rest is still readable.
    rig.proto.connectionLost(Failure(ConnectionDone()))
    rig.connect()
    rig.say(b"R 10")
    assert rig.take() == data_frame(10, 20, b"g1 line b\n") + data_frame(20, 23, b"g2\n")
    rig.say(b"A 20")
    assert len(rig.tailer.gens) == 1
    states = [g.state for g in JournalStore(rig.state, rig.clock.seconds).load(STREAM).generations]
    assert states == ["done", "active"]


def test_the_window_bounds_unacknowledged_bytes(tmp_path):
    rig = Rig(tmp_path, window=8)
    rig.connect()
    rig.say(b"R 0")
    rig.write(b"aaaaaaa\nbbbbbbb\n")
    assert rig.take() == data_frame(0, 16, b"aaaaaaa\nbbbbbbb\n")
    rig.write(b"ccc\n")
    assert rig.take() == b""  # 16 unacknowledged >= window
    rig.say(b"A 16")
    assert rig.take() == data_frame(16, 20, b"ccc\n")


def test_the_journal_stamps_updated_at_with_the_injected_clock(tmp_path):
    clock = Clock()
    clock.advance(1767323045.25)
    store = JournalStore(tmp_path / "f.sqlite", clock.seconds)
    store.commit(STREAM, acked=5)
    store.close()
    db = sqlite3.connect(tmp_path / "f.sqlite")
    assert db.execute("SELECT acked, updated_at FROM streams").fetchall() == [
        (5, "2026-01-02T03:04:05.250000+00:00")
    ]
    db.close()


def test_an_ack_beyond_what_was_sent_closes_the_connection(tmp_path):
    rig = Rig(tmp_path)
    rig.connect()
    rig.say(b"R 0")
    rig.write(b"one\n")
    rig.say(b"A 999")
    assert rig.transport.disconnecting
    assert rig.acked_on_disk() == 0


def test_an_ack_before_resume_or_a_second_resume_closes_the_connection(tmp_path):
    rig = Rig(tmp_path)
    rig.connect()
    rig.say(b"A 0")
    assert rig.transport.disconnecting
    rig.connect()
    rig.say(b"R 0")
    rig.say(b"R 0")
    assert rig.transport.disconnecting


def test_a_master_mark_older_than_anything_left_is_declared_as_a_gap(tmp_path):
    rig = Rig(tmp_path)
    rig.connect()
    rig.say(b"R 0")
    rig.write(b"one\n")
    os.rename(rig.path, tmp_path / "decnet.log.1")
    rig.write(b"two\n")
    rig.take()
    rig.say(b"A 8")
    rig.proto.connectionLost(Failure(ConnectionDone()))
    rig.connect()
    rig.say(b"R 2")  # the master lost data (restored from a backup, say)
    assert rig.take() == encode_frame(b"G 2 4") + data_frame(4, 8, b"two\n")


def settle(delivery, out):
    """Complete every journal commit in ``out`` (and those they lead to); all commands."""
    seen = list(out)
    while True:
        persists = [c for c in out if isinstance(c, core.Persist)]
        if not persists:
            return seen
        out = delivery.persisted(persists[0].acked, persists[0].token)
        seen += out


def streaming(mode=core.ACK):
    delivery = core.DeliveryCore(STREAM, acked=0, max_payload=100)
    delivery.connected(mode)
    if mode == core.ACK:
        delivery.resume(0)
    settle(delivery, delivery.rewound(0, [], delivery.epoch))
    return delivery


def test_records_of_a_new_generation_are_durable_before_its_bytes_are_sent():
    """The core holds the lines read after a rotation until the journal has the file."""
    delivery = streaming()
    record = GenerationRecord(2, FileIdentity(1, 2), 0)
    out = delivery.read_done([Piece(0, 3, b"ab\n")], [record], delivery.epoch)
    assert not [c for c in out if isinstance(c, core.Send)]
    (persist,) = [c for c in out if isinstance(c, core.Persist)]
    assert persist.records == (record,)
    assert core.Send((b"9 ", b"D 0 3 ", b"ab\n")) in delivery.persisted(
        persist.acked, persist.token
    )


def test_release_follows_only_a_durable_ack():
    delivery = streaming()
    delivery.read_done([Piece(0, 3, b"ab\n")], [], delivery.epoch)
    out = delivery.ack(3)
    assert not [c for c in out if isinstance(c, core.Release)]
    (persist,) = [c for c in out if isinstance(c, core.Persist)]
    assert persist.acked == 3
    assert core.Release(3) in delivery.persisted(persist.acked, persist.token)


@pytest.mark.parametrize("mode", [core.ACK, core.PLAIN])
def test_a_failed_journal_write_is_retried_and_loses_nothing(mode):
    delivery = streaming(mode)
    out = delivery.read_done([Piece(0, 3, b"ab\n")], [], delivery.epoch)
    if mode == core.ACK:
        out = delivery.ack(3)
    (persist,) = [c for c in out if isinstance(c, core.Persist)]
    assert delivery.persist_failed(persist.acked, persist.records) == []
    assert delivery.retry_persist() == [core.Persist(3, (), persist.token)]


# -- STATUS (S <end>) --------------------------------------------------------------------


def status_frame(end: int) -> bytes:
    return encode_frame(ackproto.encode_status(end))


def test_status_reports_the_file_end_an_interval_after_streaming_began_byte_for_byte():
    delivery = streaming()
    assert delivery.file_end(10, now=0.0) == []  # the first report waits one interval
    assert delivery.file_end(10, now=0.5) == []
    assert delivery.file_end(10, now=1.0) == [core.Send((b"4 S 10",))]


def test_status_is_sent_only_when_the_end_changed_and_at_most_once_per_interval():
    delivery = streaming()
    delivery.file_end(10, now=0.0)
    assert delivery.file_end(10, now=1.0) == [core.Send((status_frame(10),))]
    assert delivery.file_end(10, now=5.0) == []  # unchanged: nothing to say
    assert delivery.file_end(20, now=5.5) == [core.Send((status_frame(20),))]
    assert delivery.file_end(30, now=6.0) == []  # changed, but too soon
    assert delivery.file_end(40, now=6.5) == [core.Send((status_frame(40),))]  # caught up


def test_status_never_reports_less_than_was_sent():
    delivery = streaming()
    delivery.read_done([Piece(0, 30, b"x" * 29 + b"\n")], [], delivery.epoch)
    delivery.file_end(0, now=0.0)
    assert delivery.file_end(5, now=1.0) == [core.Send((status_frame(30),))]


def test_status_is_never_sent_in_plain_mode_or_before_resume():
    plain = streaming(core.PLAIN)
    assert plain.file_end(10, 0.0) == plain.file_end(10, 9.0) == []
    hello = core.DeliveryCore(STREAM, acked=0, max_payload=4096)
    hello.connected(core.ACK)
    assert hello.file_end(10, 0.0) == hello.file_end(10, 9.0) == []


def test_a_new_connection_reports_again_even_an_unchanged_end():
    delivery = streaming()
    delivery.file_end(10, 0.0)
    assert delivery.file_end(10, 1.0) == [core.Send((status_frame(10),))]
    delivery.disconnected()
    delivery.connected(core.ACK)
    delivery.resume(0)
    settle(delivery, delivery.rewound(0, [], delivery.epoch))
    delivery.file_end(10, 2.0)
    assert delivery.file_end(10, 3.0) == [core.Send((status_frame(10),))]


def test_a_listener_that_predates_status_stops_it_for_good(tmp_path):
    """An old listener answers ``S`` with ERROR "unknown message type b'S'" and closes."""
    rig = Rig(tmp_path)
    rig.connect()
    rig.say(b"R 0")
    rig.write(b"one\n")
    rig.take()
    rig.clock.advance(1.0)
    rig.shipper.notify()
    rig.clock.advance(1.0)
    rig.write(b"two\n")
    assert rig.take() == status_frame(4) + data_frame(4, 8, b"two\n") + status_frame(8)
    rig.say(b"E protocol error: unknown message type b'S'")
    assert rig.shipper.core.status_supported is False
    rig.connect()
    rig.say(b"R 8")
    for _ in range(3):
        rig.clock.advance(1.0)
        rig.write(b"more\n")
    frames = OctetCountingDecoder(4096).feed(rig.take())
    assert frames and not [f for f in frames if f.startswith(b"S ")]


def test_the_shell_reports_the_tailers_file_end_including_an_unfinished_line(tmp_path):
    rig = Rig(tmp_path)
    rig.connect()
    rig.say(b"R 0")
    rig.write(b"one\n")
    rig.clock.advance(1.0)
    rig.write(b"two\npart")
    assert rig.take() == data_frame(0, 4, b"one\n") + data_frame(4, 8, b"two\n") + status_frame(12)
