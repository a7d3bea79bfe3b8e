"""systemd readiness and watchdog notifications, without a new dependency.

Under ``Type=notify`` systemd sets ``$NOTIFY_SOCKET`` (a Unix datagram socket,
``@`` meaning the abstract namespace) and, with ``WatchdogSec=``,
``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``).  A daemon sends ``READY=1`` once it
is actually serving (listening, or connected for the forwarder), then
``WATCHDOG=1`` at half the watchdog interval for as long as its reactor is
alive, and ``STOPPING=1`` on shutdown.  Outside systemd every call is a no-op.

A datagram send on a local socket does not block in practice, so the keep-alive
runs on the reactor: if the reactor is stuck, the pings stop and systemd
restarts the daemon, which is exactly what the watchdog is for.
"""

from __future__ import annotations

import os
import socket

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger


def _address(raw: str) -> str | bytes:
    # "@name" is Linux's abstract namespace: a leading NUL byte on the wire.
    return b"\0" + raw[1:].encode() if raw.startswith("@") else raw


class Notifier:
    """Send ``sd_notify`` datagrams to ``$NOTIFY_SOCKET`` (no-op when it is unset)."""

    log = Logger()

    def __init__(self, environ=None):
        environ = os.environ if environ is None else environ
        self.socket_path = environ.get("NOTIFY_SOCKET") or None
        self.watchdog_interval = self._watchdog_interval(environ)

    @staticmethod
    def _watchdog_interval(environ) -> float | None:
        """Seconds between keep-alives (half the watchdog timeout), if the watchdog is ours."""
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        if not usec.isdigit() or int(usec) == 0:
            return None
        if pid and pid != str(os.getpid()):
            return None
        return int(usec) / 2_000_000

    @property
    def enabled(self) -> bool:
        return self.socket_path is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; ``False`` if not under systemd or it failed."""
        if not self.enabled:
            return False
        message = "\n".join(assignments).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, _address(self.socket_path))
        except OSError as exc:
            self.log.warn(
                "Could not notify systemd at {path}: {error}", path=self.socket_path, error=exc
            )
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")


class SystemdService(Service):
    """Keeps the watchdog fed while running and tells systemd when we stop.

    The daemon calls :meth:`ready` once it really serves; the service does not
    guess readiness from its own start.
    """

    name = "systemd-notify"  # type: ignore[assignment]  # (Twisted types Service.name as None)

    def __init__(self, clock: IReactorTime, notifier: Notifier | None = None):
        self.notifier = notifier or Notifier()
        self._clock = clock
        self._ping = LoopingCall(self.notifier.notify, "WATCHDOG=1")
        self._ping.clock = clock

    def startService(self):
        super().startService()
        interval = self.notifier.watchdog_interval
        if self.notifier.enabled and interval:
            self._ping.start(interval, now=True)

    def stopService(self):
        if self._ping.running:
            self._ping.stop()
        self.notifier.stopping()
        return super().stopService()

    def ready(self, status: str | None = None) -> None:
        # Services start in a "before startup" trigger, before the reactor
        # runs (and before it handles SIGTERM): announce from its first turn.
        self._clock.callLater(0, self.notifier.ready, status)

    def status(self, status: str) -> None:
        self.notifier.status(status)
