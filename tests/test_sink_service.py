"""The sink's reactor side on a fake clock: ack only after the commit, retry with backoff."""

from __future__ import annotations

import base64

import pytest
from twisted.internet import task
from twisted.logger import globalLogPublisher

from decnet.listener.publisherproc import NatsOptions
from decnet.sink.rows import Message
from decnet.sink.service import SinkOptions, SinkService, decode_batch
from decnet.sink.store import SchemaMismatch, StoreUnavailable
from decnet.threads import inline_runner


class FlakyStore:
    """A store whose first ``failures`` writes fail as PostgreSQL being down."""

    def __init__(self, failures: int, error: Exception | None = None):
        self.failures = failures
        self.error = error or StoreUnavailable("connection refused")
        self.written: list[list[Message]] = []

    def write(self, messages):
        if self.failures:
            self.failures -= 1
            raise self.error
        self.written.append(messages)
        return len(messages), 0, []

    def close(self):
        pass


def _report(token: str, count: int = 2) -> dict:
    data = base64.b64encode(b"{}").decode()
    one = {"subject": "decnet.events.w1.s", "headers": {}, "data": data, "stream": "DECNET"}
    return {"batch": token, "messages": [{**one, "seq": i + 1} for i in range(count)]}


@pytest.fixture
def logged():
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def _sink(store) -> tuple[SinkService, task.Clock, list[dict]]:
    clock = task.Clock()
    options = SinkOptions(nats=NatsOptions(servers=("nats://127.0.0.1:4222",)), dsn="dbname=x")
    sink = SinkService(None, clock, options, inline_runner, store=store)  # type: ignore[arg-type]
    sink.running = True
    sent: list[dict] = []
    sink.send = sent.append  # type: ignore[method-assign]
    return sink, clock, sent


def test_postgres_down_retries_the_same_batch_with_backoff_and_acks_only_after_the_commit(logged):
    store = FlakyStore(failures=3)
    sink, clock, sent = _sink(store)
    sink.report(_report("a-1"))
    assert sent == [] and store.written == []
    for delay in (0.5, 1.0):
        clock.advance(delay)
        assert sent == []
    clock.advance(2.0)
    assert sent == [{"ack": "a-1"}] and len(store.written) == 1
    texts = [e.get("log_format", "") for e in logged]
    assert sum("PostgreSQL unavailable" in t for t in texts) == 1
    assert sum("reachable again" in t for t in texts) == 1
    assert sink.counts.store_failures == 3 and sink.counts.stored == 2


def test_a_batch_of_a_consumer_that_was_replaced_is_written_but_never_acked():
    store = FlakyStore(failures=1)
    sink, clock, sent = _sink(store)
    sink.report(_report("old-1"))
    sink.report(_report("new-1"))  # a restarted consumer: its own batch
    assert sent == [{"ack": "new-1"}]
    clock.advance(10)
    assert sent == [{"ack": "new-1"}]  # old-1 is not retried, nor acknowledged


def test_a_wrong_schema_found_at_run_time_stops_the_daemon_with_its_reason():
    store = FlakyStore(failures=1, error=SchemaMismatch("decnet_events.entry is jsonb, not text"))
    sink, _clock, sent = _sink(store)
    stopped: list[str] = []
    sink.fatal = stopped.append
    sink.report(_report("a-1"))
    assert stopped == ["decnet_events.entry is jsonb, not text"] and sent == []


@pytest.mark.parametrize(
    "report",
    [
        {"batch": "t"},
        {"batch": "t", "messages": [{"subject": "s"}]},
        {"batch": "t", "messages": [{**_report("t")["messages"][0], "data": "!!!"}]},
        {"batch": "t", "messages": [{**_report("t")["messages"][0], "seq": "x"}]},
    ],
)
def test_a_malformed_batch_report_is_a_value_error(report):
    with pytest.raises(ValueError, match="malformed batch"):
        decode_batch(report)


def test_a_durable_consumer_with_another_filter_is_refused_and_other_timing_only_noted():
    from decnet.sink.consumer import consumer_differences

    ours = {
        "filter_subject": "decnet.events.>",
        "ack_policy": "explicit",
        "deliver_policy": "all",
        "ack_wait": 30_000_000_000,
        "max_ack_pending": 1024,
    }
    assert consumer_differences(dict(ours), ours) == ([], [])
    refused, noted = consumer_differences({**ours, "filter_subject": "decnet.>"}, ours)
    assert refused == ["filter_subject 'decnet.>', not 'decnet.events.>'"] and noted == []
    refused, noted = consumer_differences({**ours, "ack_wait": 2_000_000_000}, ours)
    assert refused == [] and noted == [
        "ack_wait stays 2s (not 30s): JetStream keeps an existing consumer's settings"
    ]


def test_a_fatal_report_of_the_consumer_stops_the_sink_with_its_reason():
    sink, _clock, _sent = _sink(FlakyStore(failures=0))
    stopped: list[str] = []
    sink.fatal = stopped.append
    sink.report({"fatal": "the durable consumer decnet-sink exists with filter_subject ..."})
    assert stopped == ["the durable consumer decnet-sink exists with filter_subject ..."]
