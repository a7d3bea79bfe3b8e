"""Shared plumbing for the worker HTTP APIs (agent and updater): Klein over mTLS.

twisted.web's model, used as it is meant to be: a ``Site`` builds one
:class:`LimitedRequest` per request, the request receives the body, and the
Klein resource renders it.  On top of that:

* **Typed body limits, before any handler.**  A site has one :class:`BodyLimits`;
  the request checks the announced length as soon as the headers are in and the
  running size at every chunk.  A refused body (413, or 403 for a large body from
  a certificate that may not upload) is answered and the connection closed
  without reading the rest.  Big bodies (release tarballs) spool to a temporary
  file, never to memory, and are hashed as they arrive: handlers read what
  arrived through :func:`body_of`.
* **Who may call a route** (:func:`authorize`): the TLS layer already refused
  strangers; routes then say which roles (and which exact CN) may call them.
  Refusals are logged with the peer and reason; the body says only "forbidden".
* **One mapping from typed errors to HTTP** (:func:`problem_of`): a handler's
  :class:`HTTPError`, the domain errors of :mod:`decnet.errors`, a routing miss
  and a refused body all become ``{"problems": [...]}`` with their status here,
  and nowhere else; anything unexpected is an opaque 500 (logged, never echoed).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import attrs
from klein import Klein
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.exceptions import HTTPException

from decnet import config
from decnet.errors import UnknownDecky, UpdateError, ValidationError
from decnet.pki import CertIdentity
from decnet.tls import Accept, PeerPolicy, peer_identity

log = Logger(namespace="decnet.httpapi")

JSON_TYPE = b"application/json"
DEFAULT_MAX_BODY = 1024 * 1024
DEFAULT_IDLE_TIMEOUT = 60
NO_CERTIFICATE = "no client certificate"


class HTTPError(Exception):
    """Refuse a request with ``status`` and a list of human-readable problems."""

    def __init__(self, status: int, problems: str | Iterable[str], **extra: object):
        self.status = status
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.extra = extra
        super().__init__(f"{status}: {'; '.join(self.problems)}")


class BodyRefused(HTTPError):
    """A request body broke its site's :class:`BodyLimits` (``reason`` is for the log)."""

    def __init__(self, status: int, problem: str, size: int, reason: str):
        super().__init__(status, problem)
        self.size = size
        self.reason = reason


class BodyTooLarge(BodyRefused):
    """Larger than anyone may send: 413."""

    def __init__(self, size: int, limit: int):
        problem = f"request body larger than {limit} bytes"
        super().__init__(413, problem, size, f"over the limit of {limit} bytes")


class UploadForbidden(BodyRefused):
    """A large body from a certificate that may not upload: 403."""

    def __init__(self, size: int, why: str):
        super().__init__(403, "forbidden: this certificate may not upload", size, why)


def refusal_for(identity: CertIdentity | None, accept: Sequence[Accept]) -> str | None:
    """Why ``identity`` is not one of ``accept`` (``None``: it is)."""
    if identity is None:
        return NO_CERTIFICATE
    refusal = PeerPolicy(accept).check(identity)
    return None if refusal is None else refusal.detail


@attrs.frozen
class BodyLimits:
    """How large a request body may be on one site, checked while it arrives.

    ``max_size`` bounds every body (413 above it).  When ``large_senders`` is
    set, a body larger than ``small_size`` is refused (403) to any certificate
    it does not admit, so nobody but the master can make the updater spool
    hundreds of MiB before a route would refuse them.
    """

    max_size: int = DEFAULT_MAX_BODY
    small_size: int = config.MAX_SMALL_BODY
    large_senders: tuple[Accept, ...] = ()

    def refusal(self, size: int, sender: Callable[[], CertIdentity | None]) -> BodyRefused | None:
        """Why a body of ``size`` bytes (announced, or arrived so far) is refused, if it is.

        ``sender()`` gives the caller's identity; it is asked only for a large body.
        """
        if size > self.max_size:
            return BodyTooLarge(size, self.max_size)
        if not self.large_senders or size <= self.small_size:
            return None
        why = refusal_for(sender(), self.large_senders)
        return None if why is None else UploadForbidden(size, why)


class RequestBody:
    """What has arrived of a request body: its size and its sha256 (the bytes are in
    ``request.content``), counted as it arrives."""

    def __init__(self) -> None:
        self.size = 0
        self._sha256 = hashlib.sha256()

    def add(self, data: bytes) -> None:
        self.size += len(data)
        self._sha256.update(data)

    @property
    def sha256(self) -> str:
        return self._sha256.hexdigest()


@attrs.frozen
class Problem:
    """An error as the client sees it: a status and a JSON document."""

    status: int
    doc: dict[str, Any]


INTERNAL_ERROR = Problem(500, {"problems": ["internal error (see the daemon's log)"]})

# The one mapping from typed errors to HTTP; the first matching type wins.
_PROBLEMS: tuple[tuple[type[BaseException], Callable[[Any], Problem]], ...] = (
    (HTTPError, lambda e: Problem(e.status, {"problems": e.problems, **e.extra})),
    (
        UpdateError,
        lambda e: Problem(e.status, {"result": e.result, "problems": [str(e)], **e.details}),
    ),
    (ValidationError, lambda e: Problem(400, {"problems": e.problems})),
    (UnknownDecky, lambda e: Problem(404, {"problems": [str(e)]})),
    (HTTPException, lambda e: Problem(e.code or 404, {"problems": [e.name]})),
)


def problem_of(error: BaseException) -> Problem | None:
    """What the client is told about ``error``; ``None`` for an unexpected one (a bug)."""
    for kind, render in _PROBLEMS:
        if isinstance(error, kind):
            return render(error)
    return None


def json_body(doc: object) -> bytes:
    return json.dumps(doc, sort_keys=True).encode() + b"\n"


def respond(request: server.Request, doc: object, status: int = 200) -> bytes:
    """Set status and JSON content type; return the encoded body (return it from the route)."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", JSON_TYPE)
    request.setHeader(b"cache-control", b"no-store")
    return json_body(doc)


def read_json(request: server.Request) -> Any:
    """The request body as JSON; :class:`HTTPError` 400 if it is not."""
    content = request.content
    raw = b""
    if content is not None:
        content.seek(0)
        raw = content.read()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HTTPError(400, f"request body is not valid JSON: {exc}") from None


def peer_label(request: server.Request) -> str:
    addr = request.getClientAddress()
    return f"{getattr(addr, 'host', '?')}:{getattr(addr, 'port', '?')}"


def authorize(request: server.Request, *accept: Accept) -> CertIdentity:
    """Return the caller's identity if one of ``accept`` admits it, else :class:`HTTPError` 403."""
    identity = peer_identity(request.transport)
    reason = refusal_for(identity, accept)
    if reason is not None or identity is None:
        log.warn(
            "Refused {peer} on {method} {path}: {reason}",
            peer=peer_label(request),
            method=request.method.decode("ascii", "replace"),
            path=request.path.decode("ascii", "replace"),
            reason=reason,
        )
        raise HTTPError(403, "forbidden: this certificate may not call this route")
    return identity


def install_error_handlers(app: Klein, *, routes_shown_to: Sequence[Accept] = ()) -> None:
    """Render every error of ``app``'s handlers through :func:`problem_of`.

    A routing miss is 404/405; with ``routes_shown_to``, only those callers
    learn that (everyone else gets the 403 of :func:`authorize`).  Anything
    :func:`problem_of` does not know is a bug: logged, and an opaque 500.
    """

    @app.handle_errors(Exception)
    def _problem(request: IRequest, failure: Failure) -> bytes:
        web_request = cast(server.Request, request)  # Klein on a twisted.web Site
        problem = _problem_for(web_request, failure.value, routes_shown_to)
        if problem is None:
            log.failure(
                "Unhandled error on {method} {path}",
                failure,
                method=web_request.method.decode("ascii", "replace"),
                path=web_request.path.decode("ascii", "replace"),
            )
            problem = INTERNAL_ERROR
        return respond(web_request, problem.doc, problem.status)


def _problem_for(
    request: server.Request, error: BaseException, routes_shown_to: Sequence[Accept]
) -> Problem | None:
    if isinstance(error, HTTPException) and routes_shown_to:
        try:
            authorize(request, *routes_shown_to)
        except HTTPError as refused:
            return problem_of(refused)
    return problem_of(error)


class LimitedRequest(server.Request):
    """A request whose body is held to its site's :class:`BodyLimits` while it arrives.

    A refused body is answered at once, rendered by :func:`problem_of` like any
    handler's error, and the connection closed: the rest of the body is never
    stored, the route never runs, and a peer that goes on sending anyway is cut
    off after the channel's ``abortTimeout``.
    """

    def __init__(self, *args: Any, limits: BodyLimits, **kw: Any):
        super().__init__(*args, **kw)
        self.limits = limits
        self.body = RequestBody()
        self.refused: BodyRefused | None = None
        self._abort_call: IDelayedCall | None = None

    def gotLength(self, length: int | None) -> None:
        refusal = None if length is None else self.limits.refusal(length, self._sender)
        super().gotLength(0 if refusal is not None else length)
        if refusal is not None:
            self._refuse(refusal)

    def handleContentChunk(self, data: bytes) -> None:
        if self.refused is not None:
            return
        refusal = self.limits.refusal(self.body.size + len(data), self._sender)
        if refusal is not None:
            self._refuse(refusal)
            return
        self.body.add(data)
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self.refused is None:
            super().requestReceived(command, path, version)

    def connectionLost(self, reason: Failure) -> None:
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        super().connectionLost(reason)

    def _sender(self) -> CertIdentity | None:
        return peer_identity(self.channel.transport)

    def _refuse(self, refusal: BodyRefused) -> None:
        self.refused = refusal
        log.warn(
            "Refused a {size}-byte request body from {peer}: {reason}",
            peer=peer_label(self),
            size=refusal.size,
            reason=refusal.reason,
            status=refusal.status,
        )
        problem = problem_of(refusal) or INTERNAL_ERROR
        body = respond(self, problem.doc, problem.status)
        # The request line is not handed over before the whole body has arrived,
        # and this answer cannot wait for it: it speaks HTTP/1.1.
        self.clientproto = b"HTTP/1.1"
        self.setHeader(b"content-length", b"%d" % len(body))
        self.setHeader(b"connection", b"close")
        self.write(body)
        self.loseConnection()
        channel = self.channel
        self._abort_call = channel.callLater(channel.abortTimeout, channel.forceAbortClient)


def body_of(request: server.Request) -> RequestBody:
    """What arrived of ``request``'s body (a request of a :func:`make_site` site)."""
    if not isinstance(request, LimitedRequest):
        raise TypeError(f"{request!r} was not received through make_site()")
    return request.body


def make_site(
    resource: IResource,
    *,
    limits: BodyLimits = BodyLimits(),
    timeout: float = DEFAULT_IDLE_TIMEOUT,
    reactor: IReactorTime | None = None,
) -> server.Site:
    """A ``Site`` with typed body limits, an idle timeout and no tracebacks in responses."""
    factory = functools.partial(LimitedRequest, limits=limits)
    site = server.Site(resource, requestFactory=factory, timeout=timeout, reactor=reactor)
    site.displayTracebacks = False
    return site
