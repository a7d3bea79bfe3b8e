"""Acceptance: ``renew --all`` on a running sandbox loses no log line.

The real ``sandbox up`` (listener, and per worker the updater, the agent it
runs from its installed release, and the forwarder), attacked by ``sandbox
poke`` while ``decnet-admin renew --all`` replaces every certificate.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from decnet import pki
from decnet.master.registry import Registry
from tests.e2e.test_acceptance import (  # noqa: F401 - sandbox_dir is a fixture
    WORKERS,
    Up,
    decoy_log,
    master_of,
    mirror,
    sandbox,
    sandbox_dir,
)
from tests.support import BIN, admin, wait_for

pytestmark = pytest.mark.slow

NET = "79"  # its own loopback network: not the acceptance test's, not a developer's sandbox


def test_renew_all_on_a_running_sandbox_while_it_is_attacked_loses_no_log_line(
    sandbox_dir,  # noqa: F811 - the fixture imported above
    tmp_path,
    wheelhouse,
):
    d = sandbox_dir
    paths = master_of(d)
    up = Up(d, tmp_path / "up.out", "--workers", "2", "--wheelhouse", str(wheelhouse), "--net", NET)
    up.wait_running(240)
    before = {h.name: h for h in Registry(paths.registry).list()}
    attack = subprocess.Popen(
        [
            "sh",
            "-c",
            f'for i in 1 2 3; do "{BIN}/decnet-admin" sandbox poke --dir "{d}" >/dev/null; done',
        ]
    )
    try:
        renewed = admin(paths, "renew", "--all", "--before", "400d", "--json")
    finally:
        attack.wait(120)
    assert renewed.returncode == 0, renewed.stdout + renewed.stderr
    assert [h["result"] for h in json.loads(renewed.stdout)["hosts"]] == ["renewed", "renewed"]
    poked = sandbox(d, "poke", "--json")  # after the switch: only the new certificates work
    assert poked.returncode == 0, poked.stdout + poked.stderr
    for worker in WORKERS:
        wait_for(
            lambda w=worker: mirror(d, w) == decoy_log(d, w),
            30,
            what=f"{worker}'s whole log at the master",
        )
        host = Registry(paths.registry).get(worker)
        assert host.worker_fingerprint != before[worker].worker_fingerprint
        bundle = pki.WorkerBundle.load(d / "workers" / worker / "bundle")
        assert pki.fingerprint(pki.load_cert(bundle.cert_path("worker"))) == host.worker_fingerprint
