"""The private CA, role-bound leaves, bundles and fingerprints."""

import ipaddress
import multiprocessing
import os
import re
import stat
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from decnet import config, pki
from decnet.errors import InvalidName, MissingFileError, ValidationError


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_ensure_ca_creates_a_pathlen0_rsa4096_root_with_private_permissions(ca, tmp_path):
    ca_dir = tmp_path / "ca"
    created = pki.ensure_ca(ca_dir)
    cert = created.cert
    assert isinstance(created.key, rsa.RSAPrivateKey) and created.key.key_size == 4096
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    assert cert.subject == cert.issuer
    assert mode(ca_dir) == 0o700
    assert mode(ca_dir / "ca.key") == 0o600
    # PKCS8 ("PRIVATE KEY"), not the traditional "RSA PRIVATE KEY" form.
    assert (ca_dir / "ca.key").read_bytes().split(b"\n", 1)[0] == b"-----BEGIN %s-----" % (
        b"PRIVATE KEY"
    )


def test_ensure_ca_is_idempotent_on_disk(tmp_path):
    first = pki.ensure_ca(tmp_path / "ca", key_size=2048)
    before = {p.name: p.read_bytes() for p in (tmp_path / "ca").iterdir()}
    second = pki.ensure_ca(tmp_path / "ca", key_size=2048)
    after = {p.name: p.read_bytes() for p in (tmp_path / "ca").iterdir()}
    assert first.fingerprint == second.fingerprint
    assert before == after


def test_ensure_ca_completes_a_directory_left_half_written(tmp_path):
    ca_dir = tmp_path / "ca"
    ca_dir.mkdir()
    (ca_dir / "ca.key").write_bytes(b"left over by a crash")
    created = pki.ensure_ca(ca_dir, key_size=2048)
    assert pki.load_ca(ca_dir).fingerprint == created.fingerprint


def _race(ca_dir, queue):
    queue.put(pki.ensure_ca(ca_dir, key_size=2048).fingerprint)


def test_two_processes_racing_on_ensure_ca_make_exactly_one_ca(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_race, args=(tmp_path / "ca", queue)) for _ in range(2)]
    for p in procs:
        p.start()
    fps = {queue.get(timeout=60) for _ in procs}
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len(fps) == 1
    assert fps == {pki.load_ca(tmp_path / "ca").fingerprint}


@pytest.mark.parametrize(
    ("role", "name", "cn"),
    [
        ("master", None, "decnet-master"),
        ("worker", "web-01", "web-01"),
        ("updater", "web-01", "updater@web-01"),
    ],
)
def test_leaf_carries_role_marker_both_ekus_and_sans(ca, role, name, cn):
    leaf = pki.issue_leaf(ca, role, name, addresses=["10.0.0.7", "web.example.org", "::1"])
    cert = leaf.cert
    cert.verify_directly_issued_by(ca.cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == cn
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == role
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    own_name = name or "decnet-master"
    assert san.get_values_for_type(x509.DNSName) == [own_name, "web.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.7"),
        ipaddress.ip_address("::1"),
    ]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(leaf.key, ec.EllipticCurvePrivateKey)
    assert pki.identity_of(cert) == pki.CertIdentity(cn, role, leaf.fingerprint)


def test_leaves_have_random_serials_and_the_documented_validity(ca):
    a = pki.issue_leaf(ca, "worker", "a")
    b = pki.issue_leaf(ca, "worker", "a")
    assert a.cert.serial_number != b.cert.serial_number
    lifetime = a.cert.not_valid_after_utc - a.cert.not_valid_before_utc
    assert lifetime.days == config.LEAF_VALIDITY_DAYS


@pytest.mark.parametrize("key_type", ["rsa-2048", "rsa-3072"])
def test_rsa_leaves_by_option(ca, key_type):
    leaf = pki.issue_leaf(ca, "worker", "w1", key_type=key_type)
    assert leaf.key.key_size == int(key_type[4:])
    assert leaf.cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_encipherment


def test_a_certificate_whose_role_marker_disagrees_with_its_cn_has_no_role(ca):
    # Forge what a careless issuer might produce: OU=master on a worker's CN.
    from cryptography.hazmat.primitives import hashes

    leaf = pki.issue_leaf(ca, "worker", "w1")
    forged = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "master"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "w1"),
                ]
            )
        )
        .issuer_name(ca.cert.subject)
        .public_key(leaf.key.public_key())
        .serial_number(1)
        .not_valid_before(leaf.cert.not_valid_before_utc)
        .not_valid_after(leaf.cert.not_valid_after_utc)
        .sign(ca.key, hashes.SHA256())
    )
    assert pki.identity_of(forged).role is None


@pytest.mark.parametrize(
    "name",
    ["", "Web01", "-web", "web..01", "web.", "a" * 64, "web_01", "web 01", "wéb", "updater@x"],
)
def test_invalid_host_names_are_refused(name):
    with pytest.raises(InvalidName):
        pki.validate_host_name(name)


@pytest.mark.parametrize("name", ["decnet-master", "master", "worker", "updater", "localhost"])
def test_reserved_host_names_are_refused(name):
    with pytest.raises(InvalidName, match="reserved"):
        pki.validate_host_name(name)


@pytest.mark.parametrize("name", ["web-01", "a", "db.dmz.example", "9lives", "updates"])
def test_valid_host_names_are_accepted(name):
    assert pki.validate_host_name(name) == name


@pytest.mark.parametrize("addr", ["10.0.0.1", "::1", "fe80::1", "host.example", "a-b.c"])
def test_addresses_parse_as_ip_or_dns(addr):
    pki.parse_address(addr)


@pytest.mark.parametrize("addr", ["", "host name", "-bad.example", "10.0.0.1/24", "a" * 300])
def test_bad_addresses_are_refused(addr):
    with pytest.raises(ValidationError):
        pki.parse_address(addr)


def test_fingerprint_matches_what_openssl_prints(ca, tmp_path):
    leaf = pki.issue_leaf(ca, "worker", "w1")
    path = tmp_path / "w1.crt"
    path.write_bytes(pki.cert_pem(leaf.cert))
    out = subprocess.run(
        ["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert out.split("=", 1)[1] == pki.colon_fingerprint(pki.fingerprint(leaf.cert))
    assert pki.normalize_fingerprint(out.split("=", 1)[1].strip()) == leaf.fingerprint
    assert leaf.fingerprint == leaf.fingerprint.lower() and len(leaf.fingerprint) == 64


def test_bundle_is_written_atomically_with_private_keys_0600(tmp_path):
    target = tmp_path / "bundle"
    pki.write_bundle(target, {"a.key": b"secret", "a.crt": b"public"}, private={"a.key"})
    assert mode(target) == 0o700
    assert mode(target / "a.key") == 0o600
    assert mode(target / "a.crt") == 0o644
    assert not list(tmp_path.glob(".bundle.staging-*"))


def test_bundle_refuses_a_non_empty_target_and_writes_nothing(tmp_path):
    target = tmp_path / "bundle"
    target.mkdir()
    (target / "keep").write_text("mine")
    with pytest.raises(ValidationError, match="not empty"):
        pki.write_bundle(target, {"a.key": b"secret"}, private={"a.key"})
    assert [p.name for p in target.iterdir()] == ["keep"]


def test_bundle_into_an_existing_empty_directory(tmp_path):
    target = tmp_path / "bundle"
    target.mkdir()
    pki.write_bundle(target, {"x": b"1"})
    assert (target / "x").read_bytes() == b"1"


def test_loading_a_missing_file_names_it(tmp_path):
    with pytest.raises(MissingFileError, match=re.escape(str(tmp_path / "nope.crt"))):
        pki.load_cert(tmp_path / "nope.crt")
