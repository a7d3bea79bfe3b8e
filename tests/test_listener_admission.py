"""Port 6514 before TLS: the unauthenticated budget, the handshake deadline, summarised refusals.

The budget itself is pure (:class:`PreTLSBudget`, :class:`RefusalLog`) and is
tested without sockets; the gate and the protocol are tested over the real
TLS contexts in memory, on a fake clock.  The real-socket flood is in
``test_listener_flood_realsocket.py``.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient

from decnet import config
from decnet.listener.admission import (
    Admit,
    PreTLSBudget,
    RefusalLog,
    Refuse,
    address_key,
)
from decnet.syslog import ackproto
from decnet.syslog.ackproto import Resume
from decnet.tls import PolicyOptions
from tests.listener_support import client_hello
from tests.logpipe_support import MASTER_ONLY, ClientApp, ListenerHarness, LogCapture

# -- the budget, pure ---------------------------------------------------------


def test_one_more_connection_than_the_per_address_cap_is_refused_and_others_still_get_in():
    budget = PreTLSBudget(limit=10, per_address=2)
    budget.add("a1", "198.51.100.1")
    budget.add("a2", "198.51.100.1")
    decision = budget.decide("198.51.100.1")
    assert isinstance(decision, Refuse)
    assert "--max-unauthenticated-per-address" in decision.reason
    assert budget.decide("198.51.100.2") == Admit()
    budget.remove("a1")
    assert budget.decide("198.51.100.1") == Admit()


def test_a_full_budget_evicts_the_oldest_unauthenticated_connection_for_a_new_one():
    budget = PreTLSBudget(limit=3, per_address=3)
    for handle, address in (("h1", "10.0.0.1"), ("h2", "10.0.0.2"), ("h3", "10.0.0.3")):
        budget.add(handle, address)
    assert budget.decide("10.0.0.4") == Admit(evict="h1")
    budget.remove("h1")
    budget.add("h4", "10.0.0.4")
    assert budget.decide("10.0.0.5") == Admit(evict="h2")
    assert len(budget) == 3 and budget.count("10.0.0.1") == 0


def test_a_pending_connection_from_a_worker_address_is_never_evicted_for_a_stranger():
    budget = PreTLSBudget(limit=3, per_address=3)
    budget.worker_seen("192.0.2.10")
    budget.add("worker-again", "192.0.2.10")  # the oldest of all
    budget.add("s1", "10.0.0.1")
    budget.add("s2", "10.0.0.2")
    assert budget.decide("10.0.0.9") == Admit(evict="s1")
    only_workers = PreTLSBudget(limit=2, per_address=2)
    only_workers.worker_seen("192.0.2.10")
    only_workers.add("w-a", "192.0.2.10")
    only_workers.add("w-b", "192.0.2.10")
    decision = only_workers.decide("10.0.0.9")
    assert isinstance(decision, Refuse) and "--max-unauthenticated)" in decision.reason


def test_remembered_worker_addresses_are_bounded_least_recently_seen_forgotten_first():
    budget = PreTLSBudget(limit=4, per_address=4, remembered=2)
    for address in ("192.0.2.1", "192.0.2.2", "192.0.2.1", "192.0.2.3"):
        budget.worker_seen(address)
    assert budget.is_worker_address("192.0.2.1") and budget.is_worker_address("192.0.2.3")
    assert not budget.is_worker_address("192.0.2.2")


def test_an_ipv6_host_is_counted_by_its_slash_64_and_a_mapped_ipv4_as_ipv4():
    assert address_key("2001:db8:1:2::1") == address_key("2001:db8:1:2:ffff::9")
    assert address_key("2001:db8:1:2::1") != address_key("2001:db8:1:3::1")
    assert address_key("::ffff:198.51.100.7") == "198.51.100.7"
    assert address_key(None) == "?"


@settings(max_examples=150, deadline=None)
@given(
    limit=st.integers(1, 6),
    per_address=st.integers(1, 4),
    ops=st.lists(
        st.tuples(st.sampled_from(["connect", "done", "lost", "worker"]), st.integers(0, 5)),
        max_size=60,
    ),
)
def test_whatever_the_schedule_the_budget_and_every_address_stay_within_their_caps(
    limit, per_address, ops
):
    budget = PreTLSBudget(limit=limit, per_address=per_address)
    live: dict[int, str] = {}
    next_handle = 0
    for op, n in ops:
        address = f"10.0.0.{n}"
        if op == "connect":
            decision = budget.decide(address)
            if isinstance(decision, Admit):
                if decision.evict is not None:
                    assert decision.evict in live
                    assert not budget.is_worker_address(live[decision.evict])
                    budget.remove(decision.evict)
                    del live[decision.evict]
                budget.add(next_handle, address)
                live[next_handle] = address
                next_handle += 1
        elif op in ("done", "lost") and live:
            handle = sorted(live)[n % len(live)]
            assert budget.remove(handle)
            assert not budget.remove(handle)
            del live[handle]
        elif op == "worker":
            budget.worker_seen(address)
        assert len(budget) == len(live) <= limit
        for address in set(live.values()):
            assert budget.count(address) == list(live.values()).count(address) <= per_address


# -- the refusal log, pure ----------------------------------------------------


def _warnings(capture):
    return [e for e in capture.events if e["log_level"] == LogLevel.warn]


def test_a_flood_of_refusals_logs_a_few_lines_then_one_summary_per_interval():
    clock = Clock()
    refusals = RefusalLog(clock, burst=5, interval=10.0)
    with LogCapture() as logs:
        for i in range(105):
            refusals.refused("refused", f"10.0.{i % 3}.1", f"10.0.{i % 3}.1:{i}", "over the cap")
        assert len(_warnings(logs)) == 5
        clock.advance(10)
        assert len(_warnings(logs)) == 6
        summary = logs.text().splitlines()[-1]
        assert "Closed 100 more unauthenticated connections in 10s" in summary
        assert "refused: 100" in summary and "from 3 addresses" in summary
        # A quiet spell later, the next refusal is logged in full again.
        clock.advance(60)
        refusals.refused("handshake timeout", "10.9.9.9", "10.9.9.9:1", "too slow")
        assert len(_warnings(logs)) == 7 and "too slow" in logs.text().splitlines()[-1]
    assert refusals.total == 106


def test_a_single_refusal_is_one_line_and_no_summary_follows():
    clock = Clock()
    refusals = RefusalLog(clock)
    with LogCapture() as logs:
        refusals.refused("refused", "10.0.0.1", "10.0.0.1:5", "over the cap")
        clock.advance(3600)
    assert len(logs.events) == 1
    assert logs.text() == "Closing unauthenticated connection from 10.0.0.1:5: over the cap"
    assert clock.getDelayedCalls() == []


# -- the gate and the protocol, in memory ---------------------------------------


class Gated:
    """The listener as ``twistd`` builds it: gate → TLS → protocol, on a fake clock."""

    def __init__(self, tmp_path, master, **factory_kw):
        self.harness = ListenerHarness(tmp_path / "ingest", master, **factory_kw)
        self.clock = self.harness.clock
        self.factory = self.harness.factory
        self.gate = self.factory.outside_tls(self.harness.tls_factory)
        self.gate.doStart()
        self._port = 50000

    def raw(self, host: str):
        """A TCP connection from ``host`` that says nothing: (tls protocol, transport) or None."""
        self._port += 1
        addr = IPv4Address("TCP", host, self._port)
        proto = self.gate.buildProtocol(addr)
        if proto is None:
            return None
        transport = StringTransport(peerAddress=addr)
        proto.makeConnection(transport)
        return proto, transport

    def worker(self, identity, host: str, stream: str = "decnet"):
        """A worker connecting from ``host`` in acknowledged mode and sending HELLO."""
        app = ClientApp()
        options = PolicyOptions(identity, MASTER_ONLY, acceptable_protocols=[config.ACK_ALPN])
        client_factory = TLSMemoryBIOFactory(
            options, True, Factory.forProtocol(lambda: app), clock=self.clock
        )
        self._port += 1
        addr = IPv4Address("TCP", host, self._port)
        _client, _server, pump = connectedServerAndClient(
            lambda: self.gate.buildProtocol(addr),
            lambda: client_factory.buildProtocol(None),
            greet=False,
            clock=self.clock,
        )
        pump.flush()
        app.send(ackproto.encode_hello(stream))
        pump.flush()
        return app, pump


@pytest.fixture(scope="module")
def ids(ca, tmp_path_factory):
    from tests.support import write_identity

    d = tmp_path_factory.mktemp("admission-ids")
    return {
        "master": write_identity(d / "m", ca, "master"),
        "w1": write_identity(d / "w1", ca, "worker", "w1"),
        "w2": write_identity(d / "w2", ca, "worker", "w2"),
        "w3": write_identity(d / "w3", ca, "worker", "w3"),
    }


def test_a_trickled_handshake_is_aborted_at_the_deadline_counted_from_connect_not_per_byte(
    tmp_path, ids
):
    gated = Gated(tmp_path, ids["master"])
    proto, transport = gated.raw("203.0.113.5")
    hello = client_hello(ids["w1"])
    with LogCapture() as logs:
        for i in range(4):  # one byte every 2 s: never idle for long
            proto.dataReceived(hello[i : i + 1])
            gated.clock.advance(2)
        assert not transport.disconnecting
        proto.dataReceived(hello[4:5])
        gated.clock.advance(2)  # 10 s after the connection was made
        assert transport.disconnected, "aborted at once, no close grace"
        assert len(gated.factory.unauthenticated) == 0
        proto.connectionLost(Failure(ConnectionLost()))
    assert [e["log_level"] for e in logs.events] == [LogLevel.warn]
    assert "no TLS handshake within 10s (--handshake-timeout)" in logs.text()
    assert "203.0.113.5" in logs.text()
    assert gated.factory.connections == set()


def test_a_connection_over_the_per_address_cap_is_closed_before_tls_with_one_line(tmp_path, ids):
    gated = Gated(tmp_path, ids["master"], max_unauthenticated_per_address=2)
    held = [gated.raw("203.0.113.7") for _ in range(2)]
    built = len(gated.factory.connections)
    with LogCapture(levels=tuple(LogLevel.iterconstants())) as logs:
        assert gated.raw("203.0.113.7") is None
    # No protocol (TLS or ours) was built for it: nothing to fail, no traceback.
    assert len(gated.factory.connections) == built
    assert len(logs.events) == 1 and logs.events[0]["log_level"] == LogLevel.warn
    assert "--max-unauthenticated-per-address" in logs.text()
    assert all(not t.disconnecting for _, t in held)
    assert gated.raw("203.0.113.8") is not None


def test_a_worker_gets_resume_while_the_unauthenticated_budget_is_held_full(tmp_path, ids):
    gated = Gated(tmp_path, ids["master"], max_unauthenticated=4, max_unauthenticated_per_address=4)
    hostile = [gated.raw(f"203.0.113.{i}") for i in range(1, 41)]  # 10× the budget
    held = [(p, t) for p, t in hostile if not t.disconnected]
    assert len(held) == 4 and len(gated.factory.unauthenticated) == 4
    app, _pump = gated.worker(ids["w1"], "192.0.2.10")
    assert app.messages == [Resume(0)]
    # It took the oldest hostile slot; the three others are still held.
    assert sum(not t.disconnected for _, t in held) == 3
    assert len(gated.factory.unauthenticated) == 3
    assert len(gated.factory.authenticated) == 1


def test_a_pending_connection_from_a_workers_address_outlives_strangers(tmp_path, ids):
    gated = Gated(tmp_path, ids["master"], max_unauthenticated=3, max_unauthenticated_per_address=3)
    app, _pump = gated.worker(ids["w1"], "192.0.2.10")
    assert app.messages == [Resume(0)]
    worker_pending, worker_transport = gated.raw("192.0.2.10")  # e.g. its second stream
    strangers = [gated.raw(f"203.0.113.{i}") for i in range(1, 20)]
    assert not worker_transport.disconnected
    assert worker_pending.wrappedProtocol in gated.factory.unauthenticated
    assert sum(not t.disconnected for _, t in strangers) == 2


def test_max_connections_counts_authenticated_connections_and_refuses_after_the_handshake(
    tmp_path, ids
):
    gated = Gated(tmp_path, ids["master"], max_connections=2)
    strangers = [gated.raw(f"203.0.113.{i}") for i in range(1, 6)]
    a, _ = gated.worker(ids["w1"], "192.0.2.11")
    b, _ = gated.worker(ids["w2"], "192.0.2.12")
    assert a.messages == [Resume(0)] and b.messages == [Resume(0)]
    assert all(not t.disconnected for _, t in strangers)
    with LogCapture(levels=tuple(LogLevel.iterconstants())) as logs:
        c, pump = gated.worker(ids["w3"], "192.0.2.13")
        pump.flush()
    assert c.messages == [] and c.lost_reason is not None
    refusals = [e for e in logs.events if e["log_level"] in (LogLevel.warn, LogLevel.error)]
    assert len(refusals) == 1
    assert "2 authenticated connections open (--max-connections)" in logs.text()
