"""Renewal step by step: the worker's planner and install, the master's steps and signing.

Pure or file-level: no sockets.  Each step of a renewal, and each place a
crash can cut one short, is a state here, checked on its own.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import stat

import attrs
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from decnet import config, pki
from decnet.cli.renew import select
from decnet.errors import (
    BadReply,
    HostDecommissioned,
    PKIError,
    RenewalFailed,
    RenewalRefused,
    ValidationError,
)
from decnet.master import enrollment
from decnet.master.registry import Host
from decnet.master.renewal import Step, is_due, overlap_host, parse_days, sign, steps_for
from decnet.tls import Accept, BundleIdentity, PeerPolicy, PolicyOptions, TLSIdentity
from decnet.updater import renewal as wr
from tests.enroll_support import fresh_master, hostile_csr
from tests.support import tls_pair_with


@pytest.fixture
def master(master_home, tmp_path):
    return fresh_master(master_home, tmp_path)


@pytest.fixture
def bundle(master, tmp_path) -> pki.WorkerBundle:
    enrollment.enroll(
        master, "st-01", "127.0.0.1", tmp_path / "bundle", updater=True, sans=["10.9.8.7"]
    )
    return pki.WorkerBundle.load(tmp_path / "bundle")


def signed_for(master, bundle, csrs: dict[str, str]) -> dict[str, str]:
    host = enrollment.Registry(master.paths.registry).get(bundle.name)
    current = bundle.cert_path("worker").read_text()
    certs, _ = sign(master, host, {"csrs": csrs, "current": current})
    return certs


def tree(path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


# -- the worker's planner (pure) -------------------------------------------------------------

ROLES = ("worker", "updater")


@pytest.mark.parametrize(
    ("observed", "expected"),
    [
        (wr.Observed(ROLES), wr.Plan(wr.Phase.IDLE, make_keys=ROLES)),
        (wr.Observed(ROLES, leftovers=True), wr.Plan(wr.Phase.IDLE, ROLES, clean_up=True)),
        (
            wr.Observed(ROLES, keys=frozenset({"worker"}), leftovers=True),
            wr.Plan(wr.Phase.KEYS, make_keys=("updater",)),
        ),
        (wr.Observed(ROLES, keys=frozenset(ROLES), leftovers=True), wr.Plan(wr.Phase.KEYS)),
        (
            wr.Observed(ROLES, frozenset(ROLES), frozenset({"worker"}), leftovers=True),
            wr.Plan(wr.Phase.KEYS),
        ),
        (
            wr.Observed(ROLES, frozenset(ROLES), frozenset(ROLES), leftovers=True),
            wr.Plan(wr.Phase.STAGED, install=ROLES, clean_up=True),
        ),
        (
            wr.Observed(
                ROLES, frozenset(ROLES), frozenset(ROLES), frozenset({"worker"}), leftovers=True
            ),
            wr.Plan(wr.Phase.STAGED, install=("updater",), clean_up=True),
        ),
    ],
)
def test_the_worker_planner_names_the_steps_left_for_each_state(observed, expected):
    assert wr.plan(observed) == expected


def public(csrs: dict[str, str]) -> dict[str, bytes]:
    return {role: pki.spki(pki.csr_public_key(pem)) for role, pem in csrs.items()}


def test_csrs_asked_twice_offer_the_same_keys_made_0600_inside_the_bundle(bundle):
    first = public(wr.request_csrs(bundle))
    again = public(wr.request_csrs(bundle))
    assert first == again and set(first) == set(ROLES)
    pending = wr.pending_dir(bundle)
    assert pending.parent == bundle.directory  # the one directory the updater may write
    assert stat.S_IMODE(pending.stat().st_mode) == 0o700
    for role in ROLES:
        assert stat.S_IMODE((pending / f"{role}.key").stat().st_mode) == 0o600


def test_a_pending_key_cut_short_by_a_crash_is_made_again(bundle):
    first = public(wr.request_csrs(bundle))
    torn = wr.pending_dir(bundle) / "updater.key"
    torn.write_bytes(torn.read_bytes()[:40])  # the key written at run time, cut short
    again = public(wr.request_csrs(bundle))
    assert again["worker"] == first["worker"] and again["updater"] != first["updater"]


def test_install_puts_the_new_pair_in_place_and_removes_the_pending_keys(master, bundle):
    certs = signed_for(master, bundle, wr.request_csrs(bundle))
    installed = wr.install(bundle, certs)
    for role in ROLES:
        identity = TLSIdentity.from_bundle(bundle, role)  # key and certificate match
        assert identity.identity.fingerprint == installed[role]
    assert not wr.pending_dir(bundle).exists()
    assert wr.install(bundle, certs) == installed  # the master retrying: same answer


@pytest.mark.parametrize("role_done", [0, 1, 2])
def test_a_crash_between_key_and_certificate_is_finished_at_the_next_start(
    master, bundle, role_done
):
    """kill -9 inside the install: a key replaced, its certificate not yet; settle() finishes."""
    certs = signed_for(master, bundle, wr.request_csrs(bundle))
    pending = wr.pending_dir(bundle)
    for role in ROLES:
        (pending / f"{role}.crt").write_text(certs[role])
    for role in ROLES[:role_done]:
        shutil.copy(pending / f"{role}.key", bundle.key_path(role))
        shutil.copy(pending / f"{role}.crt", bundle.cert_path(role))
    role = ROLES[min(role_done, 1)]
    shutil.copy(pending / f"{role}.key", bundle.key_path(role))  # the key, not its certificate
    if role_done < 2:
        with pytest.raises(PKIError):
            TLSIdentity.from_bundle(bundle, role)  # no daemon swaps to a mismatched pair
    assert wr.settle(bundle) is wr.Phase.IDLE
    for role in ROLES:
        assert pki.cert_pem(TLSIdentity.from_bundle(bundle, role).cert).decode() == certs[role]
    assert not pending.exists()


def test_a_daemon_keeps_its_identity_while_the_pair_is_half_installed(master, bundle):
    current = TLSIdentity.from_bundle(bundle, "worker")
    source = BundleIdentity(bundle, "worker", current)
    assert source.read_if_changed() is None
    certs = signed_for(master, bundle, wr.request_csrs(bundle))
    shutil.copy(wr.pending_dir(bundle) / "worker.key", bundle.key_path("worker"))
    with pytest.raises(PKIError):
        source.read_if_changed()
    bundle.cert_path("worker").write_text(certs["worker"])
    new = source.read_if_changed()
    assert new is not None and pki.cert_pem(new.cert).decode() == certs["worker"]


def test_install_refuses_certificates_this_worker_holds_no_key_for_and_changes_nothing(
    master, bundle
):
    wr.request_csrs(bundle)
    others = {role: pki.make_csr(pki.generate_key()).decode() for role in ROLES}
    certs = signed_for(master, bundle, others)
    before = tree(bundle.directory)
    with pytest.raises(RenewalRefused, match="no pending worker key"):
        wr.install(bundle, certs)
    assert tree(bundle.directory) == before


def test_install_refuses_a_foreign_ca_another_name_or_role(master, bundle, foreign_ca, ca):
    csrs = wr.request_csrs(bundle)
    keys = {r: pki.csr_public_key(csrs[r]) for r in ROLES}
    good = signed_for(master, bundle, csrs)
    before = tree(bundle.directory)
    forged = {
        "foreign CA": {
            **good,
            "worker": pki.cert_pem(pki.certify(foreign_ca, keys["worker"], "worker", "st-01")),
        },
        "another name": {
            **good,
            "worker": pki.cert_pem(pki.certify(ca, keys["worker"], "worker", "st-02")),
        },
        "another role": {**good, "worker": good["updater"]},
        "missing role": {"worker": good["worker"]},
        "not PEM": {**good, "updater": "\x1b]0;pwned\x07"},
    }
    for what, certs in forged.items():
        certs = {k: v.decode() if isinstance(v, bytes) else v for k, v in certs.items()}
        with pytest.raises(RenewalRefused):
            wr.install(bundle, certs)
        assert tree(bundle.directory) == before, what


# -- the master's steps (pure) ---------------------------------------------------------------


def host(**kw) -> Host:
    base = dict(
        name="st-01",
        address="127.0.0.1",
        agent_port=1,
        updater_port=2,
        worker_fingerprint="a" * 64,
        updater_fingerprint="b" * 64,
        enrolled_at="2026-01-01T00:00:00+00:00",
        expires_at="2027-01-01T00:00:00+00:00",
    )
    return Host(**{**base, **kw})


def test_the_master_runs_four_steps_then_three_once_the_new_pins_are_recorded():
    assert steps_for(host()) == (Step.REQUEST, Step.PUSH, Step.CONFIRM, Step.COMMIT)
    pending = host(pending_worker_fingerprint="c" * 64, pending_updater_fingerprint="d" * 64)
    assert steps_for(pending) == (Step.PUSH, Step.CONFIRM, Step.COMMIT)
    assert overlap_host(pending).worker_fingerprint == "c" * 64
    with pytest.raises(HostDecommissioned):
        steps_for(host(status="decommissioned"))
    with pytest.raises(RenewalFailed, match="--updater"):
        steps_for(host(updater_fingerprint=None))


def test_a_host_is_due_within_before_days_when_unknown_or_half_renewed():
    end = datetime.datetime(2027, 1, 1, tzinfo=datetime.UTC).timestamp()
    day = 86400
    assert not is_due(host(), end - 31 * day, 30)
    assert is_due(host(), end - 29 * day, 30)
    assert is_due(host(expires_at=None), end - 300 * day, 30)
    assert is_due(host(pending_worker_fingerprint="c" * 64), end - 300 * day, 30)
    assert not is_due(host(status="decommissioned"), end, 30)


@pytest.mark.parametrize("typo", ["30x", "-1d", "", "d", "1e3"])
def test_a_mistyped_before_is_refused_with_an_example(typo):
    with pytest.raises(ValidationError, match=r"e\.g\. 30d"):
        parse_days(typo)


def test_renew_needs_names_or_all_and_refuses_unknown_or_decommissioned_names():
    hosts = [host(), host(name="gone-01", status="decommissioned")]

    def args(*names, all=False, before=None):
        return argparse.Namespace(names=list(names), all=all, before=before)

    with pytest.raises(ValidationError, match="not both"):
        select(args(), hosts, 0)
    with pytest.raises(ValidationError, match="not both"):
        select(args("st-01", all=True), hosts, 0)
    with pytest.raises(ValidationError, match="no host named 'st-9'"):
        select(args("st-9"), hosts, 0)
    with pytest.raises(ValidationError, match="decommissioned"):
        select(args("gone-01"), hosts, 0)
    assert [h.name for h in select(args("st-01"), hosts, 0)] == ["st-01"]
    assert select(args(all=True), hosts, 0) == []  # far from expiry, and gone-01 is retired


# -- a compromised worker answering the renewal ----------------------------------------------


def test_a_hostile_csr_gets_the_masters_subject_sans_ekus_and_no_ca_flag(master, bundle):
    keys = {r: pki.generate_key() for r in ROLES}
    csrs = {r: hostile_csr(keys[r]) for r in ROLES}
    for role, pem in signed_for(master, bundle, csrs).items():
        cert = x509.load_pem_x509_certificate(pem.encode())
        identity = pki.identity_of(cert)
        assert (identity.cn, identity.role) == (pki.cn_for(role, "st-01"), role)
        assert (
            cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == role
        )
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert "evil.example" not in sans.get_values_for_type(x509.DNSName)
        assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {
            "127.0.0.1",
            "10.9.8.7",  # the SAN chosen at enrollment is kept
        }
        ekus = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert set(ekus) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}


def test_a_worker_lying_about_its_current_certificate_or_sending_junk_is_a_bad_reply(
    master, bundle, ca
):
    registry = enrollment.Registry(master.paths.registry)
    h = registry.get("st-01")
    keys, csrs = {}, {}
    for role in ROLES:
        keys[role] = pki.generate_key()
        csrs[role] = pki.make_csr(keys[role]).decode()
    # Another certificate from our CA, with SANs the worker would like to have.
    other = pki.issue_leaf(ca, "worker", "st-01", addresses=["203.0.113.66"])
    lies = {
        "unpinned current": {"csrs": csrs, "current": pki.cert_pem(other.cert).decode()},
        "current not PEM": {"csrs": csrs, "current": "nope"},
        "CSR missing": {"csrs": {"worker": csrs["worker"]}},
        "CSR junk": {"csrs": {**csrs, "updater": "\x1b[2J"}},
        "one key twice": {"csrs": {"worker": csrs["worker"], "updater": csrs["worker"]}},
    }
    for what, doc in lies.items():
        with pytest.raises(BadReply):
            sign(master, h, doc)
        assert registry.get("st-01") == h, what


def test_begin_renewal_is_refused_for_a_decommissioned_host_and_changes_nothing(master, bundle):
    registry = enrollment.Registry(master.paths.registry)
    h = registry.get("st-01")
    enrollment.decommission(master, "st-01")
    with pytest.raises(RenewalFailed, match="decommissioned or renewed"):
        registry.begin_renewal(h, "c" * 64, "d" * 64, json.dumps({}))
    assert not registry.get("st-01").renewing


def test_two_operators_renewing_at_once_record_one_renewal(master, bundle):
    registry = enrollment.Registry(master.paths.registry)
    h = registry.get("st-01")
    registry.begin_renewal(h, "c" * 64, "d" * 64, "{}")
    with pytest.raises(RenewalFailed):
        registry.begin_renewal(h, "e" * 64, "f" * 64, "{}")
    assert registry.get("st-01").pending_worker_fingerprint == "c" * 64


# -- TLS: a reloaded identity ----------------------------------------------------------------


def test_a_reloaded_identity_is_presented_on_new_connections_while_live_ones_continue(
    ids, ca, tmp_path
):
    from tests.support import write_identity

    renewed = write_identity(tmp_path / "w1-new", ca, "worker", "w1")
    server = PolicyOptions(ids["w1"], PeerPolicy([Accept("master")]))
    client = PolicyOptions(ids["master"], PeerPolicy([Accept("worker", cn="w1")]))
    live_client, live_server, live_pump = tls_pair_with(server, client)
    assert live_server.received == b"ping"
    server.reload(renewed)
    new_client, _server, _pump = tls_pair_with(server, client)
    presented = new_client.transport.getPeerCertificate().to_cryptography()
    assert pki.fingerprint(presented) == renewed.identity.fingerprint
    old = live_client.transport.getPeerCertificate().to_cryptography()
    assert pki.fingerprint(old) == ids["w1"].identity.fingerprint
    live_client.transport.write(b"still here")
    live_pump.flush()
    assert live_server.received == b"pingstill here"
    assert live_server.lost_reason is None


def test_an_identity_of_another_host_in_the_bundle_is_not_swapped_in(master, bundle, ca):
    current = TLSIdentity.from_bundle(bundle, "worker")
    source = BundleIdentity(bundle, "worker", current)
    other = pki.issue_leaf(ca, "worker", "st-02")
    bundle.cert_path("worker").write_bytes(pki.cert_pem(other.cert))
    os.chmod(bundle.key_path("worker"), 0o600)
    bundle.key_path("worker").write_bytes(pki.key_pem(other.key))
    with pytest.raises(PKIError, match="not of 'st-01'"):
        source.read_if_changed()
    assert source.current is current


def test_expires_shows_date_and_days_left_and_warns_under_30_days(master, bundle):
    from decnet.cli.expiry import expires_cell, expiry_warning

    h = enrollment.Registry(master.paths.registry).get("st-01")
    now = datetime.datetime.fromisoformat(h.expires_at).timestamp() - 10 * 86400
    assert expires_cell(h, now).endswith("(10d)")
    assert "renew st-01" in (expiry_warning(h, now) or "")
    assert expiry_warning(h, now - 60 * 86400) is None
    assert expires_cell(attrs.evolve(h, expires_at=None), now) == "unknown"
    assert config.RENEW_BEFORE_DAYS == 30


def test_a_full_disk_on_the_worker_is_a_clear_refusal_not_a_crash(bundle):
    import errno

    from twisted.internet import defer

    from decnet.errors import BundleNotWritable

    def full(f, *args):
        return defer.fail(OSError(errno.ENOSPC, "No space left on device"))

    d = defer.ensureDeferred(wr.Renewer(bundle, full).csrs())
    failure = []
    d.addErrback(failure.append)
    assert failure and failure[0].check(BundleNotWritable)
    assert "No space left on device" in failure[0].getErrorMessage()
    assert "Renewing certificates" in failure[0].getErrorMessage()
