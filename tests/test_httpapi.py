"""Klein-over-mTLS plumbing (decnet.httpapi) and the pinned client (decnet.httpclient)."""

import itertools

import pytest
import pytest_twisted
from klein import Klein
from twisted.internet import defer, reactor
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from decnet.errors import FingerprintMismatch, PeerRefused, RemoteError, Unreachable
from decnet.httpapi import (
    HTTPError,
    authorize,
    install_error_handlers,
    make_site,
    read_json,
    respond,
)
from decnet.httpclient import PinnedClient
from decnet.tls import Accept, PeerPolicy, PolicyOptions, listen_tls
from tests.support import write_identity


@pytest.fixture(scope="module")
def ids(ca, foreign_ca, tmp_path_factory):
    d = tmp_path_factory.mktemp("http-ids")
    return {
        "master": write_identity(d / "m", ca, "master"),
        "w1": write_identity(d / "w1", ca, "worker", "w1"),
        "w2": write_identity(d / "w2", ca, "worker", "w2"),
        "w1-again": write_identity(d / "w1-again", ca, "worker", "w1"),
        "upd-w1": write_identity(d / "u1", ca, "updater", "w1"),
        "foreign-master": write_identity(d / "fm", foreign_ca, "master", trust=ca),
    }


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
    site = make_site(build_app().resource(), max_body=1000)
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
