"""``sandbox poke``: play the attacker against every decky service, with real clients.

Each service gets one short, plausible conversation (:func:`converse`):

* ssh: a Twisted Conch client that completes the key exchange and tries one
  password, then gives up;
* http: a form POST to ``/login`` with treq;
* telnet, ftp, smtp (EHLO + AUTH PLAIN), redis (AUTH + a command) and
  tcp-banner: scripted raw TCP dialogues (:class:`Dialogue`).

Every conversation is identified by ``(decky address, port, our source port)``,
which the decoy writes into each event line (``dst_ip``, ``dst_port``,
``src_port``).  :func:`match_feed` finds each conversation's ``disconnect``
event in the master's feed, which proves the whole conversation arrived, and
checks the worker it was attributed to (the certificate, ``source_worker``).
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Callable
from typing import cast

import attrs
from twisted.internet import defer, protocol, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import (
    IReactorTime,
    IStreamClientEndpoint,
    ITCPTransport,
)
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from decnet.errors import SandboxError
from decnet.interfaces import IDecnetReactor
from decnet.sandbox import ISandboxReactor, feeds, state
from decnet.sandbox.feeds import event_params
from decnet.sandbox.layout import SandboxLayout
from decnet.sandbox.report import Report, ignore
from decnet.threads import run_in_pool

FEED_POLL = 0.05  # seconds between two reads of the feeds while waiting for the events
STEP_TIMEOUT = 10.0  # seconds for one expected answer (the ssh decoy waits 1 s per failure)

# What a brute-forcer tries first (all refused, always).
CREDENTIALS = (
    ("root", "123456"),
    ("admin", "admin"),
    ("ubuntu", "ubuntu"),
    ("pi", "raspberry"),
    ("oracle", "oracle123"),
    ("support", "support"),
    ("user", "Password1"),
    ("test", "test"),
)
TLS_CLIENT_HELLO_START = bytes.fromhex("16030100f4010000f00303")  # what a TLS scanner sends first


@attrs.frozen
class Target:
    worker: str
    decky: str
    service: str
    type: str
    address: str
    port: int
    banner: bool = False

    @property
    def label(self) -> str:
        return f"{self.worker} {self.decky} {self.service}"


@attrs.define
class Outcome:
    target: Target
    ok: bool
    did: str
    src_port: int | None = None

    def key(self) -> tuple[str, int, int] | None:
        if self.src_port is None:
            return None
        return (self.target.address, self.target.port, self.src_port)

    def as_dict(self) -> dict:
        return {
            **attrs.asdict(self.target),
            "ok": self.ok,
            "did": self.did,
            "src_port": self.src_port,
        }


def targets_from_state(doc: dict, only: list[str] | None = None) -> list[Target]:
    """Every service of every worker recorded in ``sandbox.json`` (or of ``only`` those)."""
    out = []
    for worker, info in sorted((doc.get("workers") or {}).items()):
        if only and worker not in only:
            continue
        for decky in info.get("spec", {}).get("deckies", ()):
            for s in decky["services"]:
                out.append(
                    Target(
                        worker,
                        decky["name"],
                        s.get("name", s["type"]),
                        s["type"],
                        s["bind"],
                        int(s["port"]),
                        bool(s.get("banner")),
                    )
                )
    return out


def pick_credentials(choice: Callable = secrets.choice) -> tuple[str, str]:
    return choice(CREDENTIALS)


# -- raw TCP dialogues -----------------------------------------------------------


class Dialogue(protocol.Protocol):
    """A scripted client: send bytes, wait (with a deadline) for expected bytes, close."""

    def __init__(self, clock: IReactorTime, timeout: float = STEP_TIMEOUT):
        self.clock = clock
        self.timeout = timeout
        self.received = b""
        self.closed: defer.Deferred = defer.Deferred()
        self._waiting: list[tuple[bytes, defer.Deferred]] = []
        self.src_port: int | None = None

    @property
    def wire(self) -> ITCPTransport:
        """The TCP connection (the endpoint connects this protocol over TCP only)."""
        if self.transport is None:
            raise ConnectionError("not connected")
        return cast(ITCPTransport, self.transport)

    def connectionMade(self) -> None:
        self.src_port = self.wire.getHost().port

    def _arrived(self, needle: bytes) -> bool:
        # An empty needle means "anything at all".
        return needle in self.received if needle else bool(self.received)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        ready = [(n, d) for n, d in self._waiting if self._arrived(n)]
        self._waiting = [(n, d) for n, d in self._waiting if not self._arrived(n)]
        for _needle, d in ready:
            d.callback(self.received)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        waiting, self._waiting = self._waiting, []
        for needle, d in waiting:
            d.errback(ConnectionError(f"closed before {needle or b'any data'!r} arrived"))
        self.closed.callback(None)

    def expect(self, needle: bytes) -> defer.Deferred:
        """Fires once ``needle`` (``b""``: any byte) has been received; times out on the clock."""
        if self._arrived(needle):
            return defer.succeed(self.received)
        d: defer.Deferred = defer.Deferred()
        self._waiting.append((needle, d))
        return d.addTimeout(self.timeout, self.clock)

    def send(self, data: bytes) -> None:
        self.wire.write(data)

    async def hang_up(self) -> None:
        if not self.closed.called:
            self.wire.loseConnection()
        await self.closed.addTimeout(self.timeout, self.clock)


async def _telnet(d: Dialogue, user: str, password: str) -> str:
    await d.expect(b"login: ")
    d.send(user.encode() + b"\r\n")
    await d.expect(b"Password: ")
    d.send(password.encode() + b"\r\n")
    await d.expect(b"Login incorrect")
    await d.hang_up()
    return f"login {user} / {password} -> Login incorrect"


async def _ftp(d: Dialogue, user: str, password: str) -> str:
    await d.expect(b"220 ")
    d.send(f"USER {user}\r\n".encode())
    await d.expect(b"331 ")
    d.send(f"PASS {password}\r\n".encode())
    await d.expect(b"530 ")
    d.send(b"SYST\r\n")
    await d.expect(b"530 Please")
    d.send(b"QUIT\r\n")
    await d.expect(b"221 ")
    await d.hang_up()
    return f"USER {user} / PASS {password} -> 530 Login incorrect; SYST; QUIT"


async def _smtp(d: Dialogue, user: str, password: str) -> str:
    await d.expect(b"220 ")
    d.send(b"EHLO scanner.example\r\n")
    await d.expect(b"250 ")
    mailbox = f"{user}@corp.example"
    token = base64.b64encode(b"\0" + mailbox.encode() + b"\0" + password.encode())
    d.send(b"AUTH PLAIN " + token + b"\r\n")
    await d.expect(b"535 ")
    d.send(b"QUIT\r\n")
    await d.expect(b"221 ")
    await d.hang_up()
    return f"EHLO, AUTH PLAIN {mailbox} / {password} -> 535 refused; QUIT"


def _resp(*words: str) -> bytes:
    out = [f"*{len(words)}\r\n".encode()]
    for w in words:
        data = w.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


async def _redis(d: Dialogue, user: str, password: str) -> str:
    d.send(f"AUTH {password}\r\n".encode())
    await d.expect(b"-WRONGPASS")
    d.send(_resp("CONFIG", "SET", "dir", "/var/spool/cron"))
    await d.expect(b"-NOAUTH")
    d.send(b"QUIT\r\n")
    await d.expect(b"+OK")
    await d.hang_up()
    return f"AUTH {password} -> WRONGPASS; CONFIG SET dir /var/spool/cron -> NOAUTH; QUIT"


async def _banner(d: Dialogue, target: Target) -> str:
    got = ""
    if target.banner:
        await d.expect(b"")
        got = f"got a {len(d.received)}-byte banner, "
    d.send(TLS_CLIENT_HELLO_START)
    await d.hang_up()
    return f"{got}sent {len(TLS_CLIENT_HELLO_START)} bytes of a TLS ClientHello, hung up"


DIALOGUES = {"telnet": _telnet, "ftp": _ftp, "smtp": _smtp, "redis": _redis}


async def _raw(reactor: IDecnetReactor, target: Target, user: str, password: str) -> Outcome:
    endpoint = TCP4ClientEndpoint(reactor, target.address, target.port, timeout=STEP_TIMEOUT)
    d = await connectProtocol(endpoint, Dialogue(reactor))
    try:
        if target.type == "tcp-banner":
            did = await _banner(d, target)
        else:
            did = await DIALOGUES[target.type](d, user, password)
    except BaseException:
        if not d.closed.called:
            d.transport.abortConnection()
        raise
    return Outcome(target, True, did, d.src_port)


# -- http (treq) -------------------------------------------------------------------


@implementer(IStreamClientEndpoint)
class _RecordingEndpoint:
    def __init__(self, inner, ports: list[int]):
        self.inner = inner
        self.ports = ports

    def connect(self, factory):
        def connected(proto):
            self.ports.append(proto.transport.getHost().port)
            return proto

        return self.inner.connect(factory).addCallback(connected)


@implementer(IAgentEndpointFactory)
class _RecordingEndpoints:
    """Plain TCP endpoints that note the local port of each connection (to find its events)."""

    def __init__(self, reactor: IDecnetReactor):
        self.reactor = reactor
        self.ports: list[int] = []

    def endpointForURI(self, uri):
        inner = TCP4ClientEndpoint(self.reactor, uri.host, uri.port, timeout=STEP_TIMEOUT)
        return _RecordingEndpoint(inner, self.ports)


async def _http(reactor: IDecnetReactor, target: Target, user: str, password: str) -> Outcome:
    from treq.client import HTTPClient
    from twisted.web.client import Agent

    from decnet.httpclient import quiet_pool

    endpoints = _RecordingEndpoints(reactor)
    pool = quiet_pool(reactor)
    client = HTTPClient(Agent.usingEndpointFactory(reactor, endpoints, pool=pool))
    url = f"http://{target.address}:{target.port}/login"
    response = await client.post(
        url,
        data={"username": user, "password": password},
        headers=Headers({"User-Agent": ["Mozilla/5.0 (compatible; decnet-poke)"]}),
        timeout=STEP_TIMEOUT,
    )
    body = await response.content()
    await pool.closeCachedConnections()
    verdict = "invalid credentials" if b"Invalid username" in body else f"{len(body)} bytes"
    did = f"POST /login username={user} password={password} -> {response.code} ({verdict})"
    return Outcome(target, True, did, endpoints.ports[-1] if endpoints.ports else None)


# -- ssh (Twisted Conch) -------------------------------------------------------------


async def _ssh(reactor: IDecnetReactor, target: Target, user: str, password: str) -> Outcome:
    from twisted.conch.ssh import connection, transport, userauth

    done: defer.Deferred = defer.Deferred()
    tried: list[str] = []
    accepted: list[bool] = []

    class OnePasswordAuth(userauth.SSHUserAuthClient):
        """Offers no key and exactly one password, then runs out of methods."""

        def getPassword(self, prompt=None):
            if tried:
                return None
            tried.append(password)
            return defer.succeed(password.encode())

        def getPublicKey(self):
            return None

        def ssh_USERAUTH_SUCCESS(self, packet):  # a decoy never lets anyone in; say so if one did
            accepted.append(True)
            self.transport.loseConnection()

    class Client(transport.SSHClientTransport):
        def verifyHostKey(self, pubKey, fingerprint):  # the attacker accepts any host key
            self.host_key = fingerprint
            return defer.succeed(True)

        def connectionSecure(self):
            self.requestService(OnePasswordAuth(user.encode(), connection.SSHConnection()))

        def connectionLost(self, reason):
            super().connectionLost(reason)
            if not done.called:
                done.callback(None)

    endpoint = TCP4ClientEndpoint(reactor, target.address, target.port, timeout=STEP_TIMEOUT)
    client = await connectProtocol(endpoint, Client())
    src_port = client.transport.getHost().port
    try:
        await done.addTimeout(STEP_TIMEOUT * 2, reactor)
    except defer.TimeoutError:
        client.transport.abortConnection()
        raise
    server = (client.otherVersionString or b"?").decode("latin-1")
    if not tried:
        return Outcome(target, False, f"{server}: no password prompt", src_port)
    verdict = "ACCEPTED" if accepted else "refused"
    return Outcome(
        target, not accepted, f"{server}: password login {user} / {password} -> {verdict}", src_port
    )


# -- one conversation ------------------------------------------------------------------


async def converse(
    reactor: IDecnetReactor, target: Target, choice: Callable = secrets.choice
) -> Outcome:
    """One attacker conversation with ``target``; failures are outcomes, not exceptions."""
    user, password = pick_credentials(choice)
    try:
        if target.type == "ssh":
            return await _ssh(reactor, target, user, password)
        if target.type == "http":
            return await _http(reactor, target, user, password)
        if target.type in DIALOGUES or target.type == "tcp-banner":
            return await _raw(reactor, target, user, password)
    except (OSError, ConnectionError, defer.TimeoutError, defer.CancelledError) as exc:
        return Outcome(target, False, f"failed: {exc.__class__.__name__}: {exc}")
    except Exception as exc:  # a client library error (e.g. treq's): still one outcome
        return Outcome(target, False, f"failed: {exc.__class__.__name__}: {exc}")
    return Outcome(target, False, f"no attacker script for service type {target.type!r}")


# -- did it arrive? ----------------------------------------------------------------------


@attrs.frozen
class Arrival:
    """Where each conversation's ``disconnect`` event was found in the master's feeds."""

    found: dict  # key -> source_worker it arrived as
    missing: tuple  # outcomes not found

    def misattributed(self, outcomes: list[Outcome]) -> list[tuple[Outcome, str]]:
        wrong = []
        for o in outcomes:
            got = self.found.get(o.key())
            if got is not None and got != o.target.worker:
                wrong.append((o, got))
        return wrong


def conversation_key(entry: dict) -> tuple[str, int, int] | None:
    """``(dst_ip, dst_port, src_port)`` of a feed entry's ``disconnect`` event, else ``None``."""
    if entry.get("msgid") != "disconnect":
        return None
    p = event_params(entry)
    try:
        return (p["dst_ip"], int(p["dst_port"]), int(p["src_port"]))
    except (KeyError, ValueError):
        return None


def match_feed(outcomes: list[Outcome], entries: list[dict], found: dict | None = None) -> Arrival:
    """Record in ``found`` which conversations the feed ``entries`` complete."""
    found = {} if found is None else found
    wanted = {o.key() for o in outcomes if o.key() is not None}
    for entry in entries:
        key = conversation_key(entry)
        if key in wanted and key not in found:
            found[key] = entry.get("source_worker")
    missing = tuple(o for o in outcomes if o.key() is not None and o.key() not in found)
    return Arrival(found, missing)


# -- the command -----------------------------------------------------------------------


@attrs.frozen
class PokeStarted:
    """``poke`` is about to attack ``services`` services (progress, before any outcome)."""

    services: int
    deckies: int
    workers: tuple[str, ...]


@attrs.frozen
class PokeReport:
    """Every conversation of one ``poke`` and whether each reached the master as its worker."""

    outcomes: tuple[Outcome, ...]
    found: dict  # conversation key -> source_worker it arrived as
    seconds: float  # from the first connection to the last hang-up
    seconds_to_master: float | None  # from then until the last one was in the feed
    wait: float  # 0: arrival was not checked
    missing: tuple[Outcome, ...]
    misattributed: tuple[tuple[Outcome, str], ...]

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]

    @property
    def ok(self) -> bool:
        """Every conversation done, arrived (when checked), under the right worker."""
        return not (self.failed or self.misattributed or self.missing)


def check_pokeable(doc: dict | None, layout: SandboxLayout, only: list[str] | None) -> dict:
    """``doc`` when it is a running sandbox that has every worker of ``only``."""
    if doc is None or not doc.get("workers"):
        raise SandboxError(
            f"no sandbox in {layout.root} (start one with `decnet-admin sandbox up`)"
        )
    records = [state.up_record(doc), *state.processes(doc).values()]
    if not any(r is not None and state.is_running(r) for r in records):
        raise SandboxError(
            f"the sandbox in {layout.root} is not running (start it with `decnet-admin sandbox up`)"
        )
    unknown = sorted(set(only or ()) - set(doc["workers"]))
    if unknown:
        raise SandboxError(f"no worker named {', '.join(unknown)} in this sandbox")
    return doc


def started(targets: list[Target]) -> PokeStarted:
    workers = tuple(sorted({t.worker for t in targets}))
    return PokeStarted(len(targets), len({(t.worker, t.decky) for t in targets}), workers)


async def converse_all(
    reactor: IDecnetReactor, targets: list[Target], choice: Callable, report: Report
) -> list[Outcome]:
    """Every conversation at once; each outcome is reported as it ends."""

    def reported(outcome: Outcome) -> Outcome:
        report(outcome)
        return outcome

    runs = [
        defer.ensureDeferred(converse(reactor, t, choice)).addCallback(reported) for t in targets
    ]
    return list(await defer.gatherResults(runs, consumeErrors=True))


async def await_arrival(
    reactor: IReactorTime, read_new: Callable, outcomes: list[Outcome], wait: float
) -> tuple[Arrival, float | None]:
    """Read the feeds until every conversation arrived or ``wait`` seconds passed.

    ``read_new`` returns a Deferred of the new feed entries; returns the arrival
    and when the last conversation arrived (``None``: not all did).
    """
    found: dict = {}
    arrival = match_feed(outcomes, [], found)
    deadline = reactor.seconds() + wait
    while wait > 0:
        arrival = match_feed(outcomes, await read_new(), found)
        if not arrival.missing:
            return arrival, reactor.seconds()
        if reactor.seconds() > deadline:
            break
        await task.deferLater(reactor, FEED_POLL, lambda: None)
    return arrival, None


async def poke(
    reactor: ISandboxReactor,
    layout: SandboxLayout,
    report: Report = ignore,
    *,
    only: list[str] | None = None,
    wait: float = 10.0,
    choice: Callable = secrets.choice,
) -> PokeReport:
    """Poke every service of the sandbox in ``layout`` and look for each in the feeds."""
    doc = await run_in_pool(reactor, state.load, layout.state_file)
    doc = check_pokeable(doc, layout, only)
    targets = targets_from_state(doc, only)
    tail = feeds.FeedTail({name: layout.feed(name) for name in doc["workers"]})
    await run_in_pool(reactor, tail.skip_to_end)
    report(started(targets))
    begun = reactor.seconds()
    outcomes = await converse_all(reactor, targets, choice, report)
    finished = reactor.seconds()
    arrival, arrived_at = await await_arrival(
        reactor, lambda: run_in_pool(reactor, tail.read_new), outcomes, wait
    )
    return PokeReport(
        outcomes=tuple(outcomes),
        found=arrival.found,
        seconds=finished - begun,
        seconds_to_master=None if arrived_at is None else arrived_at - finished,
        wait=wait,
        missing=arrival.missing if wait > 0 else (),
        misattributed=tuple(arrival.misattributed(outcomes)),
    )
