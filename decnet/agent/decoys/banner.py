"""``tcp-banner``: any TCP port; sends a configurable banner, captures the first bytes.

The banner is sent as ISO-8859-1 (one character per byte: ``"\u0000"`` in the
JSON spec is a NUL byte), so binary greetings such as MySQL's can be mimicked.

Events: ``connect``; ``data`` (``data``: up to ``capture_bytes`` bytes the
client sent first, ``size``) once the capture is full or the connection ends;
``disconnect`` (``bytes_in`` counts everything, captured or not).
"""

from __future__ import annotations

from twisted.internet.protocol import Protocol

from decnet.agent.decoys.base import DecoyFactory, DecoyMixin, ServiceRuntime


class BannerDecoy(DecoyMixin, Protocol):
    def connectionMade(self):
        self.captured = bytearray()
        self.reported = False
        super().connectionMade()
        banner = self.runtime.spec.option("banner")
        if banner:
            self.transport.write(banner.encode("latin-1"))

    def next_item(self) -> bool:
        pending = len(self.inbox)
        if not pending:
            return False
        if not self.reported:
            limit = self.runtime.spec.option("capture_bytes")
            self.captured += self.inbox.take(limit - len(self.captured))
            if len(self.captured) >= limit:
                self._report()
        self.inbox.skip(len(self.inbox))  # counted in bytes_in, never kept
        return True

    def _report(self) -> None:
        if not self.reported and self.captured:
            self.reported = True
            self.session.event("data", ("data", bytes(self.captured)), ("size", len(self.captured)))

    def connectionLost(self, reason):
        self._report()
        super().connectionLost(reason)


def make_factory(runtime: ServiceRuntime) -> DecoyFactory:
    return DecoyFactory(runtime, BannerDecoy)
