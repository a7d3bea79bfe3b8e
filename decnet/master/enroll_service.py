"""``twistd decnet-enroll``: the master's token-enrollment service (Klein over TLS).

One route, ``POST /enroll``, body ``{"token": T, "csrs": {"worker": PEM, "updater": PEM}}``.
The answer is ``{"certificates": {role: PEM}, "ca": PEM, "bundle": {...}}``:
everything the worker needs next to the keys it made itself.

* TLS with the master's own certificate and the CA in the chain; the worker
  checks the CA by the fingerprint the operator gave it.  No client
  certificate is asked for: the token is the credential.
* Per source address (an IPv6 one by its /64), at most ``burst`` attempts per
  ``period`` (429 beyond,
  :class:`~decnet.master.enroll_limits.AttemptLimiter`), counted before the body
  is even parsed; bodies over :data:`MAX_BODY` are refused while they arrive (413);
  a connection idle for :data:`IDLE_TIMEOUT` seconds is closed.
* Refusals (400, 403, 429) are one warning line with the peer and the reason,
  until a flood: then one summary line per interval (the listener's
  :class:`~decnet.listener.admission.RefusalLog`); the token is never logged.
* SQLite and signing run off the reactor, one join at a time in this process
  (:func:`decnet.threads.serial_runner`); the registry's lock and SQLite's
  write lock order them against ``decnet-admin`` in other processes.
"""

from __future__ import annotations

import os
from typing import Any, cast

from klein import Klein
from twisted.application.service import MultiService
from twisted.internet import ssl
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import server

from decnet.daemon import TLSPortService
from decnet.errors import EnrollmentRefused, ValidationError
from decnet.httpapi import (
    BodyLimits,
    HTTPError,
    install_error_handlers,
    make_site,
    peer_label,
    read_json,
    respond,
)
from decnet.interfaces import IDecnetReactor
from decnet.listener.admission import RefusalLog, address_key
from decnet.master.enroll_limits import AttemptLimiter
from decnet.master.enroll_tokens import redeem
from decnet.master.enrollment import MasterState
from decnet.master.registry import Registry
from decnet.systemd import SystemdService
from decnet.threads import Runner, serial_runner
from decnet.tls import AEAD_CIPHERS, TLSIdentity

log = Logger(namespace="decnet.enroll")

#: Two CSRs and a token fit in a few KiB; anything larger is not a join.
MAX_BODY = 64 * 1024
LIMITS = BodyLimits(max_size=MAX_BODY)
#: A join is one request of a few KiB: a connection idle this long is closed (slowloris).
IDLE_TIMEOUT = 15.0


def server_options(identity: TLSIdentity) -> ssl.CertificateOptions:
    """The master's certificate, with the CA certificate in the chain; no client certificate."""
    return ssl.CertificateOptions(
        privateKey=cast(Any, identity.key),
        certificate=cast(Any, identity.cert),
        extraCertChain=[cast(Any, identity.ca.to_cryptography())],
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        acceptableCiphers=AEAD_CIPHERS,
    )


class Enroller:
    """The domain side of ``POST /enroll``: rate limit, then redeem off the reactor."""

    def __init__(
        self,
        master: MasterState,
        registry: Registry,
        *,
        clock: IReactorTime,
        run: Runner,
        limiter: AttemptLimiter,
    ):
        self.master = master
        self.registry = registry
        self.clock = clock
        self.run = run
        self.limiter = limiter
        # A scanner's flood of refusals is summed up, not logged line by line.
        self.refusals = RefusalLog(
            clock,
            each="Refused enrollment from {peer} ({kind}): {reason}",
            more="Refused {count} more enrollment attempts",
        )

    def admit(self, source: str) -> None:
        """:class:`HTTPError` 429 when ``source`` has used up its attempts."""
        key = address_key(source)  # an IPv6 source counts by its /64
        if self.limiter.allow(key, self.clock.seconds()):
            return
        wait = max(1, round(self.limiter.retry_after(key)))
        raise HTTPError(
            429, f"too many enrollment attempts from {source}; retry in {wait} s", retry_after=wait
        )

    async def join(self, doc: object) -> dict[str, object]:
        if not isinstance(doc, dict):
            raise HTTPError(400, 'expected {"token": ..., "csrs": {...}}')
        try:
            joined = await self.run(
                redeem, self.master, self.registry, doc.get("token"), doc.get("csrs")
            )
        except EnrollmentRefused as exc:
            raise HTTPError(403, str(exc)) from None
        log.info(
            "Enrolled {name} ({address}): worker {worker_fp}, updater {updater_fp}",
            name=joined.host.name,
            address=joined.host.address,
            worker_fp=joined.host.worker_fingerprint[:16],
            updater_fp=(joined.host.updater_fingerprint or "-")[:16],
        )
        return joined.as_reply()


def make_app(enroller: Enroller) -> Klein:
    app = Klein()

    @app.route("/enroll", methods=["POST"])
    async def enroll(request: server.Request) -> bytes:
        peer = peer_label(request)
        source = getattr(request.getClientAddress(), "host", "?")
        try:
            enroller.admit(source)
            reply = await enroller.join(read_json(request))
        except (HTTPError, ValidationError) as exc:
            status = exc.status if isinstance(exc, HTTPError) else 400
            enroller.refusals.refused(
                str(status), address_key(source), peer, "; ".join(exc.problems)
            )
            if isinstance(exc, HTTPError) and "retry_after" in exc.extra:
                request.setHeader(b"retry-after", b"%d" % cast(int, exc.extra["retry_after"]))
            raise
        return respond(request, reply)

    install_error_handlers(app)
    return app


class EnrollService(MultiService):
    """Everything ``twistd decnet-enroll`` runs: the TLS port and its Klein site."""

    def __init__(
        self,
        reactor: IDecnetReactor,
        *,
        master: MasterState,
        identity: TLSIdentity,
        listen: str,
        port_file: str | os.PathLike | None = None,
        limiter: AttemptLimiter | None = None,
        clock: IReactorTime | None = None,
    ):
        super().__init__()
        self.enroller = Enroller(
            master,
            Registry(master.paths.registry),
            clock=clock or reactor,
            run=serial_runner(reactor),
            limiter=limiter if limiter is not None else AttemptLimiter(),
        )
        site = make_site(
            make_app(self.enroller).resource(),
            limits=LIMITS,
            timeout=IDLE_TIMEOUT,
            reactor=reactor,
        )
        self.api = TLSPortService(
            reactor,
            listen,
            server_options(identity),
            site,
            port_file=port_file,
            label="token enrollment",
        )
        self.api.setServiceParent(self)
        self.systemd = SystemdService(reactor)
        self.systemd.setServiceParent(self)

    def startService(self) -> None:
        super().startService()
        self.systemd.ready(f"token enrollment on {self.api.description}")
