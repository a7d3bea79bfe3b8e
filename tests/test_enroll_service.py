"""The enrollment service in process, on a real loopback socket with real TLS, and the
worker's ``join`` against it: joins, replays, tampering, concurrency, floods, bad input."""

from __future__ import annotations

import json
import re

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import Clock

from decnet import config, pki, revocation
from decnet.agent.service import tls_policy as agent_tls_policy
from decnet.errors import (
    EnrollmentRefused,
    FingerprintMismatch,
    PeerRefused,
    RemoteError,
    Unreachable,
    ValidationError,
)
from decnet.master import enroll_tokens
from decnet.master.enroll_limits import AttemptLimiter
from decnet.master.enroll_service import MAX_BODY, EnrollService
from decnet.master.registry import Registry
from decnet.tls import Accept, PeerPolicy, TLSIdentity
from decnet.worker.join import (
    EnrollClient,
    join,
    parse_master_url,
    pending_dir,
    prepare_keys,
)
from tests.enroll_support import fresh_master, registry_dump
from tests.logpipe_support import LogCapture
from tests.support import expired_kw, free_port, raw_connect, tls_pair, write_identity


@pytest.fixture
def master(master_home, tmp_path):
    return fresh_master(master_home, tmp_path)


class Running:
    """An EnrollService on 127.0.0.1:0, its limiter clock, and how to reach it."""

    def __init__(self, service: EnrollService, clock: Clock, port: int):
        self.service = service
        self.clock = clock
        self.port = port
        self.url = parse_master_url(f"https://127.0.0.1:{port}")


@pytest_twisted.async_yield_fixture
async def enroll(master):
    clock = Clock()
    service = EnrollService(
        reactor,
        master=master,
        identity=TLSIdentity.master(master.paths),
        listen="tcp:0:interface=127.0.0.1",
        limiter=AttemptLimiter(burst=40, period=60.0),
        clock=clock,
    )
    service.startService()
    port = await service.api.ready
    yield Running(service, clock, port.getHost().port)
    await service.stopService()


def token(master, name, **kw):
    return enroll_tokens.issue_token(master, name, "127.0.0.1", **kw).token


def private_key_files(root):
    return {p for p in root.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()}


@pytest_twisted.ensureDeferred
async def test_a_joined_bundle_is_accepted_by_master_and_listener_and_keys_stay_on_the_worker(
    enroll, master, tmp_path
):
    keys_before = private_key_files(master.paths.home)
    result = await join(
        reactor,
        enroll.url,
        token(master, "join-01", updater=True),
        pki.colon_fingerprint(master.ca.fingerprint),
        tmp_path / "bundle",
    )
    bundle = pki.WorkerBundle.load(result.directory)
    assert bundle.name == "join-01" and bundle.has_updater
    for name in ("worker.key", "updater.key"):
        assert (result.directory / name).stat().st_mode & 0o777 == 0o600
    host = Registry(master.paths.registry).get("join-01")
    assert result.fingerprints == {
        "worker": host.worker_fingerprint,
        "updater": host.updater_fingerprint,
    }
    # The agent's TLS policy and the master's pin accept each other: a real handshake.
    worker = TLSIdentity.from_bundle(bundle, config.ROLE_WORKER)
    master_side = PeerPolicy(
        [Accept(config.ROLE_WORKER, cn="join-01", fingerprint=host.worker_fingerprint)]
    )
    client, server, _ = tls_pair(
        worker, agent_tls_policy(bundle), TLSIdentity.master(master.paths), master_side
    )
    assert client.handshake_done and server.received == b"ping"
    # The listener admits it (enrolled, not revoked).
    listener = PeerPolicy(
        [Accept(config.ROLE_WORKER)],
        revocations=revocation.RevocationSet(master.paths.revocations),
    )
    assert listener.check(worker.identity) is None
    # No new private key on the master, and none of the worker's bytes anywhere there.
    assert private_key_files(master.paths.home) == keys_before
    worker_key = (result.directory / "worker.key").read_bytes()
    assert not any(
        worker_key in p.read_bytes() for p in master.paths.home.rglob("*") if p.is_file()
    )


@pytest_twisted.ensureDeferred
async def test_a_replayed_token_is_refused_with_403_and_nothing_is_written(
    enroll, master, tmp_path
):
    secret = token(master, "join-02")
    fp = master.ca.fingerprint
    await join(reactor, enroll.url, secret, fp, tmp_path / "first")
    before = registry_dump(master.paths.registry)
    with LogCapture() as logs, pytest.raises(EnrollmentRefused, match="already been used"):
        await join(reactor, enroll.url, secret, fp, tmp_path / "second")
    assert not (tmp_path / "second").exists()
    assert registry_dump(master.paths.registry) == before
    (event,) = [e for e in logs.events if "Refused enrollment" in e.get("log_format", "")]
    assert event["kind"] == "403" and secret not in logs.text()
    assert "log_failure" not in event  # one line, no traceback


@pytest_twisted.ensureDeferred
async def test_an_expired_token_gets_403_saying_so_and_changes_nothing(enroll, master, tmp_path):
    import time

    an_hour_ago = Registry(master.paths.registry, now=lambda: time.time() - 3600)
    issued = enroll_tokens.issue_token(master, "join-10", "127.0.0.1", registry=an_hour_ago)
    before = registry_dump(master.paths.registry)
    with pytest.raises(EnrollmentRefused, match=r"refused the token: .*has expired"):
        await join(reactor, enroll.url, issued.token, master.ca.fingerprint, tmp_path / "b")
    assert registry_dump(master.paths.registry) == before
    assert not (tmp_path / "b").exists()


@pytest_twisted.ensureDeferred
async def test_a_tampered_csr_over_the_wire_gets_the_masters_name_role_and_sans(enroll, master):
    from cryptography import x509

    from tests.enroll_support import hostile_csr, keys_and_csrs

    keys, _ = keys_and_csrs()
    csrs = {role: hostile_csr(key) for role, key in keys.items()}
    client = EnrollClient(reactor, enroll.url, master.ca.fingerprint, timeout=10)
    try:
        reply = await client.call(
            "POST", "enroll", json={"token": token(master, "join-11"), "csrs": csrs}
        )
    finally:
        await client.close()
    assert set(reply["certificates"]) == {"worker"}  # the token has no updater
    cert = x509.load_pem_x509_certificate(reply["certificates"]["worker"].encode())
    assert pki.identity_of(cert).role == "worker" and pki.identity_of(cert).cn == "join-11"
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(n.value) for n in sans] == ["join-11", "127.0.0.1"]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


@pytest_twisted.ensureDeferred
async def test_a_join_whose_answer_was_lost_completes_when_run_again_with_the_same_keys(
    enroll, master, tmp_path
):
    secret = token(master, "join-12", updater=True)
    directory = tmp_path / "b"
    keys, resumed = prepare_keys(directory, pki.DEFAULT_KEY_TYPE)
    assert not resumed and (pending_dir(directory) / "worker.key").stat().st_mode & 0o777 == 0o600
    csrs = {role: pki.make_csr(key).decode() for role, key in keys.items()}
    client = EnrollClient(reactor, enroll.url, master.ca.fingerprint, timeout=10)
    try:  # the master enrolls the host; its answer never reaches the bundle (a crash)
        await client.call("POST", "enroll", json={"token": secret, "csrs": csrs})
    finally:
        await client.close()
    before = registry_dump(master.paths.registry)
    result = await join(reactor, enroll.url, secret, master.ca.fingerprint, directory)
    assert result.resumed and registry_dump(master.paths.registry) == before
    host = Registry(master.paths.registry).get("join-12")
    assert result.fingerprints == {
        "worker": host.worker_fingerprint,
        "updater": host.updater_fingerprint,
    }
    bundle = pki.WorkerBundle.load(directory)
    on_disk = pki.load_key(bundle.key_path("worker")).public_key()
    assert pki.spki(on_disk) == pki.spki(keys["worker"].public_key())
    assert not pending_dir(directory).exists()
    # Another worker with the same token (other keys) is still refused.
    with pytest.raises(EnrollmentRefused, match="already been used"):
        await join(reactor, enroll.url, secret, master.ca.fingerprint, tmp_path / "other")


@pytest_twisted.ensureDeferred
async def test_a_token_without_updater_leaves_no_updater_key_in_the_bundle(
    enroll, master, tmp_path
):
    result = await join(
        reactor, enroll.url, token(master, "join-13"), master.ca.fingerprint, tmp_path / "b"
    )
    assert sorted(p.name for p in result.directory.iterdir()) == [
        "bundle.json",
        "ca.crt",
        "worker.crt",
        "worker.key",
    ]


@pytest_twisted.ensureDeferred
async def test_ten_concurrent_joins_with_distinct_tokens_all_succeed(enroll, master, tmp_path):
    names = [f"many-{i:02d}" for i in range(10)]
    tokens = {n: token(master, n, updater=True) for n in names}
    results = await defer.gatherResults(
        [
            defer.ensureDeferred(
                join(reactor, enroll.url, tokens[n], master.ca.fingerprint, tmp_path / n)
            )
            for n in names
        ],
        consumeErrors=True,
    )
    assert sorted(r.name for r in results) == names
    registry = Registry(master.paths.registry)
    for r in results:
        assert registry.get(r.name).worker_fingerprint == r.fingerprints["worker"]
        pki.WorkerBundle.load(r.directory)


@pytest_twisted.ensureDeferred
async def test_a_join_racing_a_decommission_ends_refused_or_enrolled_and_revoked(
    enroll, master, tmp_path
):
    from twisted.internet import threads

    from decnet.master import enrollment

    for i in range(4):
        name = f"race-{i}"
        secret = token(master, name)
        joined, retired = await defer.DeferredList(
            [
                defer.ensureDeferred(
                    join(reactor, enroll.url, secret, master.ca.fingerprint, tmp_path / name)
                ),
                threads.deferToThread(enrollment.decommission, master, name),
            ],
            consumeErrors=True,
        )
        assert retired[0], retired[1]
        registry = Registry(master.paths.registry)
        if joined[0]:
            host = registry.get(name)
            revoked = revocation.RevocationSet(master.paths.revocations)
            assert host.decommissioned and host.worker_fingerprint in revoked
        else:
            assert joined[1].check(EnrollmentRefused)
            assert name not in {h.name for h in registry.list()}
            assert not (tmp_path / name).exists()


@pytest_twisted.ensureDeferred
async def test_a_wrong_ca_fingerprint_is_refused_in_the_handshake_before_the_token_is_sent(
    enroll, master, tmp_path
):
    other = "00" + master.ca.fingerprint[2:]
    secret = token(master, "join-03")
    with pytest.raises(FingerprintMismatch, match="not the 00:") as caught:
        await join(reactor, enroll.url, secret, other, tmp_path / "b")
    assert pki.colon_fingerprint(master.ca.fingerprint) in str(caught.value)
    assert not (tmp_path / "b").exists()
    # The token was never presented: it still works.
    await join(reactor, enroll.url, secret, master.ca.fingerprint, tmp_path / "b")


@pytest.mark.parametrize(
    ("who", "reason"),
    [
        # Another CA's leaf, served with our (public) CA certificate in the chain.
        ("impostor", "not issued by the (CA with the )?pinned"),
        # Our CA's leaf, but a worker's: a compromised worker posing as the master.
        ("worker", "not the master's"),
        ("expired", "expired or not yet valid"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_server_that_is_not_the_masters_is_refused_even_with_our_ca_in_its_chain(
    master, tmp_path, foreign_ca, who, reason
):
    d = tmp_path / "ids"
    identity = {
        "impostor": lambda: write_identity(d, foreign_ca, "master", trust=master.ca),
        "worker": lambda: write_identity(d, master.ca, "worker", "rogue-01"),
        "expired": lambda: write_identity(d, master.ca, "master", **expired_kw()),
    }[who]()
    service = EnrollService(
        reactor, master=master, identity=identity, listen="tcp:0:interface=127.0.0.1"
    )
    service.startService()
    try:
        port = (await service.api.ready).getHost().port
        url = parse_master_url(f"https://127.0.0.1:{port}")
        secret = token(master, "join-04")
        with pytest.raises(PeerRefused, match=reason):
            await join(reactor, url, secret, master.ca.fingerprint, tmp_path / "b")
    finally:
        await service.stopService()
    assert not (tmp_path / "b").exists()
    assert [h.name for h in Registry(master.paths.registry).list()] == []


@pytest_twisted.ensureDeferred
async def test_an_unreachable_master_is_reported_as_such(master, tmp_path):
    url = parse_master_url(f"https://127.0.0.1:{free_port()}")
    with pytest.raises(Unreachable, match="cannot reach the master's enrollment service"):
        await join(reactor, url, "t", master.ca.fingerprint, tmp_path / "b", timeout=5)
    assert not (tmp_path / "b").exists()


@pytest_twisted.ensureDeferred
async def test_an_existing_bundle_is_never_overwritten(enroll, master, tmp_path):
    existing = tmp_path / "bundle"
    existing.mkdir()
    (existing / "worker.key").write_bytes(b"the old key")
    secret = token(master, "join-05")
    with pytest.raises(ValidationError, match="never overwritten"):
        await join(reactor, enroll.url, secret, master.ca.fingerprint, existing)
    assert (existing / "worker.key").read_bytes() == b"the old key"
    assert [h.name for h in Registry(master.paths.registry).list()] == []


@pytest_twisted.ensureDeferred
async def test_an_unwritable_bundle_place_is_refused_before_the_token_is_used(
    enroll, master, tmp_path
):
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"a file where the parent directory should be")
    secret = token(master, "join-09")
    with pytest.raises(ValidationError, match="nothing was sent, the token is still valid"):
        await join(reactor, enroll.url, secret, master.ca.fingerprint, blocker / "bundle")
    result = await join(reactor, enroll.url, secret, master.ca.fingerprint, tmp_path / "b")
    assert result.name == "join-09"


@pytest_twisted.ensureDeferred
async def test_garbage_and_oversized_bodies_get_400_and_413_and_change_nothing(enroll, master):
    token(master, "join-06")
    before = registry_dump(master.paths.registry)
    client = EnrollClient(reactor, enroll.url, master.ca.fingerprint, timeout=10)
    try:
        for body, status in [
            (b"\x00\xff garbage", 400),
            (b"[1, 2]", 400),
            (json.dumps({"token": "t", "csrs": {"worker": "nope"}}).encode(), 400),
        ]:
            with pytest.raises(RemoteError) as caught:
                await client.call("POST", "enroll", data=body)
            assert caught.value.status == status
        with pytest.raises((RemoteError, Unreachable)) as caught:
            await client.call("POST", "enroll", data=b"x" * (MAX_BODY + 1))
        if isinstance(caught.value, RemoteError):
            assert caught.value.status == 413
    finally:
        await client.close()
    assert registry_dump(master.paths.registry) == before


@pytest_twisted.ensureDeferred
async def test_too_many_attempts_from_one_address_get_429_until_the_bucket_refills(
    enroll, master, tmp_path
):
    enroll.service.enroller.limiter = AttemptLimiter(burst=3, period=30.0)
    client = EnrollClient(reactor, enroll.url, master.ca.fingerprint, timeout=10)
    try:
        statuses = []
        for _ in range(5):
            try:
                await client.call("POST", "enroll", json={"token": "guess", "csrs": {}})
            except RemoteError as exc:
                statuses.append(exc.status)
        assert statuses == [400, 400, 400, 429, 429]
        secret = token(master, "join-07")
        with pytest.raises(EnrollmentRefused, match="rate-limiting"):
            await join(reactor, enroll.url, secret, master.ca.fingerprint, tmp_path / "b")
        enroll.clock.advance(10)  # one attempt back
        await join(reactor, enroll.url, secret, master.ca.fingerprint, tmp_path / "b")
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_a_flood_of_refusals_is_logged_as_five_lines_then_one_summary(enroll, master):
    enroll.service.enroller.limiter = AttemptLimiter(burst=1, period=60.0)
    client = EnrollClient(reactor, enroll.url, master.ca.fingerprint, timeout=10)
    try:
        with LogCapture() as logs:
            for _ in range(12):
                with pytest.raises(RemoteError):
                    await client.call("POST", "enroll", json={})
            enroll.clock.advance(10.0)  # the summary interval ends
    finally:
        await client.close()
    lines = logs.text().splitlines()
    assert len(lines) == 6, lines
    assert re.fullmatch(
        r"Refused enrollment from 127\.0\.0\.1:\d+ \(400\): 'token' must be a string .*",
        lines[0],
    )
    assert all(" (429): too many enrollment attempts" in line for line in lines[1:5])
    assert lines[-1] == (
        "Refused 7 more enrollment attempts in 10s "
        "(429: 7; from 1 addresses, most from 127.0.0.1: 7)"
    )


def test_an_ipv6_scanner_counts_by_its_64_and_ipv4_by_its_address(master):
    from decnet.httpapi import HTTPError
    from decnet.master.enroll_service import Enroller
    from decnet.threads import inline_runner

    enroller = Enroller(
        master,
        Registry(master.paths.registry),
        clock=Clock(),
        run=inline_runner,
        limiter=AttemptLimiter(burst=2, period=60.0),
    )
    enroller.admit("2001:db8:1:2::1")
    enroller.admit("2001:db8:1:2::ffff")
    with pytest.raises(HTTPError) as refused:
        enroller.admit("2001:db8:1:2:aaaa::7")  # another address, the same /64
    assert refused.value.status == 429 and refused.value.extra["retry_after"] == 30
    enroller.admit("2001:db8:1:3::1")  # the next /64 is someone else
    enroller.admit("192.0.2.1")
    enroller.admit("192.0.2.2")


def test_the_tap_passes_max_attempts_and_period_to_the_service(master):
    """An empty limiter is falsy (it has a length): it must still be the one used."""
    from decnet.master import enroll_tap

    options = enroll_tap.Options()
    options.parseOptions(["--home", str(master.paths.home), "--max-attempts", "2"])
    service = enroll_tap.makeService(options)
    limiter = service.enroller.limiter
    assert (limiter.burst, limiter.rate) == (2, 2 / 60)


@pytest_twisted.ensureDeferred
async def test_plaintext_and_garbage_on_the_port_leave_the_service_serving(
    enroll, master, tmp_path
):
    for junk in (b"GET / HTTP/1.0\r\n\r\n", b"\x16\x03\x01\x00\x05hello", b"\xff" * 4096):
        raw = await raw_connect(enroll.port)
        raw.send(junk)
        await raw.closed
    result = await join(
        reactor, enroll.url, token(master, "join-08"), master.ca.fingerprint, tmp_path / "b"
    )
    assert result.name == "join-08"


@pytest.mark.parametrize(
    "text",
    [
        "http://m:8443",
        "https://",
        "https://user:pw@m:8443",
        "https://m:8443/other",
        "https://m:8443/?q=1",
        "https://m:99999",
        "https://bad host",
    ],
)
def test_a_bad_master_url_is_refused_with_what_is_expected(text):
    with pytest.raises(ValidationError, match=r"https://MASTER|invalid address"):
        parse_master_url(text)


def test_the_master_url_defaults_to_port_8443():
    assert parse_master_url("https://master.example").port == 8443
    assert parse_master_url("https://10.0.0.1:9443/").port == 9443
