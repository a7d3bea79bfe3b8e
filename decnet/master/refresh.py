"""``bundle refresh``: the master's listener list, pushed to enrolled workers' updaters.

Bounded concurrency, one deadline per host (the client's), and exactly one
:class:`RefreshResult` per host: a host that fails, stalls or lies in its
answer is one ``failed`` row and never holds up the others.  The client
factory is injected, so this is tested against real updaters and fakes alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import attrs
from twisted.internet import defer

from decnet.errors import DecnetError
from decnet.master.registry import Host
from decnet.master.rollout import SKIPPED, skip_reason

REFRESHED = "refreshed"
UNCHANGED = "unchanged"
FAILED = "failed"


@attrs.frozen
class RefreshResult:
    host: str
    result: str
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.result in (REFRESHED, UNCHANGED)

    def as_dict(self) -> dict:
        return attrs.asdict(self)


class ListenerClient(Protocol):
    async def set_listeners(self, listeners: list[str], timeout: float | None = None) -> dict: ...

    async def close(self) -> None: ...


async def refresh_listeners(
    hosts: Sequence[Host],
    listeners: list[str],
    client_for: Callable[[Host], ListenerClient],
    *,
    concurrency: int,
    progress: Callable[[RefreshResult], None] = lambda result: None,
) -> list[RefreshResult]:
    """Push ``listeners`` to every host of ``hosts`` (in order); ``progress`` hears each
    result as it comes.  Hosts without an updater, or decommissioned, are skipped."""
    semaphore = defer.DeferredSemaphore(concurrency)

    async def one(host: Host) -> RefreshResult:
        reason = skip_reason(host)
        if reason is not None:
            result = RefreshResult(host.name, SKIPPED, reason)
        else:
            result = await _push(host, listeners, client_for)
        progress(result)
        return result

    def start(host: Host) -> defer.Deferred[RefreshResult]:
        return defer.ensureDeferred(one(host))

    runs = [semaphore.run(start, host) for host in hosts]
    return list(await defer.gatherResults(runs, consumeErrors=True))


async def _push(
    host: Host, listeners: list[str], client_for: Callable[[Host], ListenerClient]
) -> RefreshResult:
    try:
        client = client_for(host)
    except DecnetError as exc:
        return RefreshResult(host.name, FAILED, str(exc))
    try:
        doc = await client.set_listeners(listeners)
    except DecnetError as exc:
        return RefreshResult(host.name, FAILED, str(exc))
    finally:
        await client.close()
    return RefreshResult(host.name, REFRESHED if doc["changed"] else UNCHANGED)
