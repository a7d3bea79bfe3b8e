"""The agent's domain object: health, status, deploy and teardown, serialised.

The Klein handlers only parse, call one of these methods and render.  Every
change goes through one lock, so two deploys (or a deploy racing the start-up
restore) never interleave.  Order of a change: validate completely, persist the
new desired state atomically, then let the engine converge; a crash at any
point re-applies the persisted state at the next start.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

import decnet
from decnet.agent.engine import FAILED, LISTENING, IDeckyEngine
from decnet.agent.spec import EMPTY, DeploymentSpec, parse_spec
from decnet.agent.state import DesiredState
from decnet.errors import UnknownDecky
from decnet.release import release_id


class Controller:
    log = Logger()

    def __init__(
        self, engine: IDeckyEngine, store: DesiredState, clock: IReactorTime, *, host: str
    ):
        self.engine = engine
        self.store = store
        self.clock = clock
        self.host = host
        self.spec: DeploymentSpec = EMPTY
        self.started = clock.seconds()
        # Read once at start: `current` may be switched to another release
        # before this process is restarted, and /health must name the code
        # that actually runs (the updater's probe relies on it).
        self.release = release_id()
        self.applied_at: float | None = None
        self._lock = defer.DeferredLock()

    def health(self) -> dict:
        return {
            "status": "ok",
            "host": self.host,
            "version": decnet.__version__,
            "release": self.release,
            "engine": self.engine.name,
            "uptime": round(self.clock.seconds() - self.started, 3),
        }

    def status(self) -> dict:
        live = self.engine.status()
        deckies = {
            decky.name: {"services": live.get(decky.name, {})} for decky in self.spec.deckies
        }
        services = [s for d in live.values() for s in d.values()]
        return {
            "host": self.host,
            "spec": self.spec.canonical(),
            "spec_hash": self.spec.digest,
            "applied_at": self.applied_at,
            "deckies": deckies,
            "summary": {
                "deckies": len(self.spec.deckies),
                "services": len(services),
                "listening": sum(1 for s in services if s["state"] == LISTENING),
                "failed": sum(1 for s in services if s["state"] == FAILED),
            },
        }

    async def deploy(self, doc) -> dict:
        """Validate ``doc`` completely, then converge on it; per-service results."""
        spec = parse_spec(doc)  # raises ValidationError before anything changes
        return await self._serialised(self._converge, spec)

    async def teardown(self, decky: str | None = None) -> dict:
        """Stop decky ``decky`` (everything when ``None``); :class:`UnknownDecky` if absent."""
        return await self._serialised(self._teardown, decky)

    async def restore(self) -> dict | None:
        """Re-apply the persisted desired state (agent start-up)."""
        return await self._serialised(self._restore)

    async def stop(self) -> None:
        await self._serialised(self.engine.stop)

    async def _serialised(self, fn, *args):
        await self._lock.acquire()
        try:
            return await fn(*args)
        finally:
            self._lock.release()

    async def _teardown(self, decky: str | None) -> dict:
        if decky is not None and self.spec.decky(decky) is None:
            raise UnknownDecky(f"no decky named {decky!r} is deployed on {self.host}")
        return await self._converge(self.spec.without(decky))

    async def _restore(self) -> dict | None:
        spec = await self.store.load()
        if spec is None:
            self.log.info("No desired state saved yet; nothing to restore")
            return None
        self.log.info(
            "Restoring {deckies} deckies (spec {digest})",
            deckies=len(spec.deckies),
            digest=spec.digest[:12],
        )
        return await self._converge(spec, persist=False)

    async def _converge(self, spec: DeploymentSpec, persist: bool = True) -> dict:
        changed = spec.digest != self.spec.digest
        if persist and changed:
            await self.store.save(spec)
        self.spec = spec
        results = await self.engine.apply(spec)
        self.applied_at = self.clock.seconds()
        deckies: dict[str, dict] = {}
        removed = []
        for (decky, service), result in sorted(results.items()):
            if result["action"] == "removed":
                removed.append({"decky": decky, "service": service})
            else:
                deckies.setdefault(decky, {})[service] = result
        failed = [
            f"{d}/{s}: {r['reason']}"
            for d, services in deckies.items()
            for s, r in services.items()
            if r["state"] != LISTENING
        ]
        self.log.info(
            "Applied spec {digest}: {count} services, {failed} failed, {removed} removed",
            digest=spec.digest[:12],
            count=sum(len(s) for s in deckies.values()),
            failed=len(failed),
            removed=len(removed),
        )
        return {
            "spec_hash": spec.digest,
            "changed": changed,
            "ok": not failed,
            "failed": failed,
            "deckies": deckies,
            "removed": removed,
        }
