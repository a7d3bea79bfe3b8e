"""Port 6514 under a pre-TLS flood, over real loopback sockets with real certificates.

Ten times the unauthenticated budget, from ten source addresses, half of the
sockets idle and half trickling a ClientHello one byte at a time: an enrolled
worker still connects and gets RESUME while every socket the listener kept is
still held, and the log holds a few lines, not one per connection.
"""

import os
import random
import time

import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.protocol import Protocol
from twisted.logger import LogLevel

from decnet import config, pki
from decnet.listener.protocol import ConnectionLimits
from decnet.listener.service import ListenerService
from decnet.master import enrollment
from decnet.revocation import RevocationSet
from decnet.syslog import ackproto
from decnet.syslog.ackproto import Resume
from decnet.tls import PolicyOptions, TLSIdentity
from tests.listener_support import client_hello
from tests.logpipe_support import MASTER_ONLY, ClientApp, LogCapture

BUDGET = 8
PER_ADDRESS = 4
ADDRESSES = 10
SOCKETS_PER_ADDRESS = 8  # 10 × 8 = 10× the budget; half of each address's over its cap
TRICKLE_EVERY = 0.2


class Crowd:
    """Every hostile socket: how many connected, how many the listener closed."""

    def __init__(self, expected_lost: int):
        self.sockets: list[Hostile] = []
        self.lost = 0
        self.expected_lost = expected_lost
        self.settled: defer.Deferred = defer.Deferred()

    def held(self) -> int:
        return sum(1 for s in self.sockets if s.connected and not s.gone)

    def gone(self) -> None:
        self.lost += 1
        if self.lost == self.expected_lost and not self.settled.called:
            self.settled.callback(None)


class Hostile(Protocol):
    """Connects and then says nothing, or trickles a real ClientHello one byte at a time."""

    def __init__(self, crowd: Crowd, trickle: bytes | None):
        self.crowd = crowd
        self.trickle = trickle
        self.sent = 0
        self.gone = False
        self.loop = None

    def connectionMade(self):
        if self.trickle:
            self.loop = task.LoopingCall(self.drip)
            self.loop.clock = reactor
            self.loop.start(TRICKLE_EVERY)

    def drip(self):
        if self.sent < len(self.trickle) - 1:  # never the last byte: never a full hello
            self.transport.write(self.trickle[self.sent : self.sent + 1])
            self.sent += 1

    def stop(self):
        if self.loop is not None and self.loop.running:
            self.loop.stop()

    def connectionLost(self, reason):
        self.stop()
        self.gone = True
        self.crowd.gone()


class Worker(ClientApp):
    def __init__(self):
        super().__init__()
        self.resumed: defer.Deferred = defer.Deferred()

    def dataReceived(self, data):
        super().dataReceived(data)
        if self.messages and not self.resumed.called:
            self.resumed.callback(self.messages[0])


@pytest_twisted.ensureDeferred
async def test_a_worker_gets_resume_while_ten_times_the_pre_tls_budget_is_held_against_it(
    master_home, tmp_path
):
    name = f"flood-{os.getpid()}-{random.randrange(10**6)}"
    enrollment.enroll(enrollment.load_master(master_home), name, "127.0.0.1", tmp_path / "b")
    identity = TLSIdentity.from_bundle(pki.WorkerBundle.load(tmp_path / "b"), "worker")
    listener = ListenerService(
        reactor,
        identity=TLSIdentity.master(master_home),
        revocations=RevocationSet(master_home.revocations),
        ingest_dir=tmp_path / "ingest",
        listen="tcp:0:interface=127.0.0.1",
        limits=ConnectionLimits(
            max_unauthenticated=BUDGET,
            max_unauthenticated_per_address=PER_ADDRESS,
            # Long, so that what the listener keeps stays held for the whole test.
            handshake_timeout=120,
        ),
        feed=False,
    )
    hello = client_hello(identity)
    total = ADDRESSES * SOCKETS_PER_ADDRESS
    crowd = Crowd(expected_lost=total - BUDGET)
    worker = Worker()
    logs = LogCapture(levels=tuple(LogLevel.iterconstants()))
    with logs:
        listener.startService()
        port = listener.port_service.port.getHost().port
        try:
            connecting = []
            for a in range(ADDRESSES):
                for k in range(SOCKETS_PER_ADDRESS):
                    hostile = Hostile(crowd, hello if k % 2 else None)
                    crowd.sockets.append(hostile)
                    endpoint = TCP4ClientEndpoint(
                        reactor, "127.0.0.1", port, bindAddress=(f"127.0.9.{a + 1}", 0)
                    )
                    connecting.append(connectProtocol(endpoint, hostile))
            await defer.gatherResults(connecting, consumeErrors=True)
            # The listener kept exactly its budget and closed every other socket.
            await crowd.settled.addTimeout(30, reactor)
            assert len(listener.factory.unauthenticated) == BUDGET
            assert crowd.held() == BUDGET

            started = time.monotonic()
            endpoint = wrapClientTLS(
                PolicyOptions(identity, MASTER_ONLY, acceptable_protocols=[config.ACK_ALPN]),
                TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=("127.0.0.1", 0)),
            )
            await connectProtocol(endpoint, worker)
            worker.send(ackproto.encode_hello("decnet"))
            first = await worker.resumed.addTimeout(30, reactor)
            took = time.monotonic() - started
            assert first == Resume(0)
            # RESUME came while the flood still holds the budget: one slot went
            # to the worker's handshake, every other hostile socket is still held.
            assert len(listener.factory.unauthenticated) == BUDGET - 1
            assert crowd.held() >= BUDGET - 1
            print(f"\nworker RESUME {took * 1000:.0f} ms after connecting, under the flood")
            # (What the cleanup below logs is the hostile clients closing themselves.)
            before_cleanup = list(logs.events)
        finally:
            for hostile in crowd.sockets:
                hostile.stop()
                if hostile.transport is not None and not hostile.gone:
                    hostile.transport.abortConnection()
            if worker.transport is not None:
                worker.transport.abortConnection()
            await listener.stopService()
    failures = [e for e in logs.events if "log_failure" in e]
    assert failures == [], "no traceback for an expected refusal"
    # A connection the listener closed before TLS is logged once, by the listener only.
    assert not [e for e in before_cleanup if "TLS handshake with" in e.get("log_format", "")]
    lines = [e for e in logs.events if e.get("log_level") == LogLevel.warn]
    refusals = [e for e in lines if "unauthenticated connection" in e["log_format"]]
    # 73 connections closed before TLS: a handful of lines, then one summary.
    assert listener.factory.refusals.total == total - BUDGET + 1
    assert len(refusals) <= 6
    assert "more unauthenticated connections" in refusals[-1]["log_format"]
