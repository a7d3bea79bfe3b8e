"""Shared plumbing for the worker HTTP APIs (agent and updater): Klein over mTLS.

* :class:`CappedRequest` refuses a body larger than the site's cap while it
  arrives (413 and close), so nobody can make a daemon buffer gigabytes.  Big
  bodies (release tarballs) spool to a temporary file, never to memory.
* :func:`authorize` narrows, per route, who may call: the TLS layer already
  refused strangers; routes then say which roles (and which exact CN) may call
  them.  Refusals are logged with the peer and reason; the body says only
  "forbidden".
* :class:`HTTPError` is the one way a handler refuses input; :func:`install_error_handlers`
  maps it (and any unexpected exception, as an opaque 500) to a JSON body
  ``{"problems": [...]}`` in one place.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from twisted.logger import Logger
from twisted.web import server
from werkzeug.exceptions import HTTPException

from decnet.pki import CertIdentity
from decnet.tls import Accept, PeerPolicy, peer_identity

log = Logger(namespace="decnet.httpapi")

JSON_TYPE = b"application/json"
DEFAULT_MAX_BODY = 1024 * 1024
DEFAULT_IDLE_TIMEOUT = 60


class HTTPError(Exception):
    """Refuse a request with ``status`` and a list of human-readable problems."""

    def __init__(self, status: int, problems: str | Iterable[str], **extra):
        self.status = status
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.extra = extra
        super().__init__(f"{status}: {'; '.join(self.problems)}")


def json_body(doc) -> bytes:
    return json.dumps(doc, sort_keys=True).encode() + b"\n"


def respond(request, doc, status: int = 200) -> bytes:
    """Set status and JSON content type; return the encoded body (return it from the route)."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", JSON_TYPE)
    request.setHeader(b"cache-control", b"no-store")
    return json_body(doc)


def read_json(request):
    """The request body as JSON; :class:`HTTPError` 400 if it is not."""
    request.content.seek(0)
    raw = request.content.read()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HTTPError(400, f"request body is not valid JSON: {exc}") from None


def peer_label(request) -> str:
    addr = request.getClientAddress()
    return f"{getattr(addr, 'host', '?')}:{getattr(addr, 'port', '?')}"


def authorize(request, *accept: Accept) -> CertIdentity:
    """Return the caller's identity if one of ``accept`` admits it, else :class:`HTTPError` 403."""
    identity = peer_identity(request.transport)
    reason = "no client certificate" if identity is None else PeerPolicy(accept).check(identity)
    if reason is not None:
        log.warn(
            "Refused {peer} on {method} {path}: {reason}",
            peer=peer_label(request),
            method=request.method.decode("ascii", "replace"),
            path=request.path.decode("ascii", "replace"),
            reason=reason,
        )
        raise HTTPError(403, "forbidden: this certificate may not call this route")
    return identity


def install_error_handlers(app) -> None:
    """Map :class:`HTTPError` to its status, a routing miss to 404/405, anything else to 500.

    Handlers an app registered before calling this take precedence (Klein tries
    them in order), so an app can, say, hide its route table from some callers.
    """

    @app.handle_errors(HTTPError)
    def _refused(request, failure):
        err = failure.value
        return respond(request, {"problems": err.problems, **err.extra}, err.status)

    @app.handle_errors(HTTPException)
    def _no_route(request, failure):
        err = failure.value
        return respond(request, {"problems": [err.name]}, err.code or 404)

    @app.handle_errors(Exception)
    def _crashed(request, failure):
        log.failure(
            "Unhandled error on {method} {path}",
            failure,
            method=request.method.decode("ascii", "replace"),
            path=request.path.decode("ascii", "replace"),
        )
        return respond(request, {"problems": ["internal error (see the daemon's log)"]}, 500)


class CappedRequest(server.Request):
    """A request whose body may not exceed ``max_body`` bytes (set per site)."""

    max_body = DEFAULT_MAX_BODY
    _body_bytes = 0
    _oversized = False

    def gotLength(self, length):
        if length is not None and length > self.max_body:
            super().gotLength(0)
            self._refuse_oversized(length)
            return
        super().gotLength(length)

    def handleContentChunk(self, data):
        if self._oversized:
            return
        self._body_bytes += len(data)
        if self._body_bytes > self.max_body:
            self._refuse_oversized(self._body_bytes)
            return
        super().handleContentChunk(data)

    def requestReceived(self, command, path, version):
        if not self._oversized:
            super().requestReceived(command, path, version)

    def _refuse_oversized(self, size: int) -> None:
        self._oversized = True
        log.warn(
            "Refused a {size}-byte request body from {peer} (limit {limit})",
            size=size,
            peer=peer_label(self),
            limit=self.max_body,
        )
        body = json_body({"problems": [f"request body larger than {self.max_body} bytes"]})
        self.channel.transport.write(
            b"HTTP/1.1 413 Payload Too Large\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
        )
        self.channel.transport.loseConnection()


def make_site(
    resource,
    *,
    max_body: int = DEFAULT_MAX_BODY,
    timeout: float = DEFAULT_IDLE_TIMEOUT,
    request_class: type[CappedRequest] = CappedRequest,
    reactor=None,
) -> server.Site:
    """A ``Site`` with a body cap, an idle timeout and no tracebacks in responses."""
    capped = type("Capped" + request_class.__name__, (request_class,), {"max_body": max_body})
    site = server.Site(resource, requestFactory=capped, timeout=timeout, reactor=reactor)
    site.displayTracebacks = False
    return site
