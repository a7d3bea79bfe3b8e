"""Klein-over-mTLS plumbing (decnet.httpapi) and the pinned client (decnet.httpclient)."""

import hashlib
import itertools
import json

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from klein import Klein
from OpenSSL import crypto
from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.http import HTTPChannel
from werkzeug.exceptions import MethodNotAllowed, NotFound
from zope.interface import implementer

from decnet import pki
from decnet.errors import (
    FingerprintMismatch,
    PeerRefused,
    RemoteError,
    RolledBack,
    UnknownDecky,
    UnknownRelease,
    Unreachable,
    ValidationError,
)
from decnet.httpapi import (
    INTERNAL_ERROR,
    BodyLimits,
    BodyTooLarge,
    HTTPError,
    Problem,
    UploadForbidden,
    authorize,
    body_of,
    install_error_handlers,
    json_body,
    make_site,
    problem_of,
    read_json,
    respond,
)
from decnet.httpclient import PinnedClient
from decnet.tls import Accept, PeerPolicy, PolicyOptions, listen_tls


def build_app():
    app = Klein()
    install_error_handlers(app)

    @app.route("/hello", methods=["GET"])
    def hello(request):
        who = authorize(request, Accept("master"))
        return respond(request, {"hello": who.cn})

    @app.route("/health", methods=["GET"])
    def health(request):
        authorize(request, Accept("master"), Accept("updater", cn="updater@w1"))
        return respond(request, {"status": "ok"})

    @app.route("/echo", methods=["POST"])
    def echo(request):
        authorize(request, Accept("master"))
        doc = read_json(request)
        if not isinstance(doc, dict):
            raise HTTPError(400, ["expected a JSON object"])
        return respond(request, doc)

    @app.route("/boom", methods=["GET"])
    def boom(request):
        raise RuntimeError("secret internal detail /etc/shadow")

    return app


@pytest_twisted.async_yield_fixture
async def server(ids):
    # The TLS layer admits the master, w1's updater and (for route tests) worker w2.
    policy = PeerPolicy([Accept("master"), Accept("updater", cn="updater@w1"), Accept("worker")])
    site = make_site(build_app().resource(), limits=BodyLimits(max_size=1000))
    port = await listen_tls(
        reactor, "tcp:0:interface=127.0.0.1", PolicyOptions(ids["w1"], policy), site
    )
    yield port.getHost().port
    await port.stopListening()


def client(ids, port, who="master", pin_of="w1", **kw):
    fp = ids[pin_of].identity.fingerprint
    return PinnedClient(
        reactor,
        ids[who],
        address="127.0.0.1",
        port=port,
        accept=Accept("worker", fingerprint=fp),
        **kw,
    )


@pytest_twisted.ensureDeferred
async def test_the_master_calls_a_pinned_worker(ids, server):
    port = server
    assert await client(ids, port).call("GET", "hello") == {"hello": "decnet-master"}
    assert await client(ids, port).call("POST", "echo", json={"a": [1, 2]}) == {"a": [1, 2]}


@pytest_twisted.ensureDeferred
async def test_a_pin_mismatch_is_refused_before_any_request_is_sent(ids, server):
    port = server
    with pytest.raises(FingerprintMismatch, match="fingerprint mismatch"):
        await client(ids, port, pin_of="w2").call("GET", "hello")


@implementer(IOpenSSLServerConnectionCreator)
class _Alternating:
    """Serves each new connection with the next of ``options``, in turn."""

    def __init__(self, *options):
        self._next = itertools.cycle(options)

    def serverConnectionForTLS(self, protocol):
        return next(self._next).serverConnectionForTLS(protocol)


@pytest_twisted.ensureDeferred
async def test_calls_at_once_refused_for_two_reasons_each_get_their_own_error(ids):
    """One client, several handshakes in flight: every other server holds w1's name with another
    key, the rest are w2.  Each call fails with its own connection's refusal, typed."""
    master = PeerPolicy([Accept("master")])
    creator = _Alternating(PolicyOptions(ids["w1-again"], master), PolicyOptions(ids["w2"], master))
    factory = TLSMemoryBIOFactory(creator, False, Factory.forProtocol(Protocol))
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    w1 = Accept("worker", cn="w1", fingerprint=ids["w1"].identity.fingerprint)
    pinned = PinnedClient(
        reactor, ids["master"], address="127.0.0.1", port=port.getHost().port, accept=w1
    )
    try:
        outcomes = await defer.DeferredList(
            [defer.ensureDeferred(pinned.call("GET", "hello")) for _ in range(6)],
            consumeErrors=True,
        )
    finally:
        await port.stopListening()
    errors = [failure.value for _, failure in outcomes]
    mismatches = [e for e in errors if isinstance(e, FingerprintMismatch)]
    others = [e for e in errors if type(e) is PeerRefused]
    assert len(mismatches) == len(others) == 3, errors
    assert all("fingerprint mismatch for 'w1'" in str(e) for e in mismatches)
    assert all("'w2' is not the expected peer" in str(e) for e in others)


@pytest_twisted.ensureDeferred
async def test_routes_narrow_who_may_call_them(ids, server):
    port = server
    updater = client(ids, port, who="upd-w1")
    assert await updater.call("GET", "health") == {"status": "ok"}
    with pytest.raises(RemoteError) as info:
        await updater.call("GET", "hello")
    assert info.value.status == 403
    with pytest.raises(RemoteError) as info:
        await client(ids, port, who="w2").call("GET", "health")
    assert info.value.status == 403


@pytest_twisted.ensureDeferred
async def test_a_foreign_ca_client_is_refused_at_the_handshake(ids, server):
    port = server
    with pytest.raises(PeerRefused):
        await client(ids, port, who="foreign-master").call("GET", "hello")


@pytest_twisted.ensureDeferred
async def test_bad_json_gets_a_400_with_the_problem(ids, server):
    port = server
    with pytest.raises(RemoteError) as info:
        await client(ids, port).call("POST", "echo", data=b"{nope")
    assert info.value.status == 400
    assert "not valid JSON" in info.value.problems[0]
    with pytest.raises(RemoteError, match="expected a JSON object"):
        await client(ids, port).call("POST", "echo", json=[1])


@pytest_twisted.ensureDeferred
async def test_an_oversized_body_is_refused_with_413(ids, server):
    port = server
    with pytest.raises(RemoteError) as info:
        await client(ids, port).call("POST", "echo", json={"x": "y" * 5000})
    assert info.value.status == 413
    # The daemon keeps serving.
    assert await client(ids, port).call("GET", "hello") == {"hello": "decnet-master"}


@pytest_twisted.ensureDeferred
async def test_internal_errors_are_never_echoed(ids, server):
    port = server
    with pytest.raises(RemoteError) as info:
        await client(ids, port).call("GET", "boom")
    assert info.value.status == 500
    assert "secret" not in str(info.value.body)


@pytest_twisted.ensureDeferred
async def test_an_unreachable_daemon_is_a_typed_error(ids, tmp_path):
    from twisted.internet.protocol import Factory

    port = await listen_tls(
        reactor,
        "tcp:0:interface=127.0.0.1",
        PolicyOptions(ids["w1"], PeerPolicy([Accept("master")])),
        Factory(),
    )
    number = port.getHost().port
    await port.stopListening()
    with pytest.raises(Unreachable):
        await client(ids, number).call("GET", "hello")


def test_a_client_without_a_pin_fails_closed(ids):
    with pytest.raises(PeerRefused, match="unpinned"):
        PinnedClient(reactor, ids["master"], address="127.0.0.1", port=1, accept=Accept("worker"))


@pytest_twisted.ensureDeferred
async def test_unknown_routes_and_methods_are_404_and_405_not_500(ids, server):
    with pytest.raises(RemoteError) as info:
        await client(ids, server).call("GET", "nowhere")
    assert info.value.status == 404
    with pytest.raises(RemoteError) as info:
        await client(ids, server).call("DELETE", "hello")
    assert info.value.status == 405


# -- body limits and the error mapping, byte by byte (StringTransport, Clock) -----------------


def _body_app():
    app = Klein()
    install_error_handlers(app)
    seen = []

    @app.route("/upload", methods=["POST"])
    def upload(request):
        body = body_of(request)
        seen.append((body.size, request.content.read()))
        return respond(request, {"size": body.size, "sha256": body.sha256})

    return app, seen


class _Peer(StringTransport):
    """One connection whose TLS peer holds ``cert`` (a pyOpenSSL X509, or None)."""

    def __init__(self, cert=None):
        super().__init__(peerAddress=IPv4Address("TCP", "10.0.0.9", 4711))
        self.cert = cert

    def getPeerCertificate(self):
        return self.cert


class _Served:
    """A site of :func:`_body_app` and one connection to it, on a ``Clock``."""

    def __init__(self, limits, cert=None):
        self.clock = Clock()
        app, self.seen = _body_app()
        site = make_site(app.resource(), limits=limits, reactor=self.clock)
        self.requests = []
        build = site.requestFactory

        def record(*args, **kw):
            self.requests.append(build(*args, **kw))
            return self.requests[-1]

        site.requestFactory = record
        self.channel = site.buildProtocol(None)
        self.transport = _Peer(cert)
        self.channel.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        for i in range(0, len(data), 4096):
            self.channel.dataReceived(data[i : i + 4096])

    def answer(self) -> tuple[bytes, dict, dict]:
        head, _, body = self.transport.value().partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        headers = dict(line.lower().split(b": ", 1) for line in lines[1:])
        if headers.get(b"transfer-encoding") == b"chunked":
            size, _, rest = body.partition(b"\r\n")
            body = rest[: int(size, 16)]
        return lines[0], headers, json.loads(body)


def _cert_of(identity):
    return crypto.X509.from_cryptography(identity.cert)


def test_a_body_announced_too_large_is_answered_413_before_a_byte_of_it_arrives():
    served = _Served(BodyLimits(max_size=1000))
    served.send(b"POST /upload HTTP/1.1\r\nHost: w1\r\nContent-Length: 10000000000\r\n\r\n")
    status, _, doc = served.answer()
    assert status == b"HTTP/1.1 413 Request Entity Too Large"
    assert doc == {"problems": ["request body larger than 1000 bytes"]}
    assert served.transport.disconnecting and served.seen == []


def test_a_refused_body_is_answered_like_any_handlers_error():
    """The early answer goes through the one error mapping and the request's own API:
    JSON problems, no caching, an exact length and the connection closed."""
    served = _Served(BodyLimits(max_size=10))
    served.send(b"POST /upload HTTP/1.1\r\nHost: w1\r\nContent-Length: 11\r\n\r\n")
    _, headers, doc = served.answer()
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"cache-control"] == b"no-store"
    assert headers[b"connection"] == b"close"
    assert int(headers[b"content-length"]) == len(json_body(doc))
    assert problem_of(BodyTooLarge(11, 10)) == Problem(413, doc)


def test_a_chunked_body_is_cut_at_the_limit_and_nothing_past_it_is_kept():
    served = _Served(BodyLimits(max_size=1000))
    served.send(b"POST /upload HTTP/1.1\r\nHost: w1\r\nTransfer-Encoding: chunked\r\n\r\n")
    served.send(b"258\r\n" + b"a" * 600 + b"\r\n")
    assert served.transport.value() == b""  # 600 bytes: still within the limit
    served.send(b"258\r\n" + b"b" * 600 + b"\r\n")
    status, _, _ = served.answer()
    assert status.startswith(b"HTTP/1.1 413 ")
    served.send(b"0\r\n\r\n")
    assert served.seen == []  # the route never ran
    assert [r.body.size for r in served.requests] == [600]
    served.requests[0].content.seek(0)
    assert served.requests[0].content.read() == b"a" * 600  # nothing past the limit is kept


def test_a_peer_that_goes_on_sending_after_a_refusal_is_cut_off_after_the_abort_timeout():
    served = _Served(BodyLimits(max_size=1000))
    served.send(b"POST /upload HTTP/1.1\r\nHost: w1\r\nContent-Length: 10000000000\r\n\r\n")
    assert served.transport.disconnecting and not served.transport.disconnected
    served.send(b"x" * 100_000)  # ignores the answer and the close
    served.clock.advance(HTTPChannel.abortTimeout - 1)
    assert not served.transport.disconnected
    served.clock.advance(1)
    assert served.transport.disconnected  # aborted


def test_a_large_body_from_a_certificate_that_may_not_upload_is_refused_403_from_its_headers(
    ids,
):
    limits = BodyLimits(max_size=10_000, small_size=100, large_senders=(Accept("master"),))
    served = _Served(limits, cert=_cert_of(ids["w2"]))
    served.send(b"POST /upload HTTP/1.1\r\nHost: w1\r\nContent-Length: 101\r\n\r\n")
    status, _, doc = served.answer()
    assert status == b"HTTP/1.1 403 Forbidden"
    assert doc == {"problems": ["forbidden: this certificate may not upload"]}
    # The master may; the route sees the size and digest of what arrived, as it arrived.
    served = _Served(limits, cert=_cert_of(ids["master"]))
    data = b"\x00\xff" * 2000
    served.send(
        b"POST /upload HTTP/1.1\r\nHost: w1\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data)
    )
    status, _, doc = served.answer()
    assert status == b"HTTP/1.1 200 OK"
    assert doc == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert served.seen == [(len(data), data)]


_SENDERS = {
    "master": pki.CertIdentity("decnet-master", "master", "a" * 64),
    "worker": pki.CertIdentity("w1", "worker", "b" * 64),
    "none": None,
}


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(0, 3000),
    max_size=st.integers(0, 2000),
    small_size=st.integers(0, 2000),
    sender=st.sampled_from(sorted(_SENDERS)),
    restricted=st.booleans(),
)
def test_body_limits_refuse_exactly_what_is_too_large_for_its_sender(
    size, max_size, small_size, sender, restricted
):
    asked = []

    def who():
        asked.append(True)
        return _SENDERS[sender]

    senders = (Accept("master"),) if restricted else ()
    refusal = BodyLimits(max_size, small_size, senders).refusal(size, who)
    large = restricted and size > small_size
    if size > max_size:
        assert isinstance(refusal, BodyTooLarge) and refusal.status == 413
    elif large and sender != "master":
        assert isinstance(refusal, UploadForbidden) and refusal.status == 403
        assert refusal.reason == ("no client certificate" if sender == "none" else refusal.reason)
    else:
        assert refusal is None
    assert bool(asked) == (large and size <= max_size)  # the identity only for a large body


@pytest.mark.parametrize(
    ("error", "status", "doc"),
    [
        (HTTPError(400, "bad", hint="x"), 400, {"problems": ["bad"], "hint": "x"}),
        (ValidationError(["a: no", "b: no"]), 400, {"problems": ["a: no", "b: no"]}),
        (UnknownDecky("no decky 'x'"), 404, {"problems": ["no decky 'x'"]}),
        (UnknownRelease("no release r9"), 404, {"result": "failed", "problems": ["no release r9"]}),
        (
            RolledBack("unhealthy", release="r1"),
            409,
            {"result": "rolled_back", "problems": ["unhealthy"], "release": "r1"},
        ),
        (NotFound(), 404, {"problems": ["Not Found"]}),
        (MethodNotAllowed(), 405, {"problems": ["Method Not Allowed"]}),
        (BodyTooLarge(5, 4), 413, {"problems": ["request body larger than 4 bytes"]}),
    ],
)
def test_one_mapping_turns_every_typed_error_into_its_status_and_problems(error, status, doc):
    assert problem_of(error) == Problem(status, doc)


def test_an_unexpected_error_has_no_mapping_and_becomes_an_opaque_500():
    assert problem_of(RuntimeError("secret internal detail")) is None
    assert INTERNAL_ERROR.status == 500 and "secret" not in json.dumps(INTERNAL_ERROR.doc)
