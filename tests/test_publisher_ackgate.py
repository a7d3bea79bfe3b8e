"""Broker mode in the listener (in memory): ACK and RESUME follow JetStream's confirmed marks.

The publisher process's reports enter through :meth:`PublisherProcess.report`,
the very method its pipe feeds; no process runs here.
"""

import pytest
from twisted.internet.testing import MemoryReactor
from twisted.logger import LogLevel
from twisted.python import usage

from decnet.listener import tap
from decnet.listener.publisherproc import BrokerMarks, NatsOptions, PublisherProcess
from decnet.syslog import ackproto
from decnet.syslog.ackproto import Ack, Resume
from tests.logpipe_support import ListenerHarness, LogCapture, syslog_line
from tests.support import write_identity


@pytest.fixture(scope="module")
def ids(ca, tmp_path_factory):
    d = tmp_path_factory.mktemp("gateids")
    return {
        "master": write_identity(d / "m", ca, "master"),
        "w1": write_identity(d / "w1", ca, "worker", "w1"),
    }


@pytest.fixture
def broker_mode(tmp_path, ids):
    """A listener in broker mode and the publisher process object that feeds its marks."""
    harness = ListenerHarness(tmp_path / "ingest", ids["master"])
    publisher = PublisherProcess(
        MemoryReactor(), tmp_path / "ingest", NatsOptions(("nats://127.0.0.1:4222",))
    )
    harness.ingest.publisher = publisher
    harness.factory.broker = publisher.marks
    return harness, publisher


def payload(n: int, start: int = 0) -> bytes:
    return b"".join(syslog_line(i) + b"\n" for i in range(start, start + n))


def test_resume_waits_for_the_brokers_mark_and_acks_only_what_jetstream_confirmed(broker_mode, ids):
    harness, publisher = broker_mode
    app, pump = harness.hello(ids["w1"])
    assert app.messages == []  # no mark from the broker yet
    publisher.report({"worker": "w1", "stream": "decnet", "confirmed": 0})
    pump.flush()
    assert app.messages == [Resume(0)]
    data = payload(5)
    app.send(ackproto.encode_data(0, len(data), data))
    pump.flush()
    assert harness.mirror("w1", "decnet") == data  # durable here...
    assert app.messages == [Resume(0)]  # ... but not acknowledged
    assert ("w1", "decnet") in publisher._known  # and the publisher was told
    publisher.report({"worker": "w1", "stream": "decnet", "confirmed": len(data)})
    pump.flush()
    assert app.messages == [Resume(0), Ack(len(data))]


def test_a_reconnect_while_the_broker_lags_is_resumed_only_once_it_caught_up(broker_mode, ids):
    harness, publisher = broker_mode
    publisher.report({"worker": "w1", "stream": "decnet", "confirmed": 0})
    app, pump = harness.hello(ids["w1"])
    data = payload(4)
    app.send(ackproto.encode_data(0, len(data), data))
    pump.flush()
    app.transport.loseConnection()
    pump.flush()
    again, pump2 = harness.hello(ids["w1"])
    assert again.messages == []  # the mirror holds more than the broker
    publisher.report({"worker": "w1", "stream": "decnet", "confirmed": len(data) // 2})
    pump2.flush()
    assert again.messages == []
    publisher.report({"worker": "w1", "stream": "decnet", "confirmed": len(data)})
    pump2.flush()
    # The mark it named is not acknowledged again (the forwarder is still rewinding).
    assert again.messages == [Resume(len(data))]


def test_a_connection_that_goes_away_while_its_resume_is_held_leaves_nothing_behind(
    broker_mode, ids
):
    harness, publisher = broker_mode
    with LogCapture() as logs:
        app, pump = harness.hello(ids["w1"])
        app.transport.loseConnection()
        pump.flush()
        publisher.report({"worker": "w1", "stream": "decnet", "confirmed": 0})
    assert logs.reasons() == []
    assert publisher.marks._waiters[("w1", "decnet")] == []
    fresh, pump = harness.hello(ids["w1"])
    assert fresh.messages == [Resume(0)]


def test_an_outage_is_logged_once_and_its_end_once(broker_mode):
    _, publisher = broker_mode
    with LogCapture(levels=(LogLevel.info, LogLevel.warn, LogLevel.error)) as logs:
        publisher.report({"broker": "up"})
        for _ in range(5):
            publisher.report({"broker": "down", "error": "nats: timeout"})
        for _ in range(3):
            publisher.report({"broker": "up"})
    text = logs.text()
    assert text.count("JetStream broker down") == 1 and "nats: timeout" in text
    assert text.count("reachable again") == 1


def test_a_malformed_report_from_the_publisher_is_ignored_and_said(broker_mode):
    _, publisher = broker_mode
    with LogCapture() as logs:
        publisher.report({"worker": "w1", "stream": "decnet", "confirmed": "lots"})
        publisher.report({"worker": "w1", "confirmed": 5})
    assert publisher.marks.marks == {}
    assert logs.text().count("malformed report") == 2


def test_marks_only_move_forward_and_waiters_fire_in_order():
    marks = BrokerMarks()
    heard: list[int] = []
    marks.listen("w", "s", heard.append)
    first, second = marks.when_reaches("w", "s", 10), marks.when_reaches("w", "s", 20)
    marks.confirmed("w", "s", 15)
    marks.confirmed("w", "s", 12)  # stale: ignored
    assert first.result == 15 and not second.called
    marks.confirmed("w", "s", 20)
    assert second.result == 20 and heard == [15, 20]
    marks.unlisten("w", "s", heard.append)
    marks.confirmed("w", "s", 30)
    assert heard == [15, 20] and marks.mark("w", "s") == 30


# -- the options ------------------------------------------------------------------------


def parse(master_home, *argv):
    options = tap.Options()
    options.parseOptions(["--home", str(master_home.home), *argv])
    return options


def test_ack_after_follows_publish_by_default(master_home):
    assert parse(master_home)["ack-after"] == "local"
    on = parse(master_home, "--publish", "nats://10.0.0.5:4222,tls://nats.example:4443")
    assert on["ack-after"] == "broker"
    assert on["publish-options"].servers == ("nats://10.0.0.5:4222", "tls://nats.example:4443")
    local = parse(master_home, "--publish", "nats://10.0.0.5:4222", "--ack-after", "local")
    assert local["ack-after"] == "local"


@pytest.mark.parametrize(
    "argv, why",
    [
        (["--ack-after", "broker"], "needs --publish"),
        (["--publish", "nats://h:1", "--ack-after", "later"], "'local' or 'broker'"),
        (["--publish", "10.0.0.5:4222"], "not nats://HOST:PORT"),
        (["--publish", "nats://h:1", "--nats-tls-cert", __file__], "go together"),
        (["--publish", "nats://h:1", "--nats-creds", "/nonexistent.creds"], "no such file"),
        (["--nats-creds", "/x.creds"], "needs --publish"),
        (["--publish", "nats://h:1", "--nats-stream", "a.b"], "--nats-stream"),
        (["--publish", "nats://h:1", "--nats-replicas", "7"], "1 to 5"),
        (["--publish", "nats://h:1", "--nats-max-msg", "4096"], "at least --max-frame"),
    ],
)
def test_an_operator_typo_in_the_nats_options_is_refused_with_what_to_do(master_home, argv, why):
    with pytest.raises(usage.UsageError, match=why):
        parse(master_home, *argv)


def test_help_shows_the_publishing_options_and_an_example():
    from tests.test_listener_tap import listener_help

    out = listener_help()
    flat = " ".join(out.split())
    for option in (
        "--publish=",
        "--nats-creds=",
        "--nats-tls-ca=",
        "--nats-stream=",
        "--ack-after=",
    ):
        assert option in out
    assert "[default: DECNET]" in flat and "[default: 1048576]" in flat
    assert "Example: twistd -n decnet-" in flat and "--publish nats://10.0.0.5:4222," in flat
