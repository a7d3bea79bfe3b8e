"""The agent's HTTP API (Klein): thin handlers over :class:`~decnet.agent.controller.Controller`.

Authorization is decided per route, on every route, from the TLS peer
certificate (``docs/Agent.md`` has the table):

============================  =============================================
route                         who may call it
============================  =============================================
``GET /health``               the master (pinned fingerprint); this host's
                              updater (``updater@<host>``)
``GET /status``               the master
``POST /deploy``              the master
``POST /teardown``            the master
anything else                 the master (404/405); others get 403
============================  =============================================

The TLS layer already refuses every other certificate during the handshake;
the per-route checks make each route's rule explicit and keep ``/deploy`` out
of the updater's reach.  Domain errors map to HTTP in one place for both
daemons (:func:`decnet.httpapi.problem_of`); internal errors are never echoed.
Bodies are capped by :data:`LIMITS` before any handler runs.
"""

from __future__ import annotations

from klein import Klein

from decnet import config
from decnet.agent.controller import Controller
from decnet.agent.spec import DECKY_NAME_RE
from decnet.httpapi import (
    BodyLimits,
    HTTPError,
    authorize,
    install_error_handlers,
    read_json,
    respond,
)
from decnet.tls import Accept

# A deployment spec is small: anything bigger is refused while it arrives.
LIMITS = BodyLimits(max_size=config.AGENT_MAX_BODY)


def master_accept(master_fingerprint: str) -> Accept:
    return Accept(config.ROLE_MASTER, cn=config.MASTER_CN, fingerprint=master_fingerprint)


def updater_accept(host: str) -> Accept:
    return Accept(config.ROLE_UPDATER, cn=config.UPDATER_CN_PREFIX + host)


def make_app(controller: Controller, *, host: str, master_fingerprint: str) -> Klein:
    app = Klein()
    master = master_accept(master_fingerprint)
    updater = updater_accept(host)

    @app.route("/health", methods=["GET"])
    def health(request):
        authorize(request, master, updater)
        return respond(request, controller.health())

    @app.route("/status", methods=["GET"])
    def status(request):
        authorize(request, master)
        return respond(request, controller.status())

    @app.route("/deploy", methods=["POST"])
    async def deploy(request):
        authorize(request, master)
        return respond(request, await controller.deploy(read_json(request)))

    @app.route("/teardown", methods=["POST"])
    async def teardown(request):
        authorize(request, master)
        request.content.seek(0)
        doc = read_json(request) if request.content.read(1) else {}
        if not isinstance(doc, dict) or set(doc) - {"decky"}:
            raise HTTPError(400, 'expected an empty body or {"decky": NAME}')
        decky = doc.get("decky")
        if decky is not None and (not isinstance(decky, str) or not DECKY_NAME_RE.fullmatch(decky)):
            raise HTTPError(400, "decky: must be a decky name")
        return respond(request, await controller.teardown(decky))

    # Only the master learns which routes exist.
    install_error_handlers(app, routes_shown_to=(master,))
    return app
