"""``twistd decnet-enroll``: options and service construction.

    twistd decnet-enroll [--home DIR] [--listen tcp:8443:interface=0.0.0.0]
        [--port-file FILE] [--max-attempts 10] [--period 60]

Runs on the master, as the user that runs ``decnet-admin`` (it signs with the CA
key and writes the registry).
"""

from __future__ import annotations

from typing import ClassVar, cast

from twisted.application.service import IService
from twisted.python import usage

from decnet import config
from decnet.daemon import PORT_FILE_OPTION, DaemonOptions, keywords
from decnet.errors import DecnetError
from decnet.interfaces import IDecnetReactor
from decnet.master.enroll_limits import DEFAULT_BURST, DEFAULT_PERIOD
from decnet.options import positive_float, positive_int


class Options(DaemonOptions):
    endpoint_options = ("listen",)
    synopsis = "[--home DIR] [options]"
    longdesc = (
        "The DECNET token-enrollment service, on the master. A worker runs "
        "`decnet-worker join https://MASTER:8443 --token T --ca-fingerprint FP`: it makes its "
        "own keys and POSTs CSRs with the one-time token that `decnet-admin enroll NAME "
        "--address A --token` printed. This service checks the token (unknown, used or "
        "expired: 403), decides the certificates' subject, SANs, EKUs and role itself, signs, "
        "records the fingerprints in the registry and answers the certificates and "
        "bundle.json. It never sees a private key. TLS uses the master certificate with the "
        "CA in the chain; no client certificate is asked for.\n\n"
        "Examples:\n"
        "  twistd -n decnet-enroll --home /var/lib/decnet-master\n"
        "  twistd -n decnet-enroll --listen tcp:8443:interface=10.0.0.1 --max-attempts 20\n"
        "  twistd -n decnet-enroll --listen tcp:0:interface=127.0.0.1 --port-file /run/e.port"
    )
    optParameters: ClassVar[list] = [
        [
            "home",
            "H",
            None,
            f"master state directory (default: ${config.ENV_HOME} or {config.DEFAULT_HOME})",
        ],
        [
            "listen",
            "l",
            f"tcp:{config.ENROLL_PORT}:interface=0.0.0.0",
            "endpoint to listen on (TLS is added)",
        ],
        PORT_FILE_OPTION,
        [
            "max-attempts",
            None,
            DEFAULT_BURST,
            "enrollment attempts one source address may make per --period (429 beyond)",
            positive_int,
        ],
        [
            "period",
            None,
            DEFAULT_PERIOD,
            "seconds over which --max-attempts refill",
            positive_float,
        ],
    ]

    def postOptions(self) -> None:
        from decnet.master.enrollment import load_master
        from decnet.master.registry import Registry
        from decnet.tls import TLSIdentity

        paths = config.MasterPaths.resolve(self["home"])
        try:
            self["master"] = load_master(paths)
            self["identity"] = TLSIdentity.master(paths)
            Registry(paths.registry)  # migrated now, not at the first join
        except DecnetError as exc:
            raise usage.UsageError(
                f"unusable master home {paths.home}: {exc} (run `decnet-admin init` there first, "
                "or pass --home)"
            ) from None


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from decnet.master.enroll_limits import AttemptLimiter
    from decnet.master.enroll_service import EnrollService

    return EnrollService(
        cast(IDecnetReactor, reactor),  # (the global reactor provides them all)
        master=options["master"],
        identity=options["identity"],
        limiter=AttemptLimiter(options["max-attempts"], options["period"]),
        **keywords(options, "listen port-file"),
    )
