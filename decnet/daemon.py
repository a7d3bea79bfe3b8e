"""Pieces every DECNET daemon shares: its options' start-up errors, its identity, its TLS
port and its port file.

Every ``tap.py``'s ``Options`` derives from :class:`DaemonOptions`, the one place
that decides how ``twistd decnet-*`` reports a bad command line (one line on
stderr, exit 2, never the whole ``--help``), checks endpoint options (a
``--listen bogus:endpoint`` is a usage error, not a traceback) and answers
``--version`` with DECNET's version.

Every ``tap.py`` loads its identity in ``postOptions`` (:func:`load_bundle`), so
a bad bundle is one usage line, never a traceback from ``makeService``.

A daemon must not run without the port it exists for: :class:`TLSPortService`
binds in ``privilegedStartService`` and raises if it cannot, which makes
``twistd`` exit non-zero before the reactor runs (so systemd's
``Restart=on-failure`` and the tests see a failure, not a silent daemon).
Once bound, it writes the port to ``--port-file`` (:data:`PORT_FILE_OPTION`):
how tests and the sandbox learn the port of ``tcp:0`` without racing for one.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, NoReturn

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from decnet import __version__, config
from decnet.errors import DecnetError
from decnet.fsutil import atomic_write
from decnet.interfaces import IDecnetReactor
from decnet.pki import WorkerBundle
from decnet.tls import TLSIdentity, listen_tls

USAGE_ERROR = 2  # the exit code of a bad command line (as argparse's)
START_FAILED = 1  # the exit code of a daemon that could not start (a port in use)


def check_endpoint(description: str) -> None:
    """Refuse a server endpoint string Twisted cannot parse (``bogus:endpoint``,
    ``tcp:notaport``) with a :class:`usage.UsageError` naming it.  Nothing is bound:
    the endpoint object is only built (``systemd:`` ones, whose descriptors exist only
    under systemd, are left to start-up)."""
    if description.startswith("systemd:"):
        return
    try:
        serverFromString(None, description)
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise usage.UsageError(
            f"{description!r} is not an endpoint DECNET can listen on ({exc}); "
            "e.g. tcp:PORT:interface=ADDRESS"
        ) from None


class DaemonOptions(usage.Options):
    """The base of every daemon's ``Options``: how ``twistd decnet-*`` starts up.

    Under ``twistd`` (``self.parent`` is twistd's own options) a usage error is one
    line on stderr and exit code :data:`USAGE_ERROR` (twistd itself would print the
    whole ``--help`` first and exit 1).  Parsed directly (tests), it stays a
    :class:`usage.UsageError`.  ``endpoint_options`` name the options holding a
    server endpoint string, checked once ``postOptions`` has filled in defaults.
    """

    endpoint_options: ClassVar[tuple[str, ...]] = ()

    def opt_version(self) -> NoReturn:
        """Print DECNET's version and exit"""
        print(f"{self._command()} (DECNET) {__version__}")
        sys.exit(0)

    def _command(self) -> str:
        name = getattr(getattr(self, "parent", None), "subCommand", None)
        return f"twistd {name}" if name else "twistd"

    def parseOptions(self, options: list[str] | None = None) -> None:
        try:
            super().parseOptions(options)
            for name in self.endpoint_options:
                if self[name]:
                    check_endpoint(self[name])
        except usage.UsageError as exc:
            if getattr(self, "parent", None) is None:
                raise
            command = self._command()
            sys.stderr.write(f"{command}: error: {exc} (see `{command} --help`)\n")
            sys.stderr.flush()
            sys.exit(USAGE_ERROR)


def absolute_path(value: str) -> Path:
    """An option's path, made absolute while the working directory is still the caller's."""
    return Path(value).absolute()


# One ``optParameters`` row, the same in every daemon that listens.
PORT_FILE_OPTION = [
    "port-file",
    None,
    None,
    "Write the bound port number here once listening",
    absolute_path,
]


def keywords(options: usage.Options, names: str) -> dict[str, Any]:
    """The options ``names`` lists (space-separated), keyed as the service's keywords.

    ``keywords(options, "listen port-file")`` is
    ``{"listen": options["listen"], "port_file": options["port-file"]}``.
    """
    return {name.replace("-", "_"): options[name] for name in names.split()}


# Identities a bundle holds only when asked for at enrollment, and how to ask.
# (A missing worker file is a broken bundle: the error names the file.)
_OPTIONAL_IDENTITIES = {
    config.ROLE_UPDATER: "enroll the host with `decnet-admin enroll --updater`",
}


def _expected_cn(bundle: WorkerBundle, role: str) -> str:
    return config.UPDATER_CN_PREFIX + bundle.name if role == config.ROLE_UPDATER else bundle.name


def _bundle_identity(bundle: WorkerBundle, role: str) -> TLSIdentity:
    missing = [p.name for p in (bundle.cert_path(role), bundle.key_path(role)) if not p.exists()]
    if missing and role in _OPTIONAL_IDENTITIES:
        raise usage.UsageError(
            f"the bundle has no {role} identity ({', '.join(missing)} missing); "
            f"{_OPTIONAL_IDENTITIES[role]}"
        )
    try:
        identity = TLSIdentity.from_bundle(bundle, role)
    except DecnetError as exc:
        raise usage.UsageError(f"unusable bundle: {exc}") from None
    if identity.identity.role != role or identity.identity.cn != _expected_cn(bundle, role):
        raise usage.UsageError(
            f"{bundle.cert_path(role)} is not the {role} certificate of {bundle.name!r}"
        )
    return identity


def load_bundle(
    options: usage.Options,
    role: str,
    *,
    required: str = "--bundle DIR is required (the directory `decnet-admin enroll` wrote)",
) -> tuple[WorkerBundle, TLSIdentity]:
    """Load ``--bundle`` and its ``role`` identity, checked, from ``postOptions``.

    Every problem (no ``--bundle``, unreadable files, a certificate of another
    role or host) is a :class:`usage.UsageError` naming it.  The results are
    kept as ``options["bundle-obj"]`` and ``options["identity"]``.
    """
    if not options["bundle"]:
        raise usage.UsageError(required)
    try:
        bundle = WorkerBundle.load(options["bundle"])
    except DecnetError as exc:
        raise usage.UsageError(f"unusable bundle: {exc}") from None
    identity = _bundle_identity(bundle, role)
    options["bundle-obj"] = bundle
    options["identity"] = identity
    return bundle, identity


class PortService(Service):
    """Listen on an endpoint string; a failed bind fails start-up.

    Endpoints that bind synchronously (``tcp:``, ``unix:``, ``systemd:``) are
    the only ones supported: the outcome must be known before ``twistd``
    starts the reactor.  The bound port is written to ``port_file`` when given
    (for port 0 in tests and the sandbox), and ``ready`` fires with the
    listening port.
    """

    log = Logger()

    def __init__(
        self,
        reactor: IDecnetReactor,
        description: str,
        factory: IProtocolFactory,
        *,
        port_file: str | os.PathLike | None = None,
        label: str = "connections",
    ):
        self.reactor = reactor
        self.description = description
        self.factory = factory
        self.port_file = Path(port_file) if port_file else None
        self.label = label
        self.port: IListeningPort | None = None
        self.ready: defer.Deferred = defer.Deferred()

    def _listen(self) -> defer.Deferred:
        return serverFromString(self.reactor, self.description).listen(self.factory)

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self.port is not None:
            return
        outcome: list = []
        try:
            listening = self._listen()
        except Exception:  # an endpoint string that only fails when used
            outcome.append(Failure())
        else:
            listening.addBoth(outcome.append)
        if not outcome:
            raise RuntimeError(f"listening on {self.description} did not complete synchronously")
        if isinstance(outcome[0], Failure):
            self._cannot_listen(outcome[0])
        self.port = outcome[0]
        host = self.port.getHost()
        self.log.info(
            "Listening on {endpoint} for {label} (port {port})",
            label=self.label,
            endpoint=self.description,
            port=getattr(host, "port", host),
        )
        if self.port_file is not None:
            # Start-up only, before the reactor serves anyone: a tiny write.
            atomic_write(self.port_file, b"%d\n" % getattr(host, "port"))  # noqa: B009 - TCP only
        self.ready.callback(self.port)

    def _cannot_listen(self, failure: Failure) -> NoReturn:
        """One clear line, then stop ``twistd`` with :data:`START_FAILED`, no traceback:
        a port in use is an operator's problem, not a bug."""
        self.log.critical(
            "Cannot listen on {endpoint} for {label}: {error}",
            label=self.label,
            endpoint=self.description,
            error=failure.getErrorMessage(),
        )
        raise SystemExit(START_FAILED)

    def startService(self) -> None:
        if self.port is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self) -> defer.Deferred | None:
        super().stopService()
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None


class TLSPortService(PortService):
    """A :class:`PortService` whose connections speak TLS with ``options``."""

    def __init__(
        self,
        reactor: IDecnetReactor,
        description: str,
        options: CertificateOptions,
        factory: IProtocolFactory,
        *,
        port_file: str | os.PathLike | None = None,
        label: str = "connections",
        gate: Callable[[IProtocolFactory], IProtocolFactory] | None = None,
    ):
        super().__init__(reactor, description, factory, port_file=port_file, label=label)
        self.options = options
        # Wraps the TLS factory (see ``listen_tls``): the listener's pre-TLS budget.
        self.gate = gate

    def _listen(self) -> defer.Deferred:
        return listen_tls(
            self.reactor, self.description, self.options, self.factory, gate=self.gate
        )
