"""The updater's HTTP API (Klein over mTLS): thin handlers over the domain ``Updater``.

=====================  =====================  ==========================================
route                  who                    what
=====================  =====================  ==========================================
``GET /health``        master, this host's    the updater's own version and release
                       worker and updater
``GET /releases``      master                 installed releases, which is current
``GET /wheels``        master                 stored dependency wheels and environments
``POST /update``       master                 body: the tarball; ``?sha256=<hex>``
``POST /rollback``     master                 ``{"to": "<id>"}`` or empty: the previous
``POST /update-self``  master                 body: the tarball; ``?sha256=<hex>``
``POST /listeners``    master                 ``{"listeners": ["HOST:PORT", ...]}``:
                                              replaces only the listener list of this
                                              host's bundle.json (the forwarder reloads it)
``POST /renew/csr``    master                 CSRs for new keys made on this worker
``POST /renew/install``  master               ``{"certificates": {"worker": PEM, ...}}``
``POST /forwarder/stop``  master               stop the forwarder's unit (decommission)
=====================  =====================  ==========================================

The TLS layer already refused every other certificate (foreign CA, another
host's identities, an unpinned master).  Uploads are hashed while they arrive
(:func:`decnet.httpapi.body_of`), so the sha256 is known, and compared, before a
single byte of the archive is parsed; a body larger than a few KiB from anyone
but the master is refused while it arrives, before it is spooled
(:func:`upload_limits`).

Domain errors (``UpdateError`` and its status) map to HTTP in one place for
both daemons, :func:`decnet.httpapi.problem_of`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from klein import Klein
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from decnet import config, pki
from decnet.errors import UpdateError, ValidationError
from decnet.httpapi import (
    BodyLimits,
    HTTPError,
    authorize,
    body_of,
    install_error_handlers,
    read_json,
    respond,
)
from decnet.threads import Runner, inline_runner
from decnet.tls import Accept
from decnet.updater.engine import Updater, Upload
from decnet.updater.renewal import Renewer

log = Logger(namespace="decnet.updater.app")


def upload_limits(master: Accept, max_upload: int) -> BodyLimits:
    """Bodies up to ``max_upload`` bytes from the pinned master, a few KiB from anyone else.

    A large body from another certificate is refused (403) while it arrives,
    before it is spooled.
    """
    return BodyLimits(max_size=max_upload, large_senders=(master,))


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


def _query(request, name: str) -> str | None:
    values = request.args.get(name.encode())
    return values[0].decode("ascii", "replace") if values else None


def _small_json(request) -> object:
    if body_of(request).size > config.MAX_SMALL_BODY:
        raise HTTPError(413, "expected a small JSON object")
    return read_json(request)


def build_app(
    updater: Updater,
    *,
    master: Accept,
    local: tuple[Accept, ...] = (),
    bundle_dir: Path | None = None,
    run: Runner = inline_runner,
    renewer: Renewer | None = None,
    stop_forwarder: Callable[[], Awaitable[list[str] | None]] | None = None,
) -> Klein:
    """The Klein app for one :class:`Updater`; ``master`` is the pinned master rule.

    ``local`` are the other certificates admitted on ``GET /health`` (this
    host's own worker and updater identities, for local monitoring).
    ``bundle_dir`` is this host's bundle, whose listener list ``POST /listeners``
    replaces (without it the route answers 404), in a thread of ``run``.
    ``stop_forwarder`` stops this host's forwarder (``POST /forwarder/stop``, for
    ``decnet-admin decommission``); it answers ``None`` when this updater does not
    run the forwarder (``--agent-control spawn``).
    """
    app = Klein()
    install_error_handlers(app)

    def upload_of(request) -> Upload:
        body = body_of(request)
        if body.size == 0:
            raise HTTPError(400, "the request body must be the release tarball")
        return Upload(file=request.content, sha256=body.sha256, size=body.size)

    @app.route("/health", methods=["GET"])
    def health(request):
        authorize(request, master, *local)
        return respond(request, updater.health())

    @app.route("/releases", methods=["GET"])
    async def releases(request):
        authorize(request, master)
        return respond(request, await updater.releases())

    @app.route("/wheels", methods=["GET"])
    async def wheels(request):
        authorize(request, master)
        return respond(request, await updater.wheels())

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
        size = body_of(request).size
        if to is None and size:
            if size > config.MAX_SMALL_BODY:
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

    @app.route("/listeners", methods=["POST"])
    async def listeners(request):
        authorize(request, master)
        if bundle_dir is None:
            raise HTTPError(404, "this updater was started without a bundle to refresh")
        doc = _small_json(request)
        if not isinstance(doc, dict) or set(doc) != {"listeners"}:
            raise HTTPError(400, 'expected {"listeners": ["HOST:PORT", ...]}')
        try:
            pki.validate_listeners(doc["listeners"])
        except ValidationError as exc:
            raise HTTPError(400, exc.problems) from None
        try:
            listed, changed = await run(pki.replace_bundle_listeners, bundle_dir, doc["listeners"])
        except OSError as exc:
            log.warn("Cannot replace the bundle's listener list: {error}", error=str(exc))
            raise HTTPError(
                500,
                f"cannot replace bundle.json ({exc.strerror or exc}): the updater needs write "
                "access to the bundle directory (docs/SWARM-Mode.md, Several listeners)",
            ) from None
        log.info(
            "Listener list of the bundle {changed}: {listeners}",
            changed="replaced" if changed else "unchanged",
            listeners=", ".join(listed),
        )
        return respond(request, {"listeners": listed, "changed": changed})

    @app.route("/renew/csr", methods=["POST"])
    async def renew_csr(request):
        authorize(request, master)
        if renewer is None:
            raise HTTPError(404, "certificate renewal is not enabled on this updater")
        return respond(request, await shielded(renewer.csrs()))

    @app.route("/renew/install", methods=["POST"])
    async def renew_install(request):
        authorize(request, master)
        if renewer is None:
            raise HTTPError(404, "certificate renewal is not enabled on this updater")
        doc = _small_json(request)
        certificates = doc.get("certificates") if isinstance(doc, dict) else None
        return respond(request, await shielded(renewer.install(certificates)))

    @app.route("/forwarder/stop", methods=["POST"])
    async def forwarder_stop(request):
        authorize(request, master)
        stopped = await shielded(stop_forwarder()) if stop_forwarder is not None else None
        if stopped is None:
            return respond(request, {"result": "not_managed", "units": []})
        log.info("Stopped {units} at the master's request", units=", ".join(stopped) or "nothing")
        return respond(request, {"result": "stopped", "units": stopped})

    return app
