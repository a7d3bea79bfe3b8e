"""JSON over mutual TLS to one DECNET daemon, pinned in the handshake.

:class:`PinnedClient` is the transport under the master's ``AgentClient`` and
``UpdaterClient`` and under the updater's health probe of its own agent: a
Twisted ``Agent`` with an ``IPolicyForHTTPS`` whose every connection runs our
verify callback, so a request is only ever sent over a connection whose
handshake proved the peer's CA, role, CN and enrolled fingerprint.  There is no
side-channel pre-check and no way to skip the pin: a client without a pinned
fingerprint refuses to be built (fail closed).

The peer holds a valid certificate but may be compromised, so the client trusts
nothing else about it:

* **No redirects.**  A 3xx is :class:`~decnet.errors.RedirectRefused`, naming the
  host; nothing is fetched from where it points (a redirect would leave the pinned
  connection, possibly for plain HTTP).  This is why the plain ``Agent`` is used and
  not treq's ``HTTPClient``, which wraps it in a redirect-following agent (and a gzip
  decoder that would let a small body inflate in memory before any cap).
* **One deadline per request** covers connecting, the TLS handshake, sending the
  request, the headers and the whole body; when it passes the call fails with
  :class:`~decnet.errors.Unreachable` and the connection is dropped (closed under
  TLS, once the answer has begun: no TLS close handshake that a stalled peer would
  never complete).  A worker that sends headers and then trickles or stalls cannot
  hold a fleet command.
* **Every reply is validated** (:mod:`decnet.replies`): a 2xx against the route's
  schema, a 4xx/5xx against the common error schema, bodies capped at
  :data:`MAX_RESPONSE`.  Anything else is :class:`~decnet.errors.BadReply`.

Failures come back typed (:mod:`decnet.errors`): ``Unreachable``,
``FingerprintMismatch``, ``PeerRefused`` (either side refused the other's
certificate), ``RemoteError`` (the daemon answered 4xx/5xx; its problems list),
``BadReply``.  Why our side refused the peer comes from that connection's own
failure (:class:`~decnet.tls.PeerCertificateRefused`), never from state shared
between connections.
"""

from __future__ import annotations

import io
import json as jsonlib
from collections.abc import Mapping, Sequence
from typing import BinaryIO

from hyperlink import URL
from OpenSSL import SSL
from twisted.internet import defer, error
from twisted.internet.interfaces import IPushProducer, IReactorTCP, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    FileBodyProducer,
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
    _HTTP11ClientFactory,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers

from decnet import config, replies
from decnet.errors import (
    BadReply,
    FingerprintMismatch,
    PeerRefused,
    RedirectRefused,
    RemoteError,
    ReplyTooLarge,
    Unreachable,
)
from decnet.tls import (
    Accept,
    PeerCertificateRefused,
    PeerPolicy,
    PinnedHTTPSPolicy,
    PolicyOptions,
    RefusalKind,
    TLSIdentity,
    tls_error_text,
)

DEFAULT_TIMEOUT = config.HTTP_TIMEOUT
MAX_RESPONSE = 8 * 1024 * 1024
PREVIEW = 120  # characters of a non-JSON body or a redirect target quoted in the error


class _QuietHTTP11ClientFactory(_HTTP11ClientFactory):
    """Twisted's per-connection HTTP client factory, minus "Starting factory ..." /
    "Stopping factory ..." at every request (a fleet ``check`` or a health probe)."""

    noisy = False


def quiet_pool(reactor: IReactorTCP, *, persistent: bool = False) -> HTTPConnectionPool:
    """An :class:`HTTPConnectionPool` whose connections do not log their factory."""
    pool = HTTPConnectionPool(reactor, persistent=persistent)
    pool._factory = _QuietHTTP11ClientFactory  # Twisted's documented hook for this
    return pool


_UNREACHABLE = (
    error.ConnectError,
    error.ConnectionLost,
    error.ConnectionDone,
    error.TimeoutError,
    error.DNSLookupError,
    defer.CancelledError,
)


class PinnedClient:
    """JSON requests to ``https://address:port`` where the peer must match ``accept``.

    ``clock`` runs the per-request deadline (the reactor by default; tests pass a
    ``Clock`` to expire it on purpose).
    """

    def __init__(
        self,
        reactor: IReactorTCP,
        identity: TLSIdentity,
        *,
        address: str,
        port: int,
        accept: Accept,
        timeout: float = DEFAULT_TIMEOUT,
        persistent: bool = False,
        clock: IReactorTime | None = None,
        also: Sequence[Accept] = (),
    ):
        if not accept.fingerprint:
            raise PeerRefused(
                f"no enrolled fingerprint for {accept.describe()}; refusing to connect unpinned"
            )
        self.accept = accept
        self.timeout = timeout
        self.clock: IReactorTime = clock or IReactorTime(reactor)
        # ``also``: further pinned certificates of the same peer (a renewal's overlap).
        self.policy = PeerPolicy([accept, *also])
        self.tls_options = PolicyOptions(identity, self.policy)
        pool = quiet_pool(reactor, persistent=persistent)
        self._agent = Agent(
            reactor,
            contextFactory=PinnedHTTPSPolicy(self.tls_options),
            connectTimeout=timeout,
            pool=pool,
        )
        self._pool = pool
        self.base = URL(scheme="https", host=address, port=port)
        self.where = f"{accept.describe()} at {address}:{port}"

    def reload(self, identity: TLSIdentity | None = None, accept: Accept | None = None) -> None:
        """Present ``identity`` and/or pin ``accept`` from the next connection on (renewal).

        Pooled connections made under the old pin are closed, so no request
        goes over a connection the new pin did not check.
        """
        if accept is not None:
            self.policy.accept = (accept,)
            self.accept = accept
        if identity is not None:
            self.tls_options.reload(identity)
        self._pool.closeCachedConnections()

    def url(self, *segments: str, **query: object) -> URL:
        url = self.base.child(*segments)
        for key, value in query.items():
            url = url.add(key, str(value))
        return url

    async def call(
        self,
        method: str,
        *segments: str,
        json: object = None,
        data: bytes | BinaryIO | None = None,
        headers: Mapping[str, Sequence[str]] | None = None,
        timeout: float | None = None,
        query: Mapping[str, object] | None = None,
        reply: replies.Schema = replies.OBJECT,
    ) -> dict:
        """Send one request; return the JSON body of a 2xx answer, checked against ``reply``."""
        url = self.url(*segments, **(query or {}))
        timeout = timeout or self.timeout
        exchange = defer.ensureDeferred(self._exchange(method, url, json, data, headers))
        expired: list[bool] = []

        def expire() -> None:
            expired.append(True)
            exchange.cancel()

        deadline = self.clock.callLater(timeout, expire)
        try:
            code, body = await exchange
        except BadReply:
            raise
        except Exception as exc:
            typed = self._translate(exc, timeout, bool(expired))
            if typed is None:
                raise  # a bug, not a network condition: let it surface
            raise typed from None
        finally:
            if deadline.active():
                deadline.cancel()
        return self._read(code, body, reply)

    async def _exchange(self, method: str, url: URL, json, data, headers) -> tuple[int, bytes]:
        head = Headers({b"accept": [b"application/json"]})
        for name, values in (headers or {}).items():
            head.setRawHeaders(name.encode("ascii"), [v.encode("latin-1") for v in values])
        if json is not None:
            data = jsonlib.dumps(json).encode()
            head.setRawHeaders(b"content-type", [b"application/json"])
        if isinstance(data, bytes):
            data = io.BytesIO(data)
        producer = None if data is None else FileBodyProducer(data)
        response = await self._agent.request(
            method.encode("ascii"), url.to_uri().to_text().encode("ascii"), head, producer
        )
        reader = _BodyReader(MAX_RESPONSE, self.where)
        response.deliverBody(reader)
        if 300 <= response.code < 400:
            reader.done.addErrback(lambda _: None)  # nobody reads the body of a redirect
            reader.abort()
            target = (response.headers.getRawHeaders(b"location") or [b""])[0]
            raise RedirectRefused(
                self.where,
                f"HTTP {response.code} redirect to {_quote(target)}; "
                "the master never follows redirects",
            )
        return response.code, await reader.done

    def _read(self, code: int, body: bytes, reply: replies.Schema) -> dict:
        if not 200 <= code < 600:
            raise BadReply(self.where, f"unexpected HTTP status {code}")
        try:
            doc = jsonlib.loads(body.decode("utf-8"), parse_constant=_refuse_constant)
        except (ValueError, RecursionError):
            raise BadReply(self.where, f"HTTP {code}, and the body is not JSON: {_quote(body)}")
        if code >= 400:
            found = replies.problems_of(replies.ERROR, doc)
            if found:
                raise BadReply(self.where, [f"HTTP {code}: {p}" for p in found])
            raise RemoteError(code, doc["problems"] or [f"HTTP {code}"], doc)
        found = replies.problems_of(reply, doc)
        if found:
            raise BadReply(self.where, found)
        return doc

    def _translate(self, exc: BaseException, timeout: float, expired: bool) -> Exception | None:
        where = self.where
        reasons = _reasons(exc)
        refused = [r for r in reasons if isinstance(r, PeerCertificateRefused)]
        if refused:
            refusal = refused[0].refusal
            kind = FingerprintMismatch if refusal.kind is RefusalKind.FINGERPRINT else PeerRefused
            return kind(f"refused {where}: {refusal}")
        if expired:
            return Unreachable(f"{where} did not answer within {_seconds(timeout)}s")
        ssl_errors = [r for r in reasons if isinstance(r, SSL.Error)]
        if ssl_errors:
            return PeerRefused(f"{where} refused our certificate ({tls_error_text(ssl_errors[0])})")
        if any(isinstance(r, _UNREACHABLE) for r in reasons):
            return Unreachable(f"cannot reach {where}: {reasons[-1]}")
        return None

    async def close(self) -> None:
        await self._pool.closeCachedConnections()


class _BodyReader(Protocol):
    """Collects a response body of at most ``limit`` bytes.

    Cancelling :attr:`done` (the deadline) or going over the limit aborts the
    connection at once: no TLS close handshake that a stalled peer would never
    complete.
    """

    def __init__(self, limit: int, where: str):
        self.limit = limit
        self.where = where
        self.chunks: list[bytes] = []
        self.size = 0
        self.done: defer.Deferred[bytes] = defer.Deferred(lambda _: self.abort())

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.abort()
            self.done.errback(ReplyTooLarge(self.where, f"body larger than {self.limit} bytes"))
            return
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)

    def abort(self) -> None:
        """Drop the connection now.

        Stopping the response's transport (the ``IPushProducer`` Twisted hands a
        body protocol) closes the TCP connection under TLS at once, instead of a
        TLS close handshake that a hostile peer would never complete.
        """
        if self.transport is not None:
            IPushProducer(self.transport).stopProducing()


def _quote(raw: bytes) -> str:
    """A short, ASCII-only quotation of bytes a worker sent (for an error message)."""
    text = raw[: PREVIEW * 4].decode("utf-8", "replace")
    return jsonlib.dumps(text[:PREVIEW] + ("..." if len(text) > PREVIEW else ""))


def _seconds(value: float) -> str:
    return f"{value:.1f}".removesuffix(".0")


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _reasons(exc: BaseException) -> list[BaseException]:
    """The exception and, for the HTTP client's wrappers, the failures inside it."""
    found = [exc]
    if isinstance(exc, ResponseNeverReceived | RequestTransmissionFailed | ResponseFailed):
        found.extend(f.value for f in exc.reasons)
    return found
