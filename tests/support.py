"""Helpers shared by the tests: minting identities on disk, TLS plumbing, polling."""

from __future__ import annotations

import datetime
import os
import sys
import time
from pathlib import Path

from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import connectedServerAndClient
from zope.interface import implementer

from decnet import config, pki
from decnet.tls import PolicyOptions, TLSIdentity, TLSServerFactory

BIN = Path(sys.executable).parent


def write_identity(
    directory: Path,
    ca: pki.CertificateAuthority,
    role: str,
    name: str | None = None,
    *,
    trust: pki.CertificateAuthority | None = None,
    **issue_kw,
) -> TLSIdentity:
    """Issue a leaf, write cert/key/CA files into ``directory`` and load it for TLS.

    ``trust`` is the CA this identity trusts (defaults to its issuer).
    """
    directory.mkdir(parents=True, exist_ok=True)
    leaf = pki.issue_leaf(ca, role, name, **issue_kw)
    stem = directory / (name or role)
    cert_path, key_path = stem.with_suffix(".crt"), stem.with_suffix(".key")
    ca_path = directory / "ca.crt"
    cert_path.write_bytes(pki.cert_pem(leaf.cert))
    key_path.write_bytes(pki.key_pem(leaf.key))
    os.chmod(key_path, 0o600)
    ca_path.write_bytes(pki.cert_pem((trust or ca).cert))
    return TLSIdentity.load(cert_path, key_path, ca_path)


def expired_kw() -> dict:
    """issue_leaf() arguments for a certificate that expired a year ago."""
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=400)
    return {"not_before": start, "validity_days": 30}


@implementer(IHandshakeListener)
class RecordingProtocol(Protocol):
    """Records handshake completion, received bytes and the loss reason."""

    def __init__(self):
        self.handshake_done = False
        self.received = b""
        self.lost_reason = None

    def handshakeCompleted(self):
        self.handshake_done = True

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.lost_reason = reason


def tls_pair(server_identity, server_policy, client_identity, client_policy, *, alpn=None):
    """Run a TLS handshake in memory; return (client_app, server_app, pump)."""
    server_options = PolicyOptions(server_identity, server_policy, acceptable_protocols=alpn)
    client_options = PolicyOptions(client_identity, client_policy, acceptable_protocols=alpn)
    return tls_pair_with(server_options, client_options)


def tls_pair_with(server_options, client_options):
    """Like :func:`tls_pair` with ready-made options (or any context factory)."""
    clock = Clock()
    server_app, client_app = RecordingProtocol(), RecordingProtocol()
    server_factory = TLSServerFactory(
        server_options, Factory.forProtocol(lambda: server_app), clock=clock
    )
    client_factory = TLSMemoryBIOFactory(
        client_options, True, Factory.forProtocol(lambda: client_app), clock=clock
    )
    _client, _server, pump = connectedServerAndClient(
        lambda: server_factory.buildProtocol(None),
        lambda: client_factory.buildProtocol(None),
        greet=False,
        clock=clock,
    )
    pump.flush()
    client_app.transport.write(b"ping")
    pump.flush()
    return client_app, server_app, pump


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until truthy (for subprocess tests only); returns its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def master_paths(tmp_path: Path) -> config.MasterPaths:
    return config.MasterPaths.resolve(tmp_path / "home")


# ---------------------------------------------------------------------------
# Agent and decoy tests


class FrozenClock:
    """A clock whose ``seconds()`` is fixed (exact event lines) but whose timers are real."""

    def __init__(self, reactor, now: float = 1767323045.25):
        self._reactor = reactor
        self.now = now

    def seconds(self) -> float:
        return self.now

    def callLater(self, delay, fn, *args, **kw):
        return self._reactor.callLater(delay, fn, *args, **kw)


def counter_ids(prefix: str = "s"):
    """Deterministic decoy session ids: s1, s2, …"""
    import itertools

    numbers = itertools.count(1)
    return lambda: f"{prefix}{next(numbers)}"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind 0, read, close)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class RawClient(Protocol):
    """A scripted TCP client for decoy tests: send bytes, await expected output, await close."""

    def __init__(self):
        from twisted.internet import defer

        self._defer = defer
        self.received = b""
        self.sent = 0
        self.closed = defer.Deferred()
        self._waiting: list = []

    def dataReceived(self, data):
        self.received += data
        self._check()

    def connectionLost(self, reason):
        waiting, self._waiting = self._waiting, []
        for needle, d in waiting:
            d.errback(AssertionError(f"closed before {needle!r}; got {self.received!r}"))
        self.closed.callback(self.received)

    def _check(self):
        # Firing a waiter may resume the test, which may add waiters: take the
        # ready ones out first.
        ready = [(n, d) for n, d in self._waiting if n in self.received]
        self._waiting = [(n, d) for n, d in self._waiting if n not in self.received]
        for _needle, d in ready:
            d.callback(self.received)

    def expect(self, needle: bytes, timeout: float = 10.0):
        """Fires with everything received once ``needle`` has been received."""
        from twisted.internet import reactor

        d = self._defer.Deferred()
        self._waiting.append((needle, d))
        self._check()
        return d.addTimeout(timeout, reactor)

    def send(self, data: bytes) -> None:
        self.sent += len(data)
        self.transport.write(data)

    def connectionMade(self):
        self.port = self.transport.getHost().port

    def local_port(self) -> int:
        return self.port


async def raw_connect(port: int, host: str = "127.0.0.1") -> RawClient:
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    return await connectProtocol(TCP4ClientEndpoint(reactor, host, port), RawClient())
