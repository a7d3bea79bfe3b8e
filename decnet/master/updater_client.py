"""The master's client for one worker's updater: treq over mTLS, pinned in the handshake.

Built on :class:`~decnet.httpclient.PinnedClient`: the peer must be
``updater@<host>`` (role and CN) with exactly the fingerprint recorded at
enrollment, checked in the verify callback of the connection that carries the
request.  A host enrolled without an updater has no pin, and the client refuses
to exist (fail closed).  Tarballs are streamed from their file, never read into
memory.  Every reply is checked against its schema (:mod:`decnet.replies`)
within one deadline per request, and no redirect is followed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import BinaryIO

from twisted.internet import task

from decnet import config, replies
from decnet.errors import BadReply, DecnetError, Unreachable
from decnet.master.http import client_for_host
from decnet.master.registry import Host
from decnet.master.tar_tree import ReleaseArchive
from decnet.tls import TLSIdentity

HEALTH_TIMEOUT = 10.0


class CountingReader:
    """A file for :class:`~twisted.web.client.FileBodyProducer` that reports what it read."""

    def __init__(self, fh: BinaryIO, sent: Callable[[int], None]):
        self._fh = fh
        self._sent = sent
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self._fh.read(size)
        if data:
            self.count += len(data)
            self._sent(self.count)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._fh.seek(offset, whence)

    def tell(self) -> int:
        return self._fh.tell()

    def close(self) -> None:
        self._fh.close()


class UpdaterClient:
    """``health``, ``releases``, ``update``, ``rollback``, ``update_self`` for one host."""

    def __init__(
        self,
        reactor,
        identity: TLSIdentity,
        host: Host,
        *,
        timeout: float = config.DEFAULT_UPDATE_TIMEOUT,
        revocations=None,
        clock=None,
    ):
        self.reactor = reactor
        self.host = host
        self.timeout = timeout
        self.http = client_for_host(
            reactor,
            identity,
            host,
            config.ROLE_UPDATER,
            revocations=revocations,
            timeout=timeout,
            clock=clock,
        )

    async def health(self, timeout: float = HEALTH_TIMEOUT) -> dict:
        return await self.http.call("GET", "health", timeout=timeout, reply=replies.UPDATER_HEALTH)

    async def releases(self, timeout: float = config.RELEASES_TIMEOUT) -> dict:
        return await self.http.call("GET", "releases", timeout=timeout, reply=replies.RELEASES)

    async def wheels(self, timeout: float = config.RELEASES_TIMEOUT) -> dict:
        """The dependency wheels and environments the host already has (``GET /wheels``)."""
        doc = await self.http.call("GET", "wheels", timeout=timeout, reply=replies.WHEELS)
        for key in ("wheels", "deps"):
            if len(doc[key]) > config.MAX_INVENTORY_WHEELS:
                raise BadReply(
                    self.http.where, [f"{key}: more than {config.MAX_INVENTORY_WHEELS} entries"]
                )
        return doc

    async def _push(
        self,
        route: str,
        archive: ReleaseArchive,
        timeout: float | None,
        reply,
        sent: Callable[[int], None] | None = None,
    ) -> dict:
        with archive.open() as fh:
            body = fh if sent is None else CountingReader(fh, sent)
            return await self.http.call(
                "POST",
                route,
                data=body,  # type: ignore[arg-type]  # a file, as far as the producer cares
                headers={"content-type": ["application/gzip"]},
                query={"sha256": archive.sha256},
                timeout=timeout or self.timeout,
                reply=reply,
            )

    async def update(
        self,
        archive: ReleaseArchive,
        timeout: float | None = None,
        sent: Callable[[int], None] | None = None,
    ) -> dict:
        """Push and activate a release; ``RemoteError`` carries a rolled-back/failed body.

        ``sent(n)`` is called as the upload advances (``n`` bytes read for sending).
        """
        return await self._push("update", archive, timeout, replies.UPDATE, sent)

    async def update_self(self, archive: ReleaseArchive, timeout: float | None = None) -> dict:
        """Push the updater's own next release; it answers, then restarts onto it."""
        return await self._push("update-self", archive, timeout, replies.UPDATE_SELF)

    async def rollback(self, to: str | None = None, timeout: float | None = None) -> dict:
        query = {"to": to} if to else None
        return await self.http.call(
            "POST", "rollback", query=query, timeout=timeout, reply=replies.ROLLBACK
        )

    async def set_listeners(self, listeners: list[str], timeout: float | None = None) -> dict:
        """Replace the listener list of the host's bundle; the reply must name exactly
        ``listeners`` (a worker that answers anything else is reported, not believed)."""
        doc = await self.http.call(
            "POST",
            "listeners",
            json={"listeners": listeners},
            timeout=timeout,
            reply=replies.LISTENERS,
        )
        if doc["listeners"] != listeners:
            raise BadReply(
                f"the updater on {self.host.name}",
                "it answered with another listener list than the one sent",
            )
        return doc

    async def stop_forwarder(self, timeout: float | None = None) -> dict:
        """Stop the host's forwarder through its updater (``decnet-admin decommission``)."""
        return await self.http.call(
            "POST", "forwarder", "stop", timeout=timeout, reply=replies.FORWARDER_STOP
        )

    async def wait_for_release(
        self, release: str, timeout: float = config.DEFAULT_SELF_UPDATE_WAIT, interval=0.5
    ) -> dict:
        """Poll the updater's ``/health`` until it reports ``release`` (after update-self)."""
        deadline = self.reactor.seconds() + timeout
        last = "no answer yet"
        while True:
            remaining = deadline - self.reactor.seconds()
            if remaining <= 0:
                raise Unreachable(
                    f"the updater on {self.host.name} did not come back on release {release} "
                    f"within {timeout:g}s (last: {last})"
                )
            try:
                doc = await self.health(timeout=max(0.5, min(HEALTH_TIMEOUT, remaining)))
            except DecnetError as exc:
                last = str(exc)
            else:
                if doc["status"] == "ok" and doc.get("release") == release:
                    return doc
                last = f"status {doc['status']!r}, release {doc.get('release')!r}"
            await task.deferLater(self.reactor, interval, lambda: None)

    async def close(self) -> None:
        await self.http.close()
