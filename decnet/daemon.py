"""Pieces every DECNET daemon shares: its TLS port, and telling systemd it is ready.

A daemon must not run without the port it exists for: :class:`TLSPortService`
binds in ``privilegedStartService`` and raises if it cannot, which makes
``twistd`` exit non-zero before the reactor runs (so systemd's
``Restart=on-failure`` and the tests see a failure, not a silent daemon).
"""

from __future__ import annotations

from pathlib import Path

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from decnet.fsutil import atomic_write
from decnet.tls import PolicyOptions, listen_tls


class TLSPortService(Service):
    """Listen with TLS on an endpoint string; a failed bind fails start-up.

    Endpoints that bind synchronously (``tcp:``, ``ssl:``-less ``unix:``,
    ``systemd:``) are the only ones supported: the outcome must be known before
    ``twistd`` starts the reactor.  The bound port is written to ``port_file``
    when given (for port 0 in tests and the sandbox), and ``ready`` fires with
    the listening port.
    """

    log = Logger()

    def __init__(
        self,
        reactor,
        description: str,
        options: PolicyOptions,
        factory,
        *,
        port_file: str | Path | None = None,
        label: str = "connections",
        gate=None,
    ):
        self.reactor = reactor
        self.description = description
        self.options = options
        self.factory = factory
        self.port_file = Path(port_file) if port_file else None
        self.label = label
        # Wraps the TLS factory (see ``listen_tls``): the listener's pre-TLS budget.
        self.gate = gate
        self.port = None
        self.ready: defer.Deferred = defer.Deferred()

    def privilegedStartService(self):
        super().privilegedStartService()
        if self.port is not None:
            return
        outcome: list = []
        listen_tls(
            self.reactor, self.description, self.options, self.factory, gate=self.gate
        ).addBoth(outcome.append)
        if not outcome:
            raise RuntimeError(f"listening on {self.description} did not complete synchronously")
        if isinstance(outcome[0], Failure):
            self.log.critical(
                "Cannot listen on {endpoint} for {label}: {error}",
                label=self.label,
                endpoint=self.description,
                error=outcome[0].getErrorMessage(),
            )
            outcome[0].raiseException()
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
            atomic_write(self.port_file, b"%d\n" % host.port)
        self.ready.callback(self.port)

    def startService(self):
        if self.port is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self):
        super().stopService()
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None
