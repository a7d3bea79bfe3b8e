"""A compromised worker with valid certificates answering a renewal with lies.

It asks for the master's name and role and ``CA:TRUE``, lies about what it
installed, sends escape sequences.  The master signs only its own values,
never commits a switch the worker did not prove, keeps the host reachable
with its old pins, and shows nothing raw on the operator's terminal.
"""

from __future__ import annotations

import json

import pytest_twisted
from cryptography import x509
from twisted.internet import reactor

from decnet import pki, revocation
from decnet.master import enrollment
from tests.enroll_support import hostile_csr
from tests.hostile_worker import EVIL, FakeWorker, Reply, fresh_master, no_control_characters
from tests.renew_support import admin_async
from tests.support import record_ports


@pytest_twisted.ensureDeferred
async def test_a_lying_worker_gets_only_the_masters_values_and_no_switch(master_home, tmp_path):
    master = fresh_master(master_home, tmp_path / "home")
    enrollment.enroll(master, "liar-01", "127.0.0.1", tmp_path / "bundle", updater=True)
    keys = {role: pki.generate_key() for role in ("worker", "updater")}
    routes = {
        ("updater", "renew/csr"): Reply(
            {
                "csrs": {role: hostile_csr(k) for role, k in keys.items()},
                "note": EVIL,
            }
        ),
        # "Installed", it says, with fingerprints of its own choosing.
        ("updater", "renew/install"): Reply({"installed": {"worker": EVIL, "updater": "0" * 64}}),
    }
    fake = await FakeWorker(tmp_path / "bundle", routes).start(reactor)
    try:
        record_ports(
            master.paths, "liar-01", agent_port=fake.agent_port, updater_port=fake.updater_port
        )
        old = enrollment.Registry(master.paths.registry).get("liar-01")
        for args in (("renew", "liar-01"), ("renew", "liar-01", "--json")):
            out, err, code = await admin_async(master, *args)
            assert code == 1
            assert no_control_characters(out + err) == []
            assert "Traceback" not in err
        doc = json.loads(out)
        assert doc["hosts"][0]["result"] == "failed", fake.requests
        assert "other certificates than those sent" in doc["hosts"][0]["detail"], fake.requests
    finally:
        await fake.stop()
    host = enrollment.Registry(master.paths.registry).get("liar-01")
    # Nothing switched: the old pins stand, nothing was revoked; the new pins wait, and
    # the certificates issued for them carry the master's values only.
    assert (host.worker_fingerprint, host.updater_fingerprint) == (
        old.worker_fingerprint,
        old.updater_fingerprint,
    )
    assert host.renewing
    assert revocation.read_entries(master.paths.revocations) == []
    issued = json.loads(host.pending_certificates or "{}")["certificates"]
    for role, pem in issued.items():
        cert = x509.load_pem_x509_certificate(pem.encode())
        identity = pki.identity_of(cert)
        assert (identity.cn, identity.role) == (pki.cn_for(role, "liar-01"), role)
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.DNSName) == ["liar-01"]
