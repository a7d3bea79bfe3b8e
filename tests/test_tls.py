"""mTLS contexts: our CA only, role, pinned fingerprint and revocation checked in the handshake."""

import os
import shutil

import pytest
import pytest_twisted
from OpenSSL import SSL
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.internet.ssl import Certificate, CertificateOptions, trustRootFromCertificates
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import connectedServerAndClient

from decnet import pki
from decnet.revocation import RevocationSet
from decnet.tls import (
    Accept,
    PeerCertificateRefused,
    PeerPolicy,
    PolicyOptions,
    Refusal,
    RefusalKind,
    TLSServerFactory,
    handshake_of,
    listen_tls,
    peer_identity,
)
from tests.support import (
    RecordingProtocol,
    tls_connection,
    tls_pair,
    tls_pair_with,
    write_identity,
)

MASTER_ONLY = PeerPolicy([Accept("master")])
WORKERS_ONLY = PeerPolicy([Accept("worker")])


@pytest.fixture
def warnings():
    seen = []

    def observer(event):
        if event.get("log_level") in (LogLevel.warn, LogLevel.error):
            seen.append(event)

    globalLogPublisher.addObserver(observer)
    yield seen
    globalLogPublisher.removeObserver(observer)


def refusal_reasons(events):
    return [e.get("reason", "") for e in events if "Refused TLS peer" in e.get("log_format", "")]


def refusal_of(app) -> Refusal:
    """Why our policy refused the peer of ``app``'s connection, as its connection loss says."""
    assert app.lost_reason is not None and app.lost_reason.check(PeerCertificateRefused)
    return app.lost_reason.value.refusal


def assert_connected(client, server):
    assert client.handshake_done and server.handshake_done
    assert server.received == b"ping"
    assert server.lost_reason is None and client.lost_reason is None


def assert_refused(client, server):
    assert server.received == b""
    assert not server.handshake_done
    assert client.lost_reason is not None


def test_a_correct_pair_connects_and_each_side_sees_the_others_identity(ids):
    client, server = tls_pair(ids["master"], WORKERS_ONLY, ids["w1"], MASTER_ONLY)[:2]
    assert_connected(client, server)
    seen_by_master = peer_identity(server.transport)
    assert (seen_by_master.cn, seen_by_master.role) == ("w1", "worker")
    assert seen_by_master.fingerprint == ids["w1"].identity.fingerprint
    assert peer_identity(client.transport).role == "master"


def test_a_client_from_a_foreign_ca_with_the_same_cn_is_refused(ids, warnings):
    client, server = tls_pair(ids["master"], WORKERS_ONLY, ids["impostor-w1"], MASTER_ONLY)[:2]
    assert_refused(client, server)
    assert any("not issued by our CA" in r for r in refusal_reasons(warnings))


def test_a_client_without_a_certificate_is_refused(ids, warnings):
    trust = trustRootFromCertificates([Certificate(ids["master"].ca)])
    anonymous = CertificateOptions(trustRoot=trust)
    client, server, _ = tls_pair_with(PolicyOptions(ids["master"], WORKERS_ONLY), anonymous)
    assert_refused(client, server)
    failed = [e for e in warnings if "handshake with" in e.get("log_format", "")]
    assert failed and "certificate" in failed[0]["reason"]


def test_a_peer_with_a_role_the_server_does_not_accept_is_refused(ids, warnings):
    # An updater certificate presented to the log listener (workers only).
    client, server = tls_pair(ids["master"], WORKERS_ONLY, ids["upd-w1"], MASTER_ONLY)[:2]
    assert_refused(client, server)
    assert any("role 'updater'" in r for r in refusal_reasons(warnings))


def test_a_worker_cannot_pose_as_the_master_to_another_worker(ids):
    # The client insists on a master; a worker serves instead.
    client, server = tls_pair(ids["w2"], WORKERS_ONLY, ids["w1"], MASTER_ONLY)[:2]
    assert_refused(client, server)


def test_a_revoked_certificate_is_refused(ids, warnings):
    revoked = RevocationSet(fingerprints=[ids["w1"].identity.fingerprint])
    policy = PeerPolicy([Accept("worker")], revocations=revoked)
    client, server = tls_pair(ids["master"], policy, ids["w1"], MASTER_ONLY)[:2]
    assert_refused(client, server)
    assert any("revoked" in r for r in refusal_reasons(warnings))
    # Another, unrevoked worker still gets in through the same policy.
    client, server = tls_pair(ids["master"], policy, ids["w2"], MASTER_ONLY)[:2]
    assert_connected(client, server)


def test_an_expired_certificate_is_refused(ids, warnings):
    client, server = tls_pair(ids["master"], WORKERS_ONLY, ids["expired-w1"], MASTER_ONLY)[:2]
    assert_refused(client, server)
    assert any("expired" in r for r in refusal_reasons(warnings))


def test_a_server_whose_fingerprint_differs_from_the_pin_is_refused_in_the_same_handshake(ids):
    # The master pins w1's enrolled fingerprint but reaches w2 at that address.
    pin = PeerPolicy([Accept("worker", fingerprint=ids["w1"].identity.fingerprint)])
    client, server = tls_pair(ids["w2"], MASTER_ONLY, ids["master"], pin)[:2]
    assert client.lost_reason is not None and not client.handshake_done
    refusal = refusal_of(client)
    assert refusal.kind is RefusalKind.FINGERPRINT and "fingerprint mismatch" in refusal.detail
    # The right host passes the very same pin.
    client, server = tls_pair(ids["w1"], MASTER_ONLY, ids["master"], pin)[:2]
    assert_connected(client, server)


def _pump_until(pump, condition, steps: int = 50) -> None:
    for _ in range(steps):
        if condition():
            return
        pump.pump()
    raise AssertionError("the handshake never got there")


def test_two_handshakes_at_once_each_fail_with_their_own_refusal(ids, warnings):
    """One client policy, as a PinnedClient or a forwarder holds, and two connections in flight:
    one server presents w1's name with another key, the other is w2.  Both are refused before
    either connection is gone, and each connection reports its own reason, not the other's."""
    pin = PeerPolicy([Accept("worker", cn="w1", fingerprint=ids["w1"].identity.fingerprint)])
    client_options = PolicyOptions(ids["master"], pin)
    impostor, _, impostor_pump = tls_connection(
        PolicyOptions(ids["w1-again"], MASTER_ONLY), client_options
    )
    other, _, other_pump = tls_connection(PolicyOptions(ids["w2"], MASTER_ONLY), client_options)
    _pump_until(impostor_pump, lambda: handshake_of(impostor.transport).refusal is not None)
    _pump_until(other_pump, lambda: handshake_of(other.transport).refusal is not None)
    assert impostor.lost_reason is None and other.lost_reason is None  # both at once
    other_pump.flush()
    impostor_pump.flush()
    first, second = refusal_of(impostor), refusal_of(other)
    assert first.kind is RefusalKind.FINGERPRINT and "fingerprint mismatch for 'w1'" in first.detail
    assert second.kind is RefusalKind.PEER and "'w2' is not the expected peer" in second.detail
    assert [str(first), str(second)] == refusal_reasons(warnings)
    assert not impostor.handshake_done and not other.handshake_done


def test_an_exact_cn_rule_admits_only_that_hosts_updater(ids):
    # w2's agent accepts the master and w2's own updater; w1's updater knocks.
    policy = PeerPolicy([Accept("master"), Accept("updater", cn="updater@w2")])
    agent_w2 = PeerPolicy([Accept("worker", cn="w2")])
    client, server = tls_pair(ids["w2"], policy, ids["upd-w1"], agent_w2)[:2]
    assert_refused(client, server)
    refusal = refusal_of(server)
    assert refusal.kind is RefusalKind.PEER and "not the expected peer" in refusal.detail


def test_alpn_is_negotiated_when_both_sides_offer_it(ids):
    alpn = [b"decnet-syslog/1"]
    server = tls_pair(ids["master"], WORKERS_ONLY, ids["w1"], MASTER_ONLY, alpn=alpn)[1]
    assert server.transport.negotiatedProtocol == b"decnet-syslog/1"


def test_policy_check_reasons():
    ident = pki.CertIdentity("w1", "worker", "a" * 64)
    assert PeerPolicy([Accept("worker")]).check(ident) is None
    no_role = PeerPolicy([Accept("worker")]).check(pki.CertIdentity("w1", None, "a" * 64))
    assert no_role.kind is RefusalKind.NO_ROLE and "no valid DECNET role" in no_role.detail
    pinned = PeerPolicy([Accept("worker", fingerprint="b" * 64)]).check(ident)
    assert pinned.kind is RefusalKind.FINGERPRINT and "mismatch" in pinned.detail


@pytest_twisted.ensureDeferred
async def test_mtls_over_a_real_loopback_socket(ids):
    server_app = RecordingProtocol()
    got_data = defer.Deferred()

    class Server(RecordingProtocol):
        def dataReceived(self, data):
            super().dataReceived(data)
            got_data.callback(peer_identity(self.transport))

    from twisted.internet.protocol import Factory

    port = await listen_tls(
        reactor,
        "tcp:0:interface=127.0.0.1",
        PolicyOptions(ids["master"], WORKERS_ONLY),
        Factory.forProtocol(Server),
    )
    try:
        endpoint = wrapClientTLS(
            PolicyOptions(ids["w1"], MASTER_ONLY),
            TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port),
        )
        client = await connectProtocol(endpoint, RecordingProtocol())
        client.transport.write(b"hello")
        seen = await got_data
        assert (seen.cn, seen.role) == ("w1", "worker")
        client.transport.loseConnection()
    finally:
        await port.stopListening()
    del server_app


# -- cipher suites ------------------------------------------------------------


def test_every_context_offers_only_ecdhe_with_aead_in_tls_1_2(ids):
    """Servers and clients alike (every daemon builds its contexts from PolicyOptions)."""
    for options in (
        PolicyOptions(ids["master"], WORKERS_ONLY),
        PolicyOptions(ids["w1"], MASTER_ONLY, acceptable_protocols=[b"decnet-syslog/1"]),
    ):
        offered = SSL.Connection(options.getContext(), None).get_cipher_list()
        tls12 = [name for name in offered if not name.startswith("TLS_")]
        assert tls12, offered
        for name in tls12:
            assert name.startswith("ECDHE-"), name
            assert "-GCM-" in name or "CHACHA20-POLY1305" in name, name


class _SClient(ProcessProtocol):
    """``openssl s_client`` with stdin closed at once (it then ends after the handshake)."""

    def __init__(self):
        self.output = b""
        self.ended = defer.Deferred()

    def connectionMade(self):
        self.transport.closeStdin()

    def outReceived(self, data):
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason):
        self.ended.callback((reason.value.exitCode, self.output.decode(errors="replace")))


async def s_client(port: int, worker_dir, *args: str) -> tuple[int, str]:
    proto = _SClient()
    argv = [
        "openssl",
        "s_client",
        "-connect",
        f"127.0.0.1:{port}",
        "-cert",
        str(worker_dir / "w9.crt"),
        "-key",
        str(worker_dir / "w9.key"),
        "-CAfile",
        str(worker_dir / "ca.crt"),
        "-brief",
        *args,
    ]
    reactor.spawnProcess(proto, shutil.which("openssl"), argv, env={"PATH": os.environ["PATH"]})
    return await proto.ended.addTimeout(30, reactor)


@pytest_twisted.ensureDeferred
async def test_a_real_listener_socket_refuses_cbc_and_non_ecdhe_suites_and_accepts_aead(
    ca, ids, tmp_path
):
    from decnet.listener.service import ListenerService

    write_identity(tmp_path / "w", ca, "worker", "w9")
    listener = ListenerService(
        reactor,
        identity=ids["master"],
        revocations=RevocationSet(),
        ingest_dir=tmp_path / "ingest",
        listen="tcp:0:interface=127.0.0.1",
        feed=False,
    )
    listener.startService()
    port = listener.port_service.port.getHost().port
    try:
        for refused in (
            "ECDHE-ECDSA-AES128-SHA",  # CBC, SHA-1 MAC: what TLS 1.2 offered before
            "ECDHE-ECDSA-AES256-SHA384:ECDHE-ECDSA-AES128-SHA256",  # CBC
            "AES128-GCM-SHA256:AES256-GCM-SHA384",  # AEAD, but no forward secrecy
        ):
            code, out = await s_client(port, tmp_path / "w", "-tls1_2", "-cipher", refused)
            assert code != 0, out
            assert "handshake failure" in out, out
        for accepted in ("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305"):
            code, out = await s_client(port, tmp_path / "w", "-tls1_2", "-cipher", accepted)
            assert code == 0, out
            assert "Protocol version: TLSv1.2" in out and f"Ciphersuite: {accepted}" in out, out
        code, out = await s_client(port, tmp_path / "w", "-tls1_3")
        assert code == 0, out
        assert "Protocol version: TLSv1.3" in out, out
    finally:
        await listener.stopService()


def test_a_forwarder_that_refuses_the_receiver_says_why_as_the_docs_show(ids, tmp_path):
    """The forwarder pins the master; the receiver is another certificate.  The connection's own
    refusal becomes the forwarder's state line (docs/Logging.md, Troubleshooting)."""
    from tests.test_forwarder_core import Rig

    rig = Rig(tmp_path)
    states = []
    rig.factory.state_listeners.append(lambda state, detail: states.append((state, detail)))
    pin = PeerPolicy([Accept("master", fingerprint=ids["w2"].identity.fingerprint)])
    clock = Clock()
    server = TLSServerFactory(
        PolicyOptions(ids["master"], WORKERS_ONLY), Factory.forProtocol(RecordingProtocol), clock
    )
    client = TLSMemoryBIOFactory(PolicyOptions(ids["w1"], pin), True, rig.factory, clock=clock)
    *_, pump = connectedServerAndClient(
        lambda: server.buildProtocol(None), lambda: client.buildProtocol(None), greet=False
    )
    pump.flush()
    state, detail = states[-1]
    assert state == "failing"
    assert detail.startswith(
        "cannot connect to m: refused the receiver's certificate: "
        "fingerprint mismatch for 'decnet-master'"
    )
