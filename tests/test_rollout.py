"""Rollouts to many hosts: eligibility, canaries, bounded concurrency, include-self."""

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from decnet.errors import RemoteError, Unreachable
from decnet.master.registry import Host
from decnet.master.rollout import Rollout, plan_rollout
from decnet.master.tar_tree import ReleaseArchive

ARCHIVE = ReleaseArchive(None, "ab" * 32, 1234, (), (), None, None)
RELEASE = ARCHIVE.release_id


def host(name, *, updater=True, status="enrolled"):
    return Host(
        name=name,
        address="127.0.0.1",
        agent_port=1,
        updater_port=2,
        worker_fingerprint=name * 4,
        updater_fingerprint=(name * 4 + "u") if updater else None,
        enrolled_at="t",
        status=status,
    )


class FakeClient:
    """Answers per host: 'ok', 'rolled_back', 'failed', 'unreachable', 'self-fails', 'hang'."""

    def __init__(self, world, h):
        self.world, self.host = world, h
        self.behaviour = world.behaviour.get(h.name, "ok")

    async def update(self, archive, timeout=None, sent=None):
        w = self.world
        if sent is not None:
            for part in (1, 2, 3, 10):
                sent(archive.size * part // 10)
        w.active += 1
        w.peak = max(w.peak, w.active)
        w.order.append(self.host.name)
        try:
            gate = w.gates.get(self.host.name)
            if gate is not None:
                await gate
            if self.behaviour == "rolled_back":
                raise RemoteError(
                    409, ["release x failed"], {"result": "rolled_back", "current": "old"}
                )
            if self.behaviour == "crashed":
                output = {"agent": "Traceback ...\nRuntimeError: boom\n", "install": "ok", "x": 7}
                raise RemoteError(
                    409, ["release x failed"], {"result": "rolled_back", "output": output}
                )
            if self.behaviour == "failed":
                raise RemoteError(422, ["pip failed"], {"result": "failed"})
            if self.behaviour == "unreachable":
                raise Unreachable("cannot reach it")
            return {"result": "updated", "release": archive.release_id, "installed": True}
        finally:
            w.active -= 1

    async def update_self(self, archive, timeout=None):
        self.world.self_updates.append(self.host.name)
        if self.behaviour == "self-fails":
            raise RemoteError(422, ["no pip"], {"result": "failed"})
        return {"result": "restarting", "release": archive.release_id}

    async def health(self, timeout=None):
        return {"status": "ok", "phase": self.world.phases.get(self.host.name)}

    async def wheels(self, timeout=None):
        return self.world.inventory

    async def wait_for_release(self, release, timeout=None):
        return {"status": "ok", "release": release}

    async def close(self):
        self.world.closed += 1


class World:
    def __init__(self, **behaviour):
        self.behaviour = behaviour
        self.gates = {}
        self.active = self.peak = self.closed = 0
        self.order = []
        self.self_updates = []
        self.progress = []
        self.phases = {}
        self.inventory = {"wheels": [], "deps": []}


def run(world, hosts, clock=None, **kw):
    canary = kw.pop("canary", 0)
    rollout = Rollout(
        clock or Clock(),
        lambda h: FakeClient(world, h),
        ARCHIVE,
        progress=lambda h, m: world.progress.append((h, m)),
        **kw,
    )
    d = defer.ensureDeferred(rollout.run(plan_rollout(hosts, canary)))
    return d


def outcome(d):
    return {r.host: r.result for r in d.result}


def test_hosts_without_an_updater_or_decommissioned_are_skipped_with_a_reason():
    plan = plan_rollout(
        [host("a"), host("b", updater=False), host("c", status="decommissioned")], canary=5
    )
    assert [h.name for h in plan.canaries] == ["a"] and plan.rest == ()
    reasons = {r.host: r.detail for r in plan.skipped}
    assert "no updater certificate" in reasons["b"]
    assert reasons["c"] == "decommissioned"


def test_every_host_gets_one_result_and_one_failure_does_not_stop_the_others():
    world = World(b="rolled_back", c="failed", d="unreachable")
    d = run(world, [host(n) for n in "abcde"])
    assert outcome(d) == {
        "a": "updated",
        "b": "rolled_back",
        "c": "failed",
        "d": "failed",
        "e": "updated",
    }
    results = {r.host: r for r in d.result}
    assert results["a"].release == RELEASE
    assert results["b"].release == "old" and "HTTP 409" in results["b"].detail
    assert world.closed == 5


def test_concurrency_is_bounded():
    world = World()
    gates = {n: defer.Deferred() for n in "abcdef"}
    world.gates = gates
    d = run(world, [host(n) for n in "abcdef"], concurrency=2)
    assert world.active == 2 and world.order == ["a", "b"]
    for name in "abcdef":
        gates[name].callback(None)
    assert world.peak == 2 and outcome(d) == dict.fromkeys("abcdef", "updated")


def test_a_failed_canary_stops_the_rollout():
    world = World(b="rolled_back")
    d = run(world, [host(n) for n in "abcd"], canary=2)
    assert outcome(d) == {"a": "updated", "b": "rolled_back", "c": "skipped", "d": "skipped"}
    assert world.order == ["a", "b"]
    results = {r.host: r for r in d.result}
    assert "canary b ended rolled_back" in results["c"].detail


def test_good_canaries_let_the_rest_proceed():
    world = World()
    d = run(world, [host(n) for n in "abcd"], canary=1, concurrency=1)
    assert outcome(d) == dict.fromkeys("abcd", "updated")
    assert world.order == ["a", "b", "c", "d"]
    assert ("-", "canary phase: a") in world.progress


def test_include_self_only_follows_a_successful_agent_update():
    world = World(b="rolled_back", c="self-fails")
    d = run(world, [host(n) for n in "abc"], include_self=True)
    assert world.self_updates == ["a", "c"]
    results = {r.host: r for r in d.result}
    assert results["a"].result == "updated" and results["a"].updater_release == RELEASE
    assert results["c"].result == "failed"
    assert "agent updated" in results["c"].detail and "self-update failed" in results["c"].detail


def test_a_zero_concurrency_is_refused():
    with pytest.raises(ValueError):
        Rollout(Clock(), None, ARCHIVE, concurrency=0)


def test_a_failed_release_keeps_the_updaters_captured_output_and_only_its_text():
    world = World(a="crashed", b="failed")
    d = run(world, [host("a"), host("b")])
    results = {r.host: r for r in d.result}
    assert results["a"].output == {"agent": "Traceback ...\nRuntimeError: boom\n", "install": "ok"}
    assert results["a"].as_dict()["output"]["agent"].endswith("RuntimeError: boom\n")
    assert results["b"].output == {}


def test_each_host_shows_its_upload_in_steps_then_the_updaters_phases():
    world = World()
    gate = defer.Deferred()
    world.gates = {"a": gate}
    clock = Clock()
    d = run(world, [host("a")], clock=clock)
    ups = [m for h, m in world.progress if m.startswith("uploading")]
    assert ups == ["uploading 0%", "uploading 10%", "uploading 20%", "uploading 100%"]
    for phase in ("installing", "installing", "health-checking"):
        world.phases["a"] = phase
        clock.advance(1.0)
    gate.callback(None)
    clock.advance(1.0)  # the watcher stops with the update; no phase after the outcome
    shown = [m for h, m in world.progress if h == "a" and not m.startswith(("uploading", "push"))]
    assert shown[:2] == ["installing", "health-checking"]
    assert shown[2].startswith("updated to") and len(shown) == 3
    assert outcome(d) == {"a": "updated"} and clock.getDelayedCalls() == []


def test_each_host_gets_the_tarball_chosen_for_it():
    world = World()
    chosen = []

    async def archive_for(client):
        chosen.append(client.host.name)
        return ARCHIVE

    d = run(world, [host(n) for n in "ab"], archive_for=archive_for)
    assert sorted(chosen) == ["a", "b"] and outcome(d) == {"a": "updated", "b": "updated"}
