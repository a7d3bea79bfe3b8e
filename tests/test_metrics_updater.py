"""The updater's metrics follow what its engine did (the engine of test_updater_engine)."""

import pytest
from twisted.internet import defer

from decnet.errors import InstallFailed, RollbackFailed, RolledBack, UpdaterBusy
from decnet.updater.metrics import UpdaterMetrics
from tests.metrics_support import render
from tests.test_updater_engine import BAD, GOOD1, GOOD2, GOOD3, env, push, rid, upload_of

__all__ = ["env"]  # (the fixture, shared with the engine's tests)


@pytest.fixture
def metrics(env):
    return UpdaterMetrics(env.updater, env.clock)


def updates(metrics) -> dict[str, float]:
    return {
        s.labels["result"]: s.value
        for s in render_of(metrics).samples
        if s.name == "decnet_updater_updates_total"
    }


def render_of(metrics):
    from prometheus_client import CollectorRegistry

    from decnet.metrics import DaemonMetrics

    daemon = DaemonMetrics(CollectorRegistry(auto_describe=False))
    daemon.registry.register(metrics.install_seconds)
    daemon.add(metrics)
    return render(daemon)


def test_an_update_that_fails_its_health_check_counts_as_an_automatic_rollback(env, metrics):
    push(env, GOOD1)
    env.agent.sick.add(rid(BAD))
    env.clock.advance(1000)
    with pytest.raises(RolledBack):
        push(env, BAD)
    scrape = render_of(metrics)
    assert updates(metrics) == {
        "updated": 1,
        "rolled_back": 1,
        "rollback_failed": 0,
        "failed": 0,
        "busy": 0,
    }
    assert scrape.value("decnet_updater_rollbacks_total", trigger="automatic") == 1
    assert scrape.value("decnet_updater_rollbacks_total", trigger="requested") == 0
    assert scrape.value("decnet_updater_last_rollback_timestamp_seconds") == env.clock.seconds()
    assert scrape.value("decnet_updater_install_duration_seconds_count") == 2


def test_a_rollback_that_fails_too_is_counted_apart(env, metrics):
    push(env, GOOD1)
    env.agent.sick.update({rid(BAD), rid(GOOD1)})
    with pytest.raises(RollbackFailed):
        push(env, BAD)
    assert updates(metrics)["rollback_failed"] == 1
    assert updates(metrics)["failed"] == 0


def test_a_requested_rollback_and_refusals_while_busy(env, metrics):
    push(env, GOOD1)
    push(env, GOOD2)
    env.run(env.updater.rollback())
    hanging = env.health.pending = defer.Deferred()
    first = defer.ensureDeferred(env.updater.update(upload_of(GOOD3), upload_of(GOOD3).sha256))
    busy = render_of(metrics)
    assert busy.value("decnet_updater_busy") == 1
    with pytest.raises(UpdaterBusy):
        push(env, GOOD3)
    env.health.pending = None
    hanging.callback({"status": "ok", "release": rid(GOOD3)})
    assert first.result["result"] == "updated"
    scrape = render_of(metrics)
    assert scrape.value("decnet_updater_rollbacks_total", trigger="requested") == 1
    assert scrape.value("decnet_updater_rollbacks_total", trigger="automatic") == 0
    assert updates(metrics)["busy"] == 1 and updates(metrics)["updated"] == 3
    assert scrape.value("decnet_updater_busy") == 0


def test_install_duration_is_measured_on_the_injected_clock_and_failures_left_out(env, metrics):
    real = env.installer.install

    async def slow(release_dir, *, with_pip=False):
        env.clock.advance(42)
        return await real(release_dir, with_pip=with_pip)

    env.installer.install = slow
    push(env, GOOD1)
    env.installer.fail = True
    with pytest.raises(InstallFailed):
        push(env, GOOD2)
    scrape = render_of(metrics)
    assert scrape.value("decnet_updater_install_duration_seconds_count") == 1
    assert scrape.value("decnet_updater_install_duration_seconds_sum") == 42
    assert scrape.value("decnet_updater_install_duration_seconds_bucket", le="60.0") == 1
    assert scrape.value("decnet_updater_install_duration_seconds_bucket", le="30.0") == 0
    assert updates(metrics)["failed"] == 1


def test_a_broken_outcome_listener_is_logged_and_never_changes_the_outcome(env):
    from tests.logpipe_support import LogCapture

    def broken(_outcome):
        raise RuntimeError("listener bug")

    env.updater.outcome_listeners.append(broken)
    with LogCapture() as logs:
        result = push(env, GOOD1)
    assert result["result"] == "updated" and env.updater.store.current() == rid(GOOD1)
    assert "An outcome listener failed on update" in logs.text()
