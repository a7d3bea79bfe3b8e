"""Renewal of a running worker: real agent, updater, forwarder and listener on loopback.

The master side runs as the real ``decnet-admin renew`` subprocess, or, to
interrupt it after a given step, as :class:`decnet.master.renewal.Renewal` in
this process (the CLI killed between two steps is exactly a Renewal that ran
only the first of them).
"""

from __future__ import annotations

import json
import stat

import pytest
import pytest_twisted
from twisted.internet import reactor

from decnet import pki, revocation
from decnet.errors import HostDecommissioned
from decnet.master import enrollment
from decnet.master.renewal import Renewal, Step, steps_for
from decnet.tls import TLSIdentity
from decnet.updater import renewal as worker_renewal
from tests.enroll_support import fresh_master, registry_dump
from tests.renew_support import admin_async, agent_health, start_worker, stop_worker
from tests.support import eventually


@pytest.fixture
def master(master_home, tmp_path):
    return fresh_master(master_home, tmp_path)


@pytest_twisted.async_yield_fixture
async def worker(master, tmp_path):
    running = await start_worker(master, tmp_path, "rn-01")
    yield running
    await stop_worker(running)


def renewal(master) -> Renewal:
    return Renewal(
        reactor,
        master,
        TLSIdentity.master(master.paths),
        enrollment.Registry(master.paths.registry),
        timeout=10,
    )


def bundle_fingerprints(worker) -> dict[str, str]:
    return {
        role: pki.fingerprint(pki.load_cert(worker.bundle.cert_path(role)))
        for role in ("worker", "updater")
    }


async def all_lines_arrived(worker) -> None:
    await worker.stop_traffic()
    worker.write_lines(5)  # after the revocation: only the new certificate can ship these
    expected = bytes(worker.written)
    await eventually(
        lambda: worker.mirror.exists() and worker.mirror.read_bytes() == expected,
        timeout=30,
        what="every log line in the master's mirror",
    )


@pytest_twisted.ensureDeferred
async def test_renew_swaps_every_certificate_while_logs_flow_and_the_agent_stays_reachable(
    master, worker
):
    old = worker.registry.get("rn-01")
    worker.start_traffic()
    out, err, code = await admin_async(master, "renew", "rn-01", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert [h["result"] for h in doc["hosts"]] == ["renewed"]

    new = worker.registry.get("rn-01")
    assert new.worker_fingerprint != old.worker_fingerprint
    assert new.updater_fingerprint != old.updater_fingerprint
    assert not new.renewing and new.expires_at
    # The worker holds the certificates the master pinned, with keys made on the worker.
    assert bundle_fingerprints(worker) == {
        "worker": new.worker_fingerprint,
        "updater": new.updater_fingerprint,
    }
    for role in ("worker", "updater"):
        assert stat.S_IMODE(worker.bundle.key_path(role).stat().st_mode) == 0o600
    assert not worker_renewal.pending_dir(worker.bundle).exists()
    revoked = {e["fingerprint"] for e in revocation.read_entries(master.paths.revocations)}
    assert revoked == {old.worker_fingerprint, old.updater_fingerprint}
    # The daemons present the new certificates without a restart.
    await eventually(lambda: worker.agent.running and worker.updater.running, what="running")
    assert await agent_health(worker) == "ok"
    await all_lines_arrived(worker)
    assert worker.probes and set(worker.probes) == {"ok"}, set(worker.probes)


@pytest.mark.parametrize("interrupted_after", [Step.REQUEST, Step.PUSH, Step.CONFIRM])
@pytest_twisted.ensureDeferred
async def test_a_renewal_interrupted_after_any_step_is_completed_by_the_next_renew(
    master, worker, interrupted_after
):
    old = worker.registry.get("rn-01")
    worker.start_traffic()
    first = renewal(master)
    host = old
    for step in steps_for(old):
        host = await first._run(step, host)
        if step is interrupted_after:
            break  # the CLI is killed here
    assert await agent_health(worker) == "ok"  # never unreachable in between
    outcome = await renewal(master).renew("rn-01")
    assert outcome.result == "renewed"
    new = worker.registry.get("rn-01")
    assert new.worker_fingerprint not in (old.worker_fingerprint, None)
    assert bundle_fingerprints(worker)["worker"] == new.worker_fingerprint
    await all_lines_arrived(worker)
    assert set(worker.probes) == {"ok"}, set(worker.probes)


@pytest_twisted.ensureDeferred
async def test_a_master_killed_between_revoking_and_recording_is_completed_by_the_next_renew(
    master, worker
):
    old = worker.registry.get("rn-01")
    first = renewal(master)
    host = old
    for step in (Step.REQUEST, Step.PUSH, Step.CONFIRM):
        host = await first._run(step, host)
    revocation.add_entries(
        master.paths.revocations, enrollment.revocation_entries(old, "2026-01-01T00:00:00+00:00")
    )  # the first half of COMMIT, then the kill
    assert await agent_health(worker) == "ok"
    assert (await renewal(master).renew("rn-01")).result == "renewed"
    assert worker.registry.get("rn-01").worker_fingerprint == host.pending_worker_fingerprint


@pytest_twisted.ensureDeferred
async def test_a_worker_that_lost_its_pending_keys_gets_a_fresh_renewal(master, worker):
    first = renewal(master)
    host = await first._run(Step.REQUEST, worker.registry.get("rn-01"))
    # The updater's machine lost the pending directory (a restore, a wiped /etc).
    for child in worker_renewal.pending_dir(worker.bundle).iterdir():
        child.unlink()
    worker_renewal.pending_dir(worker.bundle).rmdir()
    outcome = await renewal(master).renew("rn-01")
    assert outcome.result == "renewed"
    new = worker.registry.get("rn-01")
    assert new.worker_fingerprint != host.pending_worker_fingerprint  # signed again
    assert bundle_fingerprints(worker)["worker"] == new.worker_fingerprint


@pytest_twisted.ensureDeferred
async def test_a_renewal_racing_a_decommission_leaves_no_certificate_of_the_host_usable(
    master, worker
):
    first = renewal(master)
    host = await first._run(Step.REQUEST, worker.registry.get("rn-01"))
    await first._run(Step.PUSH, host)  # the worker now presents the new certificates
    enrollment.decommission(master, "rn-01")
    revoked = {e["fingerprint"] for e in revocation.read_entries(master.paths.revocations)}
    assert {host.pending_worker_fingerprint, host.pending_updater_fingerprint} <= revoked
    assert {host.worker_fingerprint, host.updater_fingerprint} <= revoked
    before = registry_dump(master.paths.registry)
    with pytest.raises(HostDecommissioned):
        await renewal(master).renew("rn-01")
    assert registry_dump(master.paths.registry) == before


@pytest_twisted.ensureDeferred
async def test_dry_run_lists_the_due_hosts_and_changes_nothing(master, worker):
    before = registry_dump(master.paths.registry)
    files = bundle_fingerprints(worker)
    out, err, code = await admin_async(
        master, "renew", "--all", "--before", "400d", "--dry-run", "--json"
    )
    assert code == 0, err
    assert json.loads(out)["hosts"][0]["name"] == "rn-01"
    out, err, code = await admin_async(master, "renew", "--all", "--dry-run", "--json")
    assert code == 0 and json.loads(out)["hosts"] == []  # 397 days left: not due
    assert registry_dump(master.paths.registry) == before
    assert bundle_fingerprints(worker) == files
    assert not worker_renewal.pending_dir(worker.bundle).exists()


@pytest_twisted.ensureDeferred
async def test_only_the_master_may_ask_for_csrs_or_push_certificates(master, worker):
    """A decoy that took over the agent holds the worker key: it still cannot renew."""
    from decnet.errors import RemoteError
    from decnet.httpclient import PinnedClient
    from decnet.tls import Accept

    host = worker.registry.get("rn-01")
    as_worker = PinnedClient(
        reactor,
        TLSIdentity.from_bundle(worker.bundle, "worker"),
        address="127.0.0.1",
        port=host.updater_port,
        accept=Accept("updater", cn="updater@rn-01", fingerprint=host.updater_fingerprint),
        timeout=5,
    )
    try:
        for route in ("renew/csr", "renew/install"):
            with pytest.raises(RemoteError) as refused:
                await as_worker.call("POST", *route.split("/"), json={"certificates": {}})
            assert refused.value.status == 403
    finally:
        await as_worker.close()
    assert not worker_renewal.pending_dir(worker.bundle).exists()


@pytest_twisted.ensureDeferred
async def test_two_operators_renewing_the_same_host_at_once_leave_it_consistent(master, worker):
    from twisted.internet import defer

    from decnet.errors import DecnetError

    async def attempt() -> str:
        try:
            return (await renewal(master).renew("rn-01")).result
        except DecnetError as exc:
            return f"failed: {exc}"

    results = await defer.gatherResults(
        [defer.ensureDeferred(attempt()), defer.ensureDeferred(attempt())]
    )
    assert "renewed" in results, results
    for result in results:
        assert result == "renewed" or "another command" in result, results
    host = worker.registry.get("rn-01")
    if host.renewing:  # the loser recorded nothing; a rerun finishes whatever is left
        assert (await renewal(master).renew("rn-01")).result == "renewed"
        host = worker.registry.get("rn-01")
    assert bundle_fingerprints(worker) == {
        "worker": host.worker_fingerprint,
        "updater": host.updater_fingerprint,
    }
    assert await agent_health(worker) == "ok"
