"""Renewal against the real ``twistd decnet-updater`` and ``twistd decnet-agent`` plugins.

Both worker daemons are killed with SIGKILL in the middle of a renewal and
started again; the real ``decnet-admin renew`` then completes it, and at no
moment does the master's view of the host (its pins) stop reaching the agent.
"""

from __future__ import annotations

import json
import os

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue

from decnet import config, pki, revocation
from decnet.master import enrollment
from decnet.master.http import client_for_host
from decnet.master.renewal import Renewal, Step, steps_for
from decnet.tls import TLSIdentity
from decnet.updater import renewal as worker_renewal
from tests.enroll_support import fresh_master
from tests.support import BIN, LocalUpdater, record_ports
from tests.test_agent_subprocess import AgentProcess


@pytest.fixture
def master(master_home, tmp_path):
    return fresh_master(master_home, tmp_path)


async def reachable(master, name: str, role: str = config.ROLE_WORKER) -> bool:
    host = enrollment.Registry(master.paths.registry).get(name)
    client = client_for_host(reactor, TLSIdentity.master(master.paths), host, role, timeout=5)
    try:
        await client.call("GET", "health")
        return True
    finally:
        await client.close()


@pytest.mark.slow
@pytest.mark.parametrize("killed_after", [Step.REQUEST, Step.PUSH])
@pytest_twisted.ensureDeferred
async def test_worker_daemons_killed_mid_renewal_come_back_and_a_second_renew_completes(
    master, tmp_path, killed_after
):
    name = f"rk-{killed_after.name.lower()}"
    updater = LocalUpdater(tmp_path, master.paths, name).start()
    bundle = pki.WorkerBundle.load(updater.base / "bundle")
    agent = AgentProcess(tmp_path, bundle.directory)
    try:
        record_ports(master.paths, name, agent_port=agent.start())
        old = enrollment.Registry(master.paths.registry).get(name)
        first = Renewal(
            reactor,
            master,
            TLSIdentity.master(master.paths),
            enrollment.Registry(master.paths.registry),
        )
        host = old
        for step in steps_for(old):
            host = await first._run(step, host)
            if step is killed_after:
                break  # and the master CLI dies here too
        updater.kill9()
        agent.kill()
        if killed_after is Step.PUSH:
            # The new pair is installed: both daemons start from it.
            installed = pki.fingerprint(pki.load_cert(bundle.cert_path("worker")))
            assert installed == host.pending_worker_fingerprint
        updater.start()
        record_ports(master.paths, name, agent_port=agent.start())
        assert await reachable(master, name)
        assert await reachable(master, name, config.ROLE_UPDATER)

        env = {k: v for k, v in os.environ.items() if k != config.ENV_HOME}
        out, err, code = await getProcessOutputAndValue(
            str(BIN / "decnet-admin"),
            ["--home", str(master.paths.home), "renew", name, "--json"],
            env=env,
        )
        assert code == 0, err.decode() + updater.tail() + agent.log()
        assert json.loads(out)["hosts"][0]["result"] == "renewed"
        new = enrollment.Registry(master.paths.registry).get(name)
        assert new.worker_fingerprint == pki.fingerprint(pki.load_cert(bundle.cert_path("worker")))
        assert new.worker_fingerprint != old.worker_fingerprint and not new.renewing
        assert await reachable(master, name)
        revoked = {e["fingerprint"] for e in revocation.read_entries(master.paths.revocations)}
        assert old.worker_fingerprint in revoked and new.worker_fingerprint not in revoked
        assert not worker_renewal.pending_dir(bundle).exists()
    finally:
        agent.kill()
        updater.stop()


@pytest.mark.slow
def test_an_updater_killed_inside_the_install_finishes_it_when_it_starts_again(master, tmp_path):
    """The key replaced, its certificate not yet (kill -9 between two renames)."""
    import shutil

    updater = LocalUpdater(tmp_path, master.paths, "rk-install")
    bundle = pki.WorkerBundle.load(updater.base / "bundle")
    csrs = worker_renewal.request_csrs(bundle)
    host = enrollment.Registry(master.paths.registry).get("rk-install")
    from decnet.master.renewal import sign

    certs, _ = sign(master, host, {"csrs": csrs})
    pending = worker_renewal.pending_dir(bundle)
    for role in ("worker", "updater"):
        (pending / f"{role}.crt").write_text(certs[role])
    shutil.copy(pending / "updater.key", bundle.key_path("updater"))
    try:
        updater.start()  # would refuse a key that does not match its certificate
        assert pki.cert_pem(pki.load_cert(bundle.cert_path("updater"))).decode() == certs["updater"]
        assert not pending.exists()
    finally:
        updater.stop()
