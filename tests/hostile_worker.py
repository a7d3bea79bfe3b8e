"""A compromised worker for tests: its real enrolled certificates, and scripted replies.

:class:`FakeWorker` serves an agent and an updater over real mutual TLS on
loopback (the worker and updater keys of an enrolled bundle, the master pinned
as the only client), so the master's clients and ``decnet-admin`` see exactly
what a compromised host would send: lies, redirects, stalls, escape sequences.
"""

from __future__ import annotations

import json
import shutil

import attrs
from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.web import resource, server

from decnet import config, pki
from decnet.master import enrollment
from decnet.tls import Accept, PeerPolicy, PolicyOptions, TLSIdentity, listen_tls

# The escape sequences of the issue, a C1 CSI, DEL, a NUL, a line break, bidi
# overrides and isolates: none of them may reach the operator's terminal raw.
EVIL = "\x1b]0;PWNED\x07\x1b[2J\x9b31m\x7f\x00\r\nfake line\u202etxt.exe\u2066\u200f\u061c"


@attrs.define
class Reply:
    """What one route answers.  ``stall``: the headers and the first byte of the body, then
    nothing; ``hang``: not even the headers."""

    body: object = attrs.field(factory=dict)
    code: int = 200
    headers: dict = attrs.field(factory=dict)
    stall: bool = False
    hang: bool = False

    def encoded(self) -> bytes:
        return self.body if isinstance(self.body, bytes) else json.dumps(self.body).encode()


class _Daemon(resource.Resource):
    isLeaf = True

    def __init__(self, owner: FakeWorker, name: str):
        super().__init__()
        self.owner = owner
        self.name = name

    def render(self, request):
        path = request.path.decode("ascii", "replace").strip("/")
        method = request.method.decode("ascii")
        self.owner.requests.append((self.name, method, path))
        reply = self.owner.routes.get((self.name, path)) or Reply(
            {"problems": ["no such route"]}, 404
        )
        if reply.hang:
            self.owner.stall(request)
            return server.NOT_DONE_YET
        body = reply.encoded()
        request.setResponseCode(reply.code)
        request.setHeader(b"content-type", b"application/json")
        for name, value in reply.headers.items():
            request.setHeader(name.encode(), value.encode())
        if reply.stall:
            request.setHeader(b"content-length", str(len(body)).encode())
            request.write(body[:1])
            self.owner.stall(request)
            return server.NOT_DONE_YET
        return body


class FakeWorker:
    """An enrolled host's agent and updater, answering from :attr:`routes`.

    ``routes`` maps ``("agent" | "updater", path)`` to a :class:`Reply`.
    """

    def __init__(self, bundle_dir, routes: dict | None = None):
        self.bundle = pki.WorkerBundle.load(bundle_dir)
        self.routes: dict = dict(routes or {})
        self.requests: list[tuple[str, str, str]] = []
        self.stalled: list = []
        self.ports: list = []
        self._stall_waiters: list[defer.Deferred] = []

    def stall(self, request) -> None:
        self.stalled.append(request)
        waiters, self._stall_waiters = self._stall_waiters, []
        for d in waiters:
            d.callback(request)

    def next_stall(self) -> defer.Deferred:
        """Fires with the next request this worker leaves hanging."""
        d: defer.Deferred = defer.Deferred()
        self._stall_waiters.append(d)
        return d

    async def start(self, reactor, agent_port: int = 0, updater_port: int = 0) -> FakeWorker:
        master = Accept(config.ROLE_MASTER, fingerprint=self.bundle.master_fingerprint)
        for name, role, port in (
            ("agent", config.ROLE_WORKER, agent_port),
            ("updater", config.ROLE_UPDATER, updater_port),
        ):
            if role == config.ROLE_UPDATER and not self.bundle.has_updater:
                continue
            identity = TLSIdentity.from_bundle(self.bundle, role)
            site = server.Site(_Daemon(self, name))
            options = PolicyOptions(identity, PeerPolicy([master]))
            self.ports.append(
                await listen_tls(reactor, f"tcp:{port}:interface=127.0.0.1", options, site)
            )
        return self

    @property
    def agent_port(self) -> int:
        return self.ports[0].getHost().port

    @property
    def updater_port(self) -> int:
        return self.ports[1].getHost().port

    async def stop(self) -> None:
        for request in self.stalled:
            channel = getattr(request, "channel", None)  # gone once the connection is
            if channel is not None and channel.transport is not None:
                channel.transport.abortConnection()
        await defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in self.ports])


class _Silent(Protocol):
    """Accepts a TCP connection and says nothing (a worker stuck before the TLS handshake)."""

    def connectionMade(self):
        self.factory.connected.append(self)
        self.lost = defer.Deferred()

    def connectionLost(self, reason):
        self.lost.callback(None)


def silent_factory() -> Factory:
    factory = Factory.forProtocol(_Silent)
    factory.connected = []
    return factory


def fresh_master(master_home, target) -> enrollment.MasterState:
    """A copy of the session's master (its CA: no new RSA-4096 key) with an empty registry."""
    shutil.copytree(master_home.home, target)
    paths = config.MasterPaths.resolve(target)
    paths.registry.unlink()
    for suffix in ("-wal", "-shm"):
        (paths.registry.parent / (paths.registry.name + suffix)).unlink(missing_ok=True)
    return enrollment.init_master(paths)


# What may drive a terminal: C0 (but the newline between lines), DEL, C1, and the Unicode
# bidi marks, embeddings, overrides and isolates.  Written out here, independently of
# the code under test.
TERMINAL_CONTROLS = frozenset(
    [
        *range(0x00, 0x0A),
        *range(0x0B, 0x20),
        0x7F,
        *range(0x80, 0xA0),
        *(0x061C, 0x200E, 0x200F),
        *range(0x202A, 0x202F),
        *range(0x2066, 0x206A),
    ]
)


def no_control_characters(text: str) -> list[str]:
    """Every character of ``text`` that could drive a terminal, as ``repr`` strings."""
    return sorted({repr(c) for c in text if ord(c) in TERMINAL_CONTROLS})


# -- what a healthy agent and updater say (the shapes of docs/Agent.md, docs/Remote-Updates.md)


def health(release="r1", **extra) -> dict:
    return {"status": "ok", "host": "w", "version": "0.1.0", "release": release} | extra


def status(decky="web-01", **service) -> dict:
    svc = {
        "type": "redis",
        "bind": "127.0.0.1",
        "port": 6379,
        "state": "listening",
        "reason": None,
        "address": "127.0.0.1:6379",
        "connections": 3,
        "active": 0,
        "refused": 0,
        "events": 9,
    } | service
    return {
        "host": "w",
        "spec_hash": "ab" * 32,
        "deckies": {decky: {"services": {"redis": svc}}},
        "summary": {"deckies": 1, "services": 1, "listening": 1, "failed": 0},
    }


class _Deaf(Protocol):
    """Completes the TLS handshake, then never reads another byte (TCP windows fill up)."""

    def connectionMade(self):
        self.factory.connected.append(self)
        self.transport.pauseProducing()


async def listen_deaf(reactor, bundle_dir, role: str):
    """A TLS listener with ``role``'s certificate of the bundle that stops reading at once."""
    from decnet.tls import listen_tls as listen

    bundle = pki.WorkerBundle.load(bundle_dir)
    factory = Factory.forProtocol(_Deaf)
    factory.connected = []
    master = Accept(config.ROLE_MASTER, fingerprint=bundle.master_fingerprint)
    options = PolicyOptions(TLSIdentity.from_bundle(bundle, role), PeerPolicy([master]))
    port = await listen(reactor, "tcp:0:interface=127.0.0.1", options, factory)
    return port, factory
