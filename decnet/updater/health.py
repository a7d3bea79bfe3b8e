"""Polling the local agent's ``/health`` until it reports the release we just activated.

The probe speaks mTLS with the *updater* certificate (the agent admits
``updater@<its host>`` on ``GET /health`` only) and pins the agent's worker
certificate from the bundle, like the master does; the answer must match the
agent's ``/health`` schema (:data:`decnet.replies.AGENT_HEALTH`), as it must for
the master.  Waiting is done on the
injected clock; a probe that cannot connect yet (the agent is still starting) is
simply retried until the deadline.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from decnet import config, replies
from decnet.errors import DecnetError, HealthCheckFailed
from decnet.httpclient import PinnedClient


class HealthProbe:
    """``await probe.wait_for(release, timeout, exited=...)`` → the agent's health document."""

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        client: PinnedClient,
        *,
        interval: float = config.HEALTH_PROBE_INTERVAL,
        request_timeout: float = 5.0,
    ):
        self.clock = clock
        self.client = client  # a PinnedClient, or anything with its ``call``
        self.interval = interval
        self.request_timeout = request_timeout

    async def wait_for(
        self,
        release: str,
        timeout: float,
        exited: Callable[[], str | None] = lambda: None,
    ) -> dict:
        """Until ``/health`` says ``status: ok`` and ``release == release``, or the deadline.

        ``exited()`` returning a reason (the supervised agent died) ends the
        wait early instead of polling a dead process for the rest of the timeout.
        """
        deadline = self.clock.seconds() + timeout
        last = "no answer yet"
        attempts = 0
        while True:
            died = exited()
            if died:
                raise HealthCheckFailed(f"the agent {died} before it reported {release}")
            remaining = deadline - self.clock.seconds()
            if remaining <= 0:
                raise HealthCheckFailed(
                    f"the agent did not report release {release} as healthy within "
                    f"{timeout:g}s (last: {last})"
                )
            attempts += 1
            try:
                doc = await self.client.call(
                    "GET",
                    "health",
                    timeout=max(0.5, min(self.request_timeout, remaining)),
                    reply=replies.AGENT_HEALTH,
                )
            except DecnetError as exc:
                last = str(exc)
            else:
                status, reported = doc["status"], doc.get("release")
                if status == "ok" and reported == release:
                    self.log.info(
                        "Agent healthy on {release} after {attempts} probes",
                        release=release,
                        attempts=attempts,
                    )
                    return doc
                last = f"status {status!r}, release {reported!r}"
            await task.deferLater(self.clock, self.interval, lambda: None)
