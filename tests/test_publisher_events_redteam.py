"""Red team of the events' logical keys and the wait at a move (decnet.listener.publisher).

The publisher's events loop is driven in-process against a small in-memory JetStream
(compare-and-set on a subject's last sequence, deduplication by ``Nats-Msg-Id``), so
the scenarios below need no broker and no clock: ``time.monotonic`` is a variable.
"""

import asyncio
from types import SimpleNamespace

import pytest

from decnet.listener import publisher, storage
from decnet.listener import publishing as pub
from tests.nats_support import IngestWriter, logical_lines, syslog_line


def _lines(n: int, start: int = 0) -> bytes:
    return b"".join(syslog_line(i) for i in range(start, start + n))


class FakeBroker:
    """One JetStream stream in memory: per-subject compare-and-set, Msg-Id dedup."""

    def __init__(self, directory, max_msg: int = pub.DEFAULT_MAX_MSG):
        self.directory = directory
        self.events = True
        self.max_msg = max_msg  # (the stream's max_msg_size: headers and payload)
        self.payload_limit = max_msg - pub.HEADER_ROOM
        self.said: list[dict] = []
        self.reporter = SimpleNamespace(send=self.said.append)
        self.messages: list[tuple[int, str, dict[str, str], bytes]] = []
        self.ids: dict[str, int] = {}

    async def last_message(self, subject):
        for seq, subj, headers, _ in reversed(self.messages):
            if subj == subject:
                return seq, headers
        return 0, None

    def _store(self, subject, payload, headers):
        if len(payload) + sum(len(k) + len(v) + 4 for k, v in headers.items()) > self.max_msg:
            # (what JetStream answers: err_code 10054, as publisher._outcome reads it)
            return pub.Failure(False, "JetStream refused: message size exceeds maximum allowed")
        expected = headers.get(pub.H_EXPECTED_SEQ)
        if expected is not None:
            last = next((s for s, subj, _, _ in reversed(self.messages) if subj == subject), 0)
            if int(expected) != last:
                return None
        msg_id = headers[pub.H_MSG_ID]
        if msg_id in self.ids:
            return self.ids[msg_id]
        seq = len(self.messages) + 1
        self.messages.append((seq, subject, dict(headers), payload))
        self.ids[msg_id] = seq
        return seq

    async def publish(self, subject, payload, headers):
        outcome = self._store(subject, payload, headers)
        if isinstance(outcome, pub.Failure):
            raise pub.PublishError(outcome.text)
        return outcome

    async def publish_window(self, subject, items):
        return [self._store(subject, payload, headers) for payload, headers in items]

    def fenced(self, subject):
        self.said.append({"fenced": subject})

    def events_of(self, worker="w1", stream="auth"):
        subject = pub.events_subject(worker, stream)
        return [
            (int(h[pub.H_OFFSET]), int(h[pub.H_END]))
            for _, s, h, _ in self.messages
            if s == subject
        ]


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(publisher.time, "monotonic", lambda: now[0])
    return now


def _rounds(job, clock, rounds=20, step=1.0):
    """Events rounds as the loop runs them (an error forgets the position), the clock
    moving ``step`` seconds per round."""

    async def run():
        for _ in range(rounds):
            try:
                await job.publish_events()
            except pub.PublishError as exc:
                job._forget_events()
                job._warn(str(exc))
            clock[0] += step

    asyncio.run(run())


def test_a_gap_just_before_a_move_does_not_stall_the_events_for_ever(tmp_path, clock):
    """The worker lost bytes (a gap) on this listener, left, and came back later: the
    index holds a gap record and then a moved record with no commit between.  The raw
    side publishes the gap and then waits at the move; the events have no message for
    the gap, so they must wait at the move as well, then go on with the new lines."""
    writer = IngestWriter(tmp_path)
    a, c = _lines(3), _lines(2, 3)
    writer.commit(a)
    gap_end = writer.offset + 400
    writer.files.commit(b"", [storage.IndexRecord(writer.mirror, gap_end, 1)])
    moved_at = gap_end + 900
    writer.files.commit(b"", [storage.IndexRecord(writer.mirror, moved_at, 1, moved=True)])
    writer.offset = moved_at
    writer.commit(c)
    writer.build_feed()
    broker = FakeBroker(tmp_path)
    job = publisher.StreamJob(broker, "w1", "auth")
    # Nobody else publishes the events of [gap_end, moved_at): after MOVE_EVENTS_WAIT
    # this listener goes on with its own lines, and says so.
    _rounds(job, clock, rounds=int(publisher.MOVE_EVENTS_WAIT) + 10)
    writer.close()
    assert broker.events_of() == logical_lines([(0, a), (moved_at, c)])
    assert any("did not reach the broker" in m.get("warn", "") for m in broker.said)


@pytest.mark.parametrize("value", ["9" * 5000, "\u00b2"])
def test_a_garbage_decnet_end_on_the_last_event_is_a_publish_error_not_a_crash(tmp_path, value):
    """A lying broker (or any other writer of the subject): the events loop retries on a
    PublishError and says why; any other exception ends the stream's job for good (its
    events are never published again, whatever the broker holds later)."""
    writer = IngestWriter(tmp_path)
    writer.commit(_lines(3))
    writer.build_feed()
    broker = FakeBroker(tmp_path)
    headers = {pub.H_OFFSET: "0", pub.H_END: value, pub.H_MSG_ID: "ev/w1/auth/0"}
    broker._store(pub.events_subject("w1", "auth"), b"{}", headers)
    job = publisher.StreamJob(broker, "w1", "auth")
    with pytest.raises(pub.PublishError, match="Decnet-End"):
        asyncio.run(job.publish_events())
    writer.close()


def test_an_event_larger_than_the_message_limit_does_not_stall_the_events_after_it(tmp_path):
    """A line's feed entry is larger than the line (JSON escapes: up to 6 bytes per byte,
    plus the parsed fields), and --nats-max-msg need only exceed --max-frame by 1 KiB:
    an attacker who writes one long line full of quotes into a decoy's log must not
    stop every later event of the stream.  That one event is left out (its line is in
    the raw subject) and said so; the others go on."""
    writer = IngestWriter(tmp_path)
    before, after = _lines(2), _lines(3, 3)
    long_line = b"<34>1 2026-11-30T12:00:00Z host app - - - " + b'"' * 2000 + b"\n"
    writer.commit(before)
    writer.commit(long_line)
    writer.commit(after)
    writer.build_feed()
    broker = FakeBroker(tmp_path, max_msg=len(long_line) + pub.HEADER_ROOM)
    job = publisher.StreamJob(broker, "w1", "auth")
    _rounds(job, [0.0], rounds=5)
    later = _lines(2, 6)  # (a later window: after the refusal, not in the same window)
    writer.commit(later)
    writer.build_feed()
    _rounds(job, [0.0], rounds=5)
    writer.close()
    skipped = len(before), len(before) + len(long_line)
    everything = logical_lines([(0, before + long_line + after + later)])
    assert broker.events_of() == [span for span in everything if span != skipped]
    assert any(f"at offset {skipped[0]}" in m.get("warn", "") for m in broker.said)


def test_a_feed_entry_longer_than_one_read_is_published_not_waited_for_silently(
    tmp_path, monkeypatch
):
    """The events read EVENTS_READ_LIMIT feed bytes at a time; an entry longer than that
    (--max-frame is configurable, and an entry takes up to 6 bytes per byte of its line)
    had no LF in the read, so the round found nothing to do, for ever, and said nothing."""
    monkeypatch.setattr(publisher, "EVENTS_READ_LIMIT", 1024)
    writer = IngestWriter(tmp_path)
    long_line = b"<34>1 2026-11-30T12:00:00Z host app - - - " + b"x" * 1500 + b"\n"
    data = _lines(2) + long_line + _lines(2, 3)
    writer.commit(data)
    writer.build_feed()
    broker = FakeBroker(tmp_path)
    job = publisher.StreamJob(broker, "w1", "auth")
    _rounds(job, [0.0], rounds=5)
    writer.close()
    assert broker.events_of() == logical_lines([(0, data)])


def test_an_unexpected_error_in_a_round_is_said_and_retried_not_the_end_of_the_stream(
    tmp_path, monkeypatch
):
    """An error no round expects (a disk read failing with EIO, a bug): the stream's job
    says it and tries again; before, the job ended with a single 'a stream job died' and
    the stream was never published again (in broker mode: never acknowledged again)."""
    monkeypatch.setattr(publisher, "RETRY_MAX", 0.0)
    broker = FakeBroker(tmp_path)
    broker.closing = False
    job = publisher.StreamJob(broker, "w1", "auth")
    calls = []

    async def step():
        calls.append(len(calls))
        if len(calls) == 1:
            raise OSError(5, "Input/output error")
        broker.closing = True
        return True

    asyncio.run(job._loop(step, asyncio.Event(), job._forget_raw, asyncio.Semaphore(1)))
    assert calls == [0, 1]
    assert any("Input/output error" in m.get("warn", "") for m in broker.said)
    assert job.cursor is None  # (the position is read from the broker again)
