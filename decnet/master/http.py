"""JSON over mutual TLS from the master to one worker daemon, pinned in the handshake.

:class:`PinnedClient` is the transport under ``AgentClient`` and
``UpdaterClient``: treq with an ``IPolicyForHTTPS`` whose every connection runs
our verify callback, so a request is only ever sent over a connection whose
handshake proved the peer's CA, role, CN and enrolled fingerprint.  There is no
side-channel pre-check and no way to skip the pin: a client without a pinned
fingerprint refuses to be built (fail closed).

Failures come back typed (:mod:`decnet.errors`): ``Unreachable``,
``FingerprintMismatch``, ``PeerRefused`` (either side refused the other's
certificate), ``RemoteError`` (the daemon answered 4xx/5xx; its problems list).
"""

from __future__ import annotations

import json as jsonlib

import treq
from hyperlink import URL
from OpenSSL import SSL
from treq.client import HTTPClient
from twisted.internet import defer, error
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)

from decnet import config
from decnet.errors import (
    FingerprintMismatch,
    HostDecommissioned,
    PeerRefused,
    RemoteError,
    Unreachable,
)
from decnet.tls import Accept, PeerPolicy, PinnedHTTPSPolicy, PolicyOptions, TLSIdentity

DEFAULT_TIMEOUT = config.HTTP_TIMEOUT
MAX_RESPONSE = 8 * 1024 * 1024

_UNREACHABLE = (
    error.ConnectError,
    error.ConnectionLost,
    error.ConnectionDone,
    error.TimeoutError,
    error.DNSLookupError,
    defer.CancelledError,
)


class PinnedClient:
    """JSON requests to ``https://address:port`` where the peer must match ``accept``."""

    def __init__(
        self,
        reactor,
        identity: TLSIdentity,
        *,
        address: str,
        port: int,
        accept: Accept,
        timeout: float = DEFAULT_TIMEOUT,
        persistent: bool = False,
    ):
        if not accept.fingerprint:
            raise PeerRefused(
                f"no enrolled fingerprint for {accept.describe()}; refusing to connect unpinned"
            )
        self.accept = accept
        self.timeout = timeout
        self.policy = PeerPolicy([accept])
        pool = HTTPConnectionPool(reactor, persistent=persistent)
        agent = Agent(
            reactor,
            contextFactory=PinnedHTTPSPolicy(PolicyOptions(identity, self.policy)),
            connectTimeout=timeout,
            pool=pool,
        )
        self._pool = pool
        self._http = HTTPClient(agent)
        self.base = URL(scheme="https", host=address, port=port)

    def url(self, *segments: str, **query) -> URL:
        url = self.base.child(*segments)
        for key, value in query.items():
            url = url.add(key, str(value))
        return url

    async def call(
        self,
        method: str,
        *segments: str,
        json=None,
        data=None,
        headers=None,
        timeout: float | None = None,
        query: dict | None = None,
    ) -> dict:
        """Send one request; return the decoded JSON body of a 2xx answer."""
        url = self.url(*segments, **(query or {}))
        timeout = timeout or self.timeout
        self.policy.last_refusal = None
        body_kw = {"json": json} if json is not None else {"data": data}
        try:
            response = await self._http.request(
                method, url.to_text(), headers=headers, timeout=timeout, **body_kw
            )
            body = await _collect(response, MAX_RESPONSE)
        except ResponseTooLarge:
            raise
        except Exception as exc:
            typed = self._translate(exc, timeout)
            if typed is None:
                raise  # a bug, not a network condition: let it surface
            raise typed from None
        try:
            doc = jsonlib.loads(body) if body else {}
        except ValueError:
            doc = {"problems": [body[:200].decode("utf-8", "replace")]}
        if response.code >= 400:
            problems = doc.get("problems") if isinstance(doc, dict) else None
            raise RemoteError(response.code, problems or [f"HTTP {response.code}"], doc)
        return doc

    def _translate(self, exc: BaseException, timeout: float) -> Exception | None:
        where = f"{self.accept.describe()} at {self.base.host}:{self.base.port}"
        refusal = self.policy.last_refusal
        if refusal is not None:
            kind = FingerprintMismatch if "fingerprint mismatch" in refusal else PeerRefused
            return kind(f"refused {where}: {refusal}")
        reasons = _reasons(exc)
        ssl_errors = [r for r in reasons if isinstance(r, SSL.Error)]
        if ssl_errors:
            return PeerRefused(f"{where} refused our certificate ({_ssl_text(ssl_errors[0])})")
        if any(isinstance(r, defer.CancelledError) for r in reasons):
            return Unreachable(f"{where} did not answer within {timeout:g}s")
        if any(isinstance(r, _UNREACHABLE) for r in reasons):
            return Unreachable(f"cannot reach {where}: {reasons[-1]}")
        return None

    async def close(self) -> None:
        await self._pool.closeCachedConnections()


class ResponseTooLarge(Unreachable):
    """A daemon sent more than we are willing to read."""


def _reasons(exc: BaseException) -> list[BaseException]:
    """The exception and, for treq/_newclient wrappers, the failures inside it."""
    found = [exc]
    if isinstance(exc, ResponseNeverReceived | RequestTransmissionFailed | ResponseFailed):
        found.extend(f.value for f in exc.reasons)
    return found


def _ssl_text(err: SSL.Error) -> str:
    if err.args and isinstance(err.args[0], list):
        parts = [item[-1] for item in err.args[0] if isinstance(item, tuple)]
        if parts:
            return "; ".join(parts)
    return str(err) or "TLS error"


async def _collect(response, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0

    def collect(data: bytes) -> None:
        nonlocal size
        size += len(data)
        if size > limit:
            raise ResponseTooLarge(f"response larger than {limit} bytes")
        chunks.append(data)

    await treq.collect(response, collect)
    return b"".join(chunks)


def client_for_host(
    reactor,
    identity: TLSIdentity,
    host,
    role: str,
    *,
    revocations=None,
    timeout: float = DEFAULT_TIMEOUT,
    persistent: bool = False,
) -> PinnedClient:
    """A :class:`PinnedClient` for an enrolled host's agent (``worker``) or ``updater``.

    Refuses, before any connection, a decommissioned host, a daemon enrolled
    without a certificate for ``role``, and a revoked certificate.  The peer
    must present exactly the role, CN and fingerprint recorded at enrollment.
    """
    if host.decommissioned:
        raise HostDecommissioned(
            f"{host.name!r} was decommissioned at {host.revoked_at}; refusing to contact it"
        )
    if role == config.ROLE_WORKER:
        port, cn, fingerprint = host.agent_port, host.name, host.worker_fingerprint
    else:
        cn = config.UPDATER_CN_PREFIX + host.name
        port, fingerprint = host.updater_port, host.updater_fingerprint
        if not fingerprint:
            raise PeerRefused(
                f"{host.name} was enrolled without an updater certificate; "
                "refusing to connect unpinned (re-enroll with --updater)"
            )
    if revocations is not None and fingerprint in revocations:
        raise PeerRefused(f"the {role} certificate of {host.name!r} is revoked")
    return PinnedClient(
        reactor,
        identity,
        address=host.address,
        port=port,
        accept=Accept(role, cn=cn, fingerprint=fingerprint),
        timeout=timeout,
        persistent=persistent,
    )
