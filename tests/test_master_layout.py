"""The master state tree keeps the CA key and the master's key away from the log listener.

The listener faces the internet on 6514.  It reads ``<home>/listener/`` only: a copy of the CA
certificate, a key of its own and the revocation list.  Agents and updaters pin the master's
key, forwarders the listener's, so a compromised listener can command no worker.
"""

import json
import os
import socket
import ssl
import stat

import pytest

from decnet import config, pki, revocation
from decnet.agent.service import tls_policy as agent_policy
from decnet.master import enrollment
from decnet.tls import Accept, PeerCertificateRefused, PeerPolicy, RefusalKind, TLSIdentity
from tests.logpipe_support import start_listener
from tests.support import tls_pair


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> config.MasterPaths:
    paths = config.MasterPaths.resolve(tmp_path_factory.mktemp("layout") / "home")
    enrollment.init_master(paths)
    return paths


@pytest.fixture(scope="module")
def bundle(home, tmp_path_factory) -> pki.WorkerBundle:
    out = tmp_path_factory.mktemp("bundle") / "w1"
    enrollment.enroll(enrollment.load_master(home), "w1", "127.0.0.1", out, updater=True)
    return pki.WorkerBundle.load(out)


def listener_identity(paths: config.MasterPaths) -> TLSIdentity:
    """Everything the listener can read, as a TLS identity."""
    return TLSIdentity.load(paths.listener_cert, paths.listener_key, paths.listener_ca_cert)


def test_init_gives_the_listener_a_directory_of_its_own_and_keeps_both_keys_that_matter_out_of_it(
    home,
):
    assert (mode(home.home), mode(home.ca_dir), mode(home.master_dir)) == (0o700, 0o700, 0o700)
    assert (mode(home.ca_key), mode(home.master_key)) == (0o600, 0o600)
    assert mode(home.listener_dir) == 0o750
    assert sorted(p.name for p in home.listener_dir.iterdir() if not p.name.startswith(".")) == [
        "ca.crt",
        "listener.crt",
        "listener.key",
    ]
    assert (mode(home.listener_key), mode(home.listener_cert), mode(home.listener_ca_cert)) == (
        0o640,
        0o644,
        0o644,
    )
    assert home.listener_ca_cert.read_bytes() == home.ca_cert.read_bytes()
    assert home.revocations.parent == home.listener_dir
    listener, master = listener_identity(home), TLSIdentity.master(home)
    assert listener.identity.role == config.ROLE_MASTER
    assert listener.identity.fingerprint != master.identity.fingerprint
    assert pki.key_pem(listener.key) != pki.key_pem(master.key)


def test_the_bundle_pins_the_listener_and_the_master_separately(home, bundle):
    master = enrollment.load_master(home)
    assert bundle.master_fingerprint == master.master_cert_fingerprint
    assert bundle.listener_fingerprint == master.listener_cert_fingerprint
    assert bundle.listener_fingerprint != bundle.master_fingerprint


def test_what_the_listener_can_read_cannot_command_an_agent_or_an_updater(home, bundle):
    """A client holding the listener's key is refused in the handshake by the agent's and
    the updater's policies, whose master pin is the master's key, not the listener's."""
    agent = TLSIdentity.from_bundle(bundle, config.ROLE_WORKER)
    updater = TLSIdentity.from_bundle(bundle, config.ROLE_UPDATER)
    # The updater's rule for the master, as decnet/updater/tap.py builds it.
    updater_master = Accept(
        config.ROLE_MASTER, cn=config.MASTER_CN, fingerprint=bundle.master_fingerprint
    )
    anyone = PeerPolicy([Accept(config.ROLE_WORKER), Accept(config.ROLE_UPDATER)])
    for server, policy in ((agent, agent_policy(bundle)), (updater, PeerPolicy([updater_master]))):
        _client, srv, _ = tls_pair(server, policy, listener_identity(home), anyone)
        assert not srv.handshake_done and srv.received == b""
        assert srv.lost_reason.check(PeerCertificateRefused)
        assert srv.lost_reason.value.refusal.kind is RefusalKind.FINGERPRINT
        # ...while the master's own key still gets in (the pin is not simply broken).
        _client, srv, _ = tls_pair(server, policy, TLSIdentity.master(home), anyone)
        assert srv.handshake_done


def test_the_running_listener_presents_its_own_certificate_which_the_forwarder_pins(
    home, bundle, tmp_path
):
    proc, port = start_listener(home.home, tmp_path / "ingest", tmp_path / "l.log")
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(bundle.ca_path)
        ctx.load_cert_chain(bundle.cert_path("worker"), bundle.key_path("worker"))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with ctx.wrap_socket(raw) as tls:
                served = tls.getpeercert(binary_form=True)
    finally:
        proc.terminate()
        proc.wait(10)
    served_fp = pki.fingerprint(pki.x509.load_der_x509_certificate(served))
    assert served_fp == bundle.listener_fingerprint
    assert served_fp != bundle.master_fingerprint


def test_a_bundle_from_before_the_listener_had_a_key_pins_the_master_for_both(bundle, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    for f in bundle.directory.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    settings = json.loads((old / "bundle.json").read_text())
    del settings["listener_fingerprint"]
    (old / "bundle.json").write_text(json.dumps(settings))
    assert pki.WorkerBundle.load(old).listener_fingerprint == bundle.master_fingerprint
    settings["listener_fingerprint"] = "not-a-fingerprint"
    (old / "bundle.json").write_text(json.dumps(settings))
    with pytest.raises(pki.PKIError, match="not a SHA-256 fingerprint"):
        pki.WorkerBundle.load(old)


def test_init_upgrades_a_home_from_before_listener_and_keeps_every_revocation(tmp_path):
    """The old layout kept revoked.json in the home; init moves it (merging with any list
    already in listener/) before the listener can find its identity, so no revoked worker
    gets back in."""
    paths = config.MasterPaths.resolve(tmp_path / "home")
    enrollment.init_master(paths)
    old_entry = {"fingerprint": "aa" * 32, "cn": "old-1", "role": "worker", "revoked_at": "x"}
    new_entry = {"fingerprint": "bb" * 32, "cn": "new-1", "role": "worker", "revoked_at": "y"}
    revocation.add_entries(paths.legacy_revocations, [old_entry])
    revocation.add_entries(paths.revocations, [new_entry])
    paths.listener_cert.unlink()
    paths.listener_key.unlink()
    with pytest.raises(pki.MissingFileError, match="decnet-admin init"):
        enrollment.load_master(paths)  # enroll / decommission refuse until init ran
    state = enrollment.init_master(paths)
    assert not paths.legacy_revocations.exists()
    assert {e["cn"] for e in revocation.read_entries(paths.revocations)} == {"old-1", "new-1"}
    assert state.listener_cert_fingerprint == pki.fingerprint(pki.load_cert(paths.listener_cert))


def test_init_keeps_a_home_made_0710_for_the_listener_and_tightens_any_other_to_0700(tmp_path):
    """On a real master the operator makes the home 0710 for group decnet-listener."""
    home = tmp_path / "home"
    home.mkdir()
    for sloppy in (0o755, 0o711, 0o750, 0o2710):
        os.chmod(home, sloppy)
        enrollment.init_master(config.MasterPaths.resolve(home))
        assert mode(home) == 0o700, oct(sloppy)
    os.chmod(home, 0o710)  # noqa: S103 - what the operator does on a real master
    enrollment.init_master(config.MasterPaths.resolve(home))
    assert mode(home) == 0o710
