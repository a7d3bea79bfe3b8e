"""The updater's domain flows with a fake installer, a fake agent and the real health probe.

Synchronous: threads are replaced by direct calls, time by a ``Clock``.
"""

import hashlib
import io

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from decnet import config
from decnet.errors import (
    DigestMismatch,
    HealthCheckFailed,
    InstallFailed,
    NoPreviousRelease,
    RollbackFailed,
    RolledBack,
    UnknownRelease,
    UpdaterBusy,
    UpdaterStarting,
)
from decnet.threads import inline_runner
from decnet.updater.engine import Updater, Upload
from decnet.updater.health import HealthProbe
from decnet.updater.releases import ReleaseStore, release_id_for
from tests.support import minimal_release, tree_snapshot


def upload_of(data: bytes) -> Upload:
    return Upload(io.BytesIO(data), hashlib.sha256(data).hexdigest(), len(data))


def rid(data: bytes) -> str:
    return release_id_for(hashlib.sha256(data).hexdigest())


GOOD1 = minimal_release(name="one")
GOOD2 = minimal_release(name="two")
GOOD3 = minimal_release(name="three")
BAD = minimal_release(name="bad")


class FakeInstaller:
    def __init__(self):
        self.installed = []
        self.fail = False

    async def install(self, release_dir, *, with_pip=False):
        if self.fail:
            raise InstallFailed("pip install failed (exit code 1)", output={"install": "boom"})
        (release_dir / "venv").mkdir()
        self.installed.append((release_dir.name, with_pip))
        return "installed"


class FakeAgent:
    """Runs 'releases'; a release in ``crashing`` dies at start, one in ``sick`` never answers."""

    control = "fake"

    def __init__(self):
        self.running = None
        self.history = []
        self.crashing = set()
        self.sick = set()
        self.stopped = 0
        self.ready_for = None  # the release running when release_ready() was last called

    async def start(self, release_dir):
        await self.restart(release_dir)

    async def restart(self, release_dir):
        self.running = release_dir.name if release_dir else None
        self.history.append(self.running)

    async def stop(self):
        self.running = None
        self.stopped += 1

    shutdown = stop

    def exited_since_start(self):
        return "exited with code 3" if self.running in self.crashing else None

    async def recent_output(self):
        return f"agent output of {self.running}"

    async def release_ready(self):
        self.ready_for = self.running

    def describe(self):
        return {"control": "fake", "running": self.running}


class FakeAgentHealth:
    """The agent's /health as seen by the probe."""

    def __init__(self, agent):
        self.agent = agent
        self.pending = None

    def call(self, method, route, timeout=None, reply=None):
        if self.pending is not None:
            return self.pending
        from decnet.errors import Unreachable

        if self.agent.running is None or self.agent.running in self.agent.sick:
            return defer.fail(Unreachable("connection refused"))
        return defer.succeed({"status": "ok", "release": self.agent.running})


@pytest.fixture
def env(tmp_path):
    clock = Clock()
    agent = FakeAgent()
    health = FakeAgentHealth(agent)
    restarts = []
    updater = Updater(
        clock=clock,
        store=ReleaseStore(tmp_path / "install"),
        self_store=ReleaseStore(tmp_path / "install" / config.UPDATER_SELF_DIR),
        installer=FakeInstaller(),
        agent=agent,
        probe=HealthProbe(clock, health),
        to_thread=inline_runner,
        health_timeout=5,
        keep=3,
        restart_self=restarts.append,
    )

    class Env:
        pass

    e = Env()
    e.clock, e.agent, e.health, e.updater, e.restarts = clock, agent, health, updater, restarts
    e.root = tmp_path / "install"
    e.installer = updater.installer

    def run(coro):
        d = defer.ensureDeferred(coro)
        for _ in range(200):  # the probe polls every 0.25 s; 5 s timeout
            if d.called:
                break
            clock.advance(config.HEALTH_PROBE_INTERVAL)
        results = []
        d.addBoth(results.append)
        assert results, "operation did not finish"
        result = results[0]
        if hasattr(result, "raiseException"):
            result.raiseException()
        return result

    e.run = run
    run(updater.start())
    return e


def push(env, data, sha="right"):
    up = upload_of(data)
    return env.run(env.updater.update(up, up.sha256 if sha == "right" else sha))


def test_a_first_push_installs_switches_and_confirms_the_new_release(env):
    result = push(env, GOOD1)
    assert result["result"] == "updated" and result["release"] == rid(GOOD1)
    assert result["previous"] is None and result["installed"] is True
    assert result["health"]["release"] == rid(GOOD1)
    assert env.updater.store.current() == rid(GOOD1)
    assert env.agent.running == rid(GOOD1)
    assert (env.root / "releases" / rid(GOOD1) / "src" / "one" / "__init__.py").is_file()
    assert env.installer.installed == [(rid(GOOD1), False)]


def test_a_release_is_dated_by_the_injected_clock(env):
    env.clock.advance(1767323045.75 - env.clock.seconds())
    push(env, GOOD1)
    (listed,) = env.run(env.updater.releases())["releases"]
    assert listed["installed_at"] == "2026-01-02T03:04:05+00:00"


def test_a_second_push_records_the_previous_release_for_rollback(env):
    push(env, GOOD1)
    result = push(env, GOOD2)
    assert result["previous"] == rid(GOOD1)
    listing = env.run(env.updater.releases())
    assert listing["current"] == rid(GOOD2)
    assert [r["rollback_target"] for r in listing["releases"]] == [False, True]


def test_a_release_that_never_reports_healthy_is_rolled_back_with_the_output(env):
    push(env, GOOD1)
    env.agent.sick.add(rid(BAD))
    with pytest.raises(RolledBack) as info:
        push(env, BAD)
    err = info.value
    assert err.status == 409 and err.result == "rolled_back"
    assert err.details["current"] == rid(GOOD1) and err.details["healthy"] is True
    assert err.details["output"]["agent"] == f"agent output of {rid(BAD)}"
    assert "within 5s" in str(err)
    assert env.updater.store.current() == rid(GOOD1)
    assert env.agent.running == rid(GOOD1)
    assert env.agent.history[-2:] == [rid(BAD), rid(GOOD1)]


def test_an_agent_that_crashes_at_start_is_rolled_back_without_waiting_for_the_timeout(env):
    push(env, GOOD1)
    env.agent.crashing.add(rid(BAD))
    started = env.clock.seconds()
    with pytest.raises(RolledBack, match="exited with code 3"):
        push(env, BAD)
    assert env.clock.seconds() - started < 1
    assert env.updater.store.current() == rid(GOOD1)


def test_when_the_previous_release_is_sick_too_the_outcome_is_failed(env):
    push(env, GOOD1)
    env.agent.sick.update({rid(BAD), rid(GOOD1)})
    with pytest.raises(RollbackFailed) as info:
        push(env, BAD)
    assert info.value.result == "failed" and info.value.details["healthy"] is False
    assert env.updater.store.current() == rid(GOOD1)


def test_a_failing_first_release_leaves_no_current_and_the_agent_stopped(env):
    env.agent.sick.add(rid(BAD))
    with pytest.raises(HealthCheckFailed, match="no previous release"):
        push(env, BAD)
    assert env.updater.store.current() is None
    assert env.agent.running is None


def test_an_install_failure_changes_nothing(env):
    push(env, GOOD1)
    before = tree_snapshot(env.root)
    env.installer.fail = True
    with pytest.raises(InstallFailed) as info:
        push(env, GOOD2)
    assert info.value.status == 422 and info.value.details["output"]["install"] == "boom"
    assert tree_snapshot(env.root) == before
    assert env.agent.history == [rid(GOOD1)]


def test_a_wrong_sha256_is_refused_before_the_archive_is_read(env, monkeypatch):
    from decnet.updater import archive

    def never(*a, **kw):
        raise AssertionError("the archive was parsed")

    monkeypatch.setattr(archive, "inspect", never)
    before = tree_snapshot(env.root)
    for sha in ("0" * 64, None, "", "xyz", hashlib.sha256(GOOD1).hexdigest()[:-1]):
        with pytest.raises(DigestMismatch) as info:
            push(env, GOOD1, sha=sha)
        assert info.value.status == 400
    assert tree_snapshot(env.root) == before


def test_pushing_the_current_release_again_is_a_no_op(env):
    push(env, GOOD1)
    result = push(env, GOOD1)
    assert result["detail"] == "already the current release"
    assert env.agent.history == [rid(GOOD1)]


def test_pushing_an_installed_older_release_reactivates_it_without_reinstalling(env):
    push(env, GOOD1)
    push(env, GOOD2)
    result = push(env, GOOD1)
    assert result["installed"] is False and result["release"] == rid(GOOD1)
    assert len(env.installer.installed) == 2


def test_rollback_goes_to_the_previous_release_then_refuses_with_none_left(env):
    push(env, GOOD1)
    push(env, GOOD2)
    result = env.run(env.updater.rollback())
    assert (result["result"], result["release"], result["previous"]) == (
        "rolled_back",
        rid(GOOD1),
        rid(GOOD2),
    )
    assert env.agent.running == rid(GOOD1)
    with pytest.raises(NoPreviousRelease):
        env.run(env.updater.rollback())


def test_rollback_to_a_named_release(env):
    for data in (GOOD1, GOOD2, GOOD3):
        push(env, data)
    result = env.run(env.updater.rollback(rid(GOOD1)))
    assert result["release"] == rid(GOOD1)
    with pytest.raises(UnknownRelease):
        env.run(env.updater.rollback("f" * 16))


def test_a_rollback_whose_target_is_unhealthy_returns_to_where_it_was(env):
    push(env, GOOD1)
    push(env, GOOD2)
    env.agent.sick.add(rid(GOOD1))
    with pytest.raises(RolledBack):
        env.run(env.updater.rollback())
    assert env.updater.store.current() == rid(GOOD2)


def test_old_releases_beyond_keep_are_pruned(env):
    env.updater.keep = 2
    for data in (GOOD1, GOOD2, GOOD3):
        push(env, data)
    listing = env.run(env.updater.releases())["releases"]
    assert [r["id"] for r in listing] == [rid(GOOD3), rid(GOOD2)]


def test_one_operation_at_a_time(env):
    push(env, GOOD1)
    hanging = env.health.pending = defer.Deferred()  # the agent does not answer yet
    first = defer.ensureDeferred(env.updater.update(upload_of(GOOD2), upload_of(GOOD2).sha256))
    assert not first.called and env.updater.health()["busy"] == "an update"
    with pytest.raises(UpdaterBusy):
        env.run(env.updater.rollback())
    with pytest.raises(UpdaterBusy):
        push(env, GOOD3)
    env.health.pending = None
    hanging.callback({"status": "ok", "release": rid(GOOD2)})
    assert first.result["result"] == "updated"
    assert env.updater.health()["busy"] is None


def test_nothing_is_accepted_before_the_start_up_reconcile(tmp_path):
    updater = Updater(
        clock=Clock(),
        store=ReleaseStore(tmp_path / "a"),
        self_store=ReleaseStore(tmp_path / "b"),
        installer=None,
        agent=FakeAgent(),
        probe=None,
        to_thread=inline_runner,
    )
    assert updater.health()["status"] == "starting"
    d = defer.ensureDeferred(updater.update(upload_of(GOOD1), None))
    assert isinstance(d.result.value, UpdaterStarting)
    d.addErrback(lambda f: None)


def test_start_up_reconciles_and_runs_the_agent_on_current(env, tmp_path):
    push(env, GOOD1)
    push(env, GOOD2)
    # A crash right after the switch to a third release: the journal says switched.
    store = env.updater.store
    up = upload_of(GOOD3)
    env.installer.fail = False
    directory = store.begin_install(rid(GOOD3))
    (directory / "src").mkdir()
    store.finish_install(rid(GOOD3), {"installed_at": "z"})
    store.switch_to(rid(GOOD3), "update")
    assert store.current() == rid(GOOD3) and up
    agent = FakeAgent()
    fresh = Updater(
        clock=env.clock,
        store=ReleaseStore(env.root),
        self_store=ReleaseStore(env.root / config.UPDATER_SELF_DIR),
        installer=FakeInstaller(),
        agent=agent,
        probe=None,
        to_thread=inline_runner,
    )
    env.run(fresh.start())
    assert fresh.store.current() == rid(GOOD2)
    assert agent.running == rid(GOOD2)
    assert fresh.health()["status"] == "ok"


def test_update_self_installs_with_pip_switches_and_restarts_after_answering(env):
    push(env, GOOD1)
    result = env.run(env.updater.update_self(upload_of(GOOD2), upload_of(GOOD2).sha256))
    assert result["result"] == "restarting" and result["release"] == rid(GOOD2)
    assert env.updater.self_store.current() == rid(GOOD2)
    assert env.installer.installed[-1] == (rid(GOOD2), True)
    # The agent keeps running until the answer is out; nothing else is accepted.
    with pytest.raises(UpdaterBusy, match="restarting"):
        push(env, GOOD3)
    answered = defer.Deferred()
    env.updater.restart_after(answered)
    env.clock.advance(5)
    assert env.restarts == []
    answered.callback(None)
    env.clock.advance(1)
    assert [p.name for p in env.restarts] == [rid(GOOD2)]
    assert env.agent.running is None  # stopped: the new updater starts it again
    # The agent's own release directory was not touched.
    assert env.updater.store.current() == rid(GOOD1)


def test_pushing_the_current_release_while_its_agent_is_unhealthy_is_not_updated(env):
    push(env, GOOD1)
    env.agent.sick.add(rid(GOOD1))
    with pytest.raises(HealthCheckFailed):
        push(env, GOOD1)


def test_an_unexpected_error_after_the_switch_still_reverts(env):
    push(env, GOOD1)
    real = env.agent.restart

    async def broken(release_dir):
        if release_dir.name == rid(GOOD2):
            raise RuntimeError("a bug in the agent control")
        await real(release_dir)

    env.agent.restart = broken
    with pytest.raises(RolledBack, match="a bug in the agent control"):
        push(env, GOOD2)
    assert env.updater.store.current() == rid(GOOD1)
    assert env.agent.running == rid(GOOD1)
    assert env.updater.store.journal.state == "idle"


def test_the_forwarders_start_waits_for_a_healthy_current_release(env):
    """release_ready (systemd: start decnet-forwarder.service) follows only a release
    that is current and healthy, never the switch to one that then fails."""
    env.agent.crashing.add(rid(BAD))
    with pytest.raises(HealthCheckFailed):
        push(env, BAD)  # a first release that fails: nothing to run the forwarder from
    assert env.agent.ready_for is None
    push(env, GOOD1)
    assert env.agent.ready_for == rid(GOOD1)
