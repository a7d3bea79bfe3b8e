"""The updater's HTTP API (Klein over mTLS): thin handlers over the domain ``Updater``.

=====================  =====================  ==========================================
route                  who                    what
=====================  =====================  ==========================================
``GET /health``        master, this host's    the updater's own version and release
                       worker and updater
``GET /releases``      master                 installed releases, which is current
``POST /update``       master                 body: the tarball; ``?sha256=<hex>``
``POST /rollback``     master                 ``{"to": "<id>"}`` or empty: the previous
``POST /update-self``  master                 body: the tarball; ``?sha256=<hex>``
=====================  =====================  ==========================================

The TLS layer already refused every other certificate (foreign CA, another
host's identities, an unpinned master).  Uploads are hashed while they arrive
(:class:`UploadRequest`), so the sha256 is known, and compared, before a single
byte of the archive is parsed; a body larger than a few KiB from anyone but the
master is refused while it arrives, before it is spooled.

Domain errors map to HTTP here and nowhere else (:func:`install_update_errors`).
"""

from __future__ import annotations

import hashlib

from klein import Klein
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from decnet import config
from decnet.errors import UpdateError, ValidationError
from decnet.httpapi import (
    CappedRequest,
    HTTPError,
    authorize,
    install_error_handlers,
    json_body,
    peer_label,
    read_json,
    respond,
)
from decnet.tls import Accept, PeerPolicy, peer_identity
from decnet.updater.engine import Updater, Upload

log = Logger(namespace="decnet.updater.app")


class UploadRequest(CappedRequest):
    """A capped request that hashes its body as it arrives.

    ``uploaders`` (set per site) lists who may send a body larger than
    ``small_body``; anyone else is refused with 403 as soon as the headers (or
    the first chunks) show a large body, so a non-master cannot make the
    updater spool hundreds of MiB before the route refuses it.
    """

    uploaders: tuple[Accept, ...] = ()
    small_body = config.MAX_SMALL_BODY
    _checked_uploader = False

    def gotLength(self, length):
        self.body_sha256 = hashlib.sha256()
        self.body_size = 0
        super().gotLength(length)
        if not self._oversized and length is not None and length > self.small_body:
            self._check_uploader(length)

    def handleContentChunk(self, data):
        if self._oversized:
            return
        if self.body_size + len(data) > self.small_body and not self._checked_uploader:
            self._check_uploader(self.body_size + len(data))
            if self._oversized:
                return
        self.body_size += len(data)
        self.body_sha256.update(data)
        super().handleContentChunk(data)

    def _check_uploader(self, size: int) -> None:
        self._checked_uploader = True
        identity = peer_identity(self.channel.transport)
        reason = (
            "no client certificate"
            if identity is None
            else PeerPolicy(self.uploaders or [Accept("master")]).check(identity)
        )
        if reason is None:
            return
        self._oversized = True  # suppresses the rest of the body and the route, like a 413
        log.warn(
            "Refused a {size}-byte upload from {peer}: {reason}",
            size=size,
            peer=peer_label(self),
            reason=reason,
        )
        body = json_body({"problems": ["forbidden: this certificate may not upload"]})
        self.channel.transport.write(
            b"HTTP/1.1 403 Forbidden\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
        )
        self.channel.transport.loseConnection()


def shielded(coro) -> defer.Deferred:
    """Run ``coro`` to completion even if the client goes away.

    Klein cancels a route's Deferred when the connection drops; an update must
    not stop half-way because the master's connection did (the journal would
    repair it, but there is no reason to make it).
    """
    inner = defer.ensureDeferred(coro)
    outer: defer.Deferred = defer.Deferred()

    def done(result):
        if not outer.called:
            outer.callback(result)
        elif isinstance(result, Failure) and not result.check(UpdateError):
            log.failure("Operation failed after its client went away", result)
        return None

    inner.addBoth(done)
    return outer


def install_update_errors(app: Klein) -> None:
    """Map domain errors to HTTP (first registered wins, so call before the generic ones)."""

    @app.handle_errors(UpdateError)
    def _update_error(request, failure):
        err = failure.value
        doc = {"result": err.result, "problems": [str(err)], **err.details}
        return respond(request, doc, err.status)

    @app.handle_errors(ValidationError)
    def _invalid(request, failure):
        return respond(request, {"problems": failure.value.problems}, 400)


def _query(request, name: str) -> str | None:
    values = request.args.get(name.encode())
    return values[0].decode("ascii", "replace") if values else None


def build_app(updater: Updater, *, master: Accept, local: tuple[Accept, ...] = ()) -> Klein:
    """The Klein app for one :class:`Updater`; ``master`` is the pinned master rule.

    ``local`` are the other certificates admitted on ``GET /health`` (this
    host's own worker and updater identities, for local monitoring).
    """
    app = Klein()
    install_update_errors(app)
    install_error_handlers(app)

    def upload_of(request) -> Upload:
        size = getattr(request, "body_size", 0)
        if size == 0:
            raise HTTPError(400, "the request body must be the release tarball")
        return Upload(file=request.content, sha256=request.body_sha256.hexdigest(), size=size)

    @app.route("/health", methods=["GET"])
    def health(request):
        authorize(request, master, *local)
        return respond(request, updater.health())

    @app.route("/releases", methods=["GET"])
    async def releases(request):
        authorize(request, master)
        return respond(request, await updater.releases())

    @app.route("/update", methods=["POST"])
    async def update(request):
        authorize(request, master)
        upload = upload_of(request)
        result = await shielded(updater.update(upload, _query(request, "sha256")))
        return respond(request, result)

    @app.route("/rollback", methods=["POST"])
    async def rollback(request):
        authorize(request, master)
        to = _query(request, "to")
        if to is None and getattr(request, "body_size", 0):
            if request.body_size > config.MAX_SMALL_BODY:
                raise HTTPError(413, "a rollback request is a small JSON object")
            doc = read_json(request)
            if not isinstance(doc, dict) or not isinstance(doc.get("to"), str | None):
                raise HTTPError(400, 'expected {"to": "<release id>"} or an empty body')
            to = doc.get("to") or None
        result = await shielded(updater.rollback(to))
        return respond(request, result)

    @app.route("/update-self", methods=["POST"])
    async def update_self(request):
        authorize(request, master)
        upload = upload_of(request)
        result = await shielded(updater.update_self(upload, _query(request, "sha256")))
        updater.restart_after(request.notifyFinish())
        return respond(request, result, 202)

    return app
