"""Token enrollment on the master, below HTTP: tokens, CSR signing, the registry's transaction."""

from __future__ import annotations

import base64
import sqlite3
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from decnet import pki
from decnet.errors import DuplicateHost, EnrollmentRefused, ValidationError
from decnet.master import enroll_tokens, enrollment
from decnet.master.registry import Registry, Tokens, token_digest
from tests.enroll_support import fresh_master, hostile_csr, keys_and_csrs, registry_dump


@pytest.fixture
def master(master_home, tmp_path):
    return fresh_master(master_home, tmp_path)


class Now:
    """A registry clock the test moves."""

    def __init__(self, t: float = 1_800_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_the_registry_keeps_only_the_tokens_sha256_with_name_and_expiry(master):
    now = Now()
    registry = Registry(master.paths.registry, now=now)
    issued = enroll_tokens.issue_token(
        master, "web-01", "10.0.0.5", updater=True, registry=registry
    )
    raw = master.paths.registry.read_bytes() + b"".join(
        p.read_bytes() for p in master.paths.home.glob("registry.sqlite*")
    )
    assert issued.token.encode() not in raw
    (pending,) = Tokens(registry).pending("web-01")
    assert pending.token_sha256 == token_digest(issued.token)
    assert pending.expires_at - pending.created_at == enroll_tokens.DEFAULT_TTL == 900
    assert len(issued.token) >= 43 and issued.ca_fingerprint == master.ca.fingerprint


def test_a_token_is_redeemed_once_and_the_master_decides_every_field(master):
    issued = enroll_tokens.issue_token(master, "web-01", "10.0.0.5", sans=["web.lan"], updater=True)
    keys, _ = keys_and_csrs()
    # Both CSRs ask to be the master, with a foreign SAN and CA:TRUE.
    csrs = {role: hostile_csr(key) for role, key in keys.items()}
    joined = enroll_tokens.redeem(master, Registry(master.paths.registry), issued.token, csrs)
    for role in ("worker", "updater"):
        cert = x509.load_pem_x509_certificate(joined.certificates[role].encode())
        identity = pki.identity_of(cert)
        assert (identity.role, identity.cn) == (role, pki.cn_for(role, "web-01"))
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sorted(map(str, sans.get_values_for_type(x509.DNSName))) == ["web-01", "web.lan"]
        assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
        assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
        ekus = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert set(ekus) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
        cert.verify_directly_issued_by(master.ca.cert)
        assert cert.public_key().public_numbers() == keys[role].public_key().public_numbers()
    host = Registry(master.paths.registry).get("web-01")
    assert host.worker_fingerprint == pki.fingerprint(
        x509.load_pem_x509_certificate(joined.certificates["worker"].encode())
    )
    assert joined.bundle["name"] == "web-01" and joined.bundle["ca_fingerprint"] == (
        master.ca.fingerprint
    )
    _, others = keys_and_csrs()
    before = registry_dump(master.paths.registry)
    with pytest.raises(EnrollmentRefused, match="already been used"):
        enroll_tokens.redeem(master, Registry(master.paths.registry), issued.token, others)
    assert registry_dump(master.paths.registry) == before


def test_a_used_token_replayed_with_the_same_keys_gets_the_same_answer_and_nothing_changes(
    master,
):
    """The worker retrying after a lost answer; anyone else (other keys) is refused."""
    issued = enroll_tokens.issue_token(master, "web-07", "10.0.0.5", updater=True)
    keys, csrs = keys_and_csrs()
    registry = Registry(master.paths.registry)
    first = enroll_tokens.redeem(master, registry, issued.token, csrs)
    before = registry_dump(master.paths.registry)
    fresh_csrs = {role: pki.make_csr(key).decode() for role, key in keys.items()}
    again = enroll_tokens.redeem(master, registry, issued.token, fresh_csrs)
    assert again.as_reply() == first.as_reply() and again.host == first.host
    assert registry_dump(master.paths.registry) == before
    # Only the worker key matching is not enough: every certified key must match.
    _, others = keys_and_csrs()
    with pytest.raises(EnrollmentRefused, match="already been used"):
        enroll_tokens.redeem(
            master, registry, issued.token, {"worker": csrs["worker"], "updater": others["updater"]}
        )
    enrollment.decommission(master, "web-07")
    with pytest.raises(EnrollmentRefused, match="was decommissioned"):
        enroll_tokens.redeem(master, registry, issued.token, csrs)


def test_a_token_without_updater_ignores_an_updater_csr(master):
    issued = enroll_tokens.issue_token(master, "web-02", "10.0.0.6")
    _, csrs = keys_and_csrs()
    joined = enroll_tokens.redeem(master, Registry(master.paths.registry), issued.token, csrs)
    assert set(joined.certificates) == {"worker"}
    assert Registry(master.paths.registry).get("web-02").updater_fingerprint is None


@pytest.mark.parametrize(
    ("token", "csrs", "error", "message"),
    [
        ("not-a-token", "ok", EnrollmentRefused, "unknown enrollment token"),
        (None, "ok", ValidationError, "'token' must be a string"),
        ("x" * 257, "ok", ValidationError, "'token' must be a string"),
        ("issued", {}, ValidationError, "at least a 'worker' CSR"),
        (
            "issued",
            {"worker": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"},
            ValidationError,
            "not a PEM",
        ),
        ("issued", {"worker": "x" * 20000}, ValidationError, "at most"),
        ("issued", {"worker": 7}, ValidationError, "PEM string"),
        ("issued", "same-key", ValidationError, "different keys"),
        ("issued", "worker-only", ValidationError, "also needs a CSR for: updater"),
        ("issued", "rsa-1024", ValidationError, "unsupported CSR key"),
    ],
)
def test_every_refusal_leaves_the_registry_unchanged(master, token, csrs, error, message):
    issued = enroll_tokens.issue_token(master, "web-03", "10.0.0.7", updater=True)
    _, good = keys_and_csrs()
    if csrs == "ok":
        csrs = good
    elif csrs == "same-key":
        csrs = {"worker": good["worker"], "updater": good["worker"]}
    elif csrs == "worker-only":
        csrs = {"worker": good["worker"]}
    elif csrs == "rsa-1024":
        from cryptography.hazmat.primitives.asymmetric import rsa

        weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - refused on purpose
        csrs = {"worker": pki.make_csr(weak).decode(), "updater": good["updater"]}
    token = issued.token if token == "issued" else token
    before = registry_dump(master.paths.registry)
    with pytest.raises(error, match=message):
        enroll_tokens.redeem(master, Registry(master.paths.registry), token, csrs)
    assert registry_dump(master.paths.registry) == before


def test_a_csr_whose_signature_does_not_verify_is_refused(master):
    issued = enroll_tokens.issue_token(master, "web-04", "10.0.0.8")
    _, csrs = keys_and_csrs()
    pem = csrs["worker"]
    csr = x509.load_pem_x509_csr(pem.encode())
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # inside the signature
    body = base64.encodebytes(bytes(der)).decode()
    forged = f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"
    before = registry_dump(master.paths.registry)
    with pytest.raises(ValidationError, match="signature does not verify"):
        enroll_tokens.redeem(
            master, Registry(master.paths.registry), issued.token, {"worker": forged}
        )
    assert registry_dump(master.paths.registry) == before


def test_an_expired_token_is_refused_and_stays_unused(master):
    now = Now()
    registry = Registry(master.paths.registry, now=now)
    issued = enroll_tokens.issue_token(master, "web-05", "10.0.0.9", ttl=60, registry=registry)
    now.t += 60
    _, csrs = keys_and_csrs()
    before = registry_dump(master.paths.registry)
    with pytest.raises(EnrollmentRefused, match="expired"):
        enroll_tokens.redeem(master, registry, issued.token, csrs)
    assert registry_dump(master.paths.registry) == before
    now.t -= 1  # one second before expiry it still works
    enroll_tokens.redeem(master, registry, issued.token, csrs)


def test_two_concurrent_redemptions_of_one_token_exactly_one_wins(master):
    issued = enroll_tokens.issue_token(master, "web-06", "10.0.0.10")
    outcomes: list[object] = []
    barrier = threading.Barrier(8)

    def attempt():
        _, csrs = keys_and_csrs()
        barrier.wait()
        try:
            outcomes.append(
                enroll_tokens.redeem(master, Registry(master.paths.registry), issued.token, csrs)
            )
        except EnrollmentRefused as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    wins = [o for o in outcomes if isinstance(o, enroll_tokens.Joined)]
    assert len(outcomes) == 8 and len(wins) == 1
    assert all("already been used" in str(o) for o in outcomes if o not in wins)
    assert Registry(master.paths.registry).get("web-06").worker_fingerprint == (
        wins[0].host.worker_fingerprint
    )


def test_a_decommissioned_name_is_refused_for_tokens_and_offline_bundles_saying_so(
    master, tmp_path
):
    enrollment.enroll(master, "old-01", "10.0.0.11", tmp_path / "b")
    enrollment.decommission(master, "old-01")
    with pytest.raises(DuplicateHost, match=r"'old-01' was decommissioned at .*choose another"):
        enroll_tokens.issue_token(master, "old-01", "10.0.0.11")
    with pytest.raises(DuplicateHost, match="was decommissioned"):
        enrollment.enroll(master, "old-01", "10.0.0.11", tmp_path / "b2")
    assert not (tmp_path / "b2").exists()


def test_a_token_for_a_name_decommissioned_before_the_join_is_refused(master):
    """Decommission wins over a pending token: it is cancelled, the join gets 403."""
    issued = enroll_tokens.issue_token(master, "race-01", "10.0.0.12")
    done = enrollment.decommission(master, "race-01")
    assert done.host is None and done.cancelled_tokens == 1
    _, csrs = keys_and_csrs()
    before = registry_dump(master.paths.registry)
    with pytest.raises(EnrollmentRefused, match="unknown enrollment token"):
        enroll_tokens.redeem(master, Registry(master.paths.registry), issued.token, csrs)
    assert registry_dump(master.paths.registry) == before


def test_a_join_racing_a_decommission_ends_either_refused_or_enrolled_and_revoked(master):
    """Run both at once many times: never an enrolled host whose decommission was lost."""
    from decnet import revocation

    for i in range(6):
        name = f"race-{i:02d}"
        issued = enroll_tokens.issue_token(master, name, "10.0.0.13")
        _, csrs = keys_and_csrs()
        barrier = threading.Barrier(2)
        results: dict[str, object] = {}

        def join(name=name, issued=issued, csrs=csrs, barrier=barrier, results=results):
            barrier.wait()
            try:
                results["join"] = enroll_tokens.redeem(
                    master, Registry(master.paths.registry), issued.token, csrs
                )
            except EnrollmentRefused as exc:
                results["join"] = exc

        def retire(name=name, barrier=barrier, results=results):
            barrier.wait()
            results["decommission"] = enrollment.decommission(master, name)

        threads = [threading.Thread(target=join), threading.Thread(target=retire)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        revoked = revocation.RevocationSet(master.paths.revocations)
        if isinstance(results["join"], EnrollmentRefused):
            with pytest.raises(Exception, match="no host named"):
                Registry(master.paths.registry).get(name)
        else:
            host = Registry(master.paths.registry).get(name)
            assert host.decommissioned and host.worker_fingerprint in revoked
        assert Tokens(Registry(master.paths.registry)).pending(name) == []


def test_a_registry_at_schema_1_gains_the_token_table_and_keeps_its_hosts(tmp_path):
    from decnet.master.registry import MIGRATIONS

    path = tmp_path / "r.sqlite"
    db = sqlite3.connect(path)
    for statement in MIGRATIONS[0]:
        db.execute(statement)
    db.execute(
        "INSERT INTO hosts (name, address, agent_port, updater_port, worker_fingerprint, "
        "enrolled_at) VALUES ('a', '10.0.0.1', 1, 2, 'fp', 'now')"
    )
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    registry = Registry(path)
    assert registry.schema_version == len(MIGRATIONS) == 3
    assert registry.get("a").address == "10.0.0.1" and Tokens(registry).pending("a") == []


@pytest.mark.parametrize(
    ("text", "seconds"), [("15m", 900), ("900s", 900), ("900", 900), ("2h", 7200), ("1d", 86400)]
)
def test_token_ttls_are_read_with_units(text, seconds):
    assert enroll_tokens.parse_ttl(text) == seconds


@pytest.mark.parametrize("text", ["0", "59s", "8d", "15 m", "-1m", "1.5h", "", "15M", "١٥m"])
def test_bad_token_ttls_are_refused(text):
    with pytest.raises(ValueError):
        enroll_tokens.parse_ttl(text)


def test_a_token_never_starts_with_a_dash_the_join_command_would_read_it_as_an_option():
    """One token in 64 started with "-" (URL-safe base64), and ``decnet-worker join
    --token -xYz`` failed with "argument --token: expected one argument" (seen in make test)."""
    draws = iter(["-starts-with-a-dash", "--two", "fine-after-the-dash"])
    assert enroll_tokens.new_token(lambda n: next(draws)) == "fine-after-the-dash"
    assert all(not enroll_tokens.new_token().startswith("-") for _ in range(2000))
