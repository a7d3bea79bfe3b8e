"""AgentClient ↔ a real in-process agent over real sockets and real certificates (mTLS)."""

import socket

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.logger import globalLogPublisher

from decnet import config, pki
from decnet.errors import (
    FingerprintMismatch,
    HostDecommissioned,
    PeerRefused,
    RemoteError,
    Unreachable,
)
from decnet.master import enrollment
from decnet.master.agent_client import AgentClient, check_hosts
from decnet.master.registry import Registry
from decnet.revocation import RevocationSet
from decnet.tls import TLSIdentity
from tests.support import raw_connect, started_agent, write_identity


@pytest.fixture(scope="module")
def worker(master_home, tmp_path_factory):
    """An enrolled worker ('client-w1') with an updater, and the master's view of it."""
    master = enrollment.load_master(master_home)
    out = tmp_path_factory.mktemp("client") / "bundle"
    result = enrollment.enroll(master, "client-w1", "127.0.0.1", out, updater=True)
    return result


@pytest.fixture(scope="module")
def identities(master_home, worker, ca, foreign_ca, tmp_path_factory):
    d = tmp_path_factory.mktemp("client-ids")
    bundle = pki.WorkerBundle.load(worker.bundle_dir)
    master_ca = enrollment.load_master(master_home).ca
    return {
        "master": TLSIdentity.master(master_home),
        "updater": TLSIdentity.from_bundle(bundle, "updater"),
        "other-worker": write_identity(d / "w", master_ca, "worker", "client-w2"),
        "other-master": write_identity(d / "m", master_ca, "master"),
        "foreign-master": write_identity(d / "f", foreign_ca, "master", trust=master_ca),
    }


@pytest_twisted.async_yield_fixture
async def agent(worker, tmp_path):
    service = await started_agent(worker.bundle_dir, tmp_path, port_file=tmp_path / "agent.port")
    service.host = attrs.evolve(worker.host, agent_port=service.port)
    yield service
    await service.stopService()


def client(agent, identities, who="master", **kw):
    return AgentClient(reactor, identities[who], agent.host, **kw)


@pytest.fixture
def refusals():
    seen = []

    def observe(event):
        fmt = event.get("log_format") or ""
        if "Refused" in fmt:
            seen.append(event)

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


@pytest_twisted.ensureDeferred
async def test_health_status_deploy_and_teardown_round_trip(agent, identities, tmp_path):
    c = client(agent, identities)
    health = await c.health()
    assert health["status"] == "ok" and health["host"] == "client-w1"
    assert (tmp_path / "agent.port").read_text() == f"{agent.host.agent_port}\n"

    spec = {
        "deckies": [
            {
                "name": "web-01",
                "services": [{"type": "tcp-banner", "bind": "127.0.0.1", "port": 0, "banner": "x"}],
            }
        ]
    }
    result = await c.deploy(spec)
    assert result["ok"] is True
    address = result["deckies"]["web-01"]["tcp-banner"]["address"]
    decoy = await raw_connect(int(address.rsplit(":", 1)[1]))
    await decoy.expect(b"x")
    decoy.transport.loseConnection()

    status = await c.status()
    assert status["spec_hash"] == result["spec_hash"]
    assert status["deckies"]["web-01"]["services"]["tcp-banner"]["state"] == "listening"

    with pytest.raises(RemoteError) as info:
        await c.teardown("ghost")
    assert info.value.status == 404
    assert info.value.problems == ["no decky named 'ghost' is deployed on client-w1"]

    done = await c.teardown("web-01")
    assert done["removed"] == [{"decky": "web-01", "service": "tcp-banner"}]
    assert (await c.status())["deckies"] == {}


@pytest_twisted.ensureDeferred
async def test_invalid_input_comes_back_as_the_agents_problems(agent, identities):
    with pytest.raises(RemoteError) as info:
        await client(agent, identities).deploy({"deckies": [{"name": "x", "services": []}]})
    assert info.value.status == 400
    assert info.value.problems == ["decky 'x'.services: must be a non-empty list"]


@pytest_twisted.ensureDeferred
async def test_an_oversized_request_body_is_refused_with_413(agent, identities):
    huge = {"deckies": [], "pad": "x" * (config.AGENT_MAX_BODY + 1)}
    with pytest.raises(RemoteError) as info:
        await client(agent, identities).deploy(huge)
    assert info.value.status == 413
    assert (await client(agent, identities).health())["status"] == "ok"


@pytest_twisted.ensureDeferred
async def test_the_updater_of_this_host_may_read_health_but_not_deploy(agent, identities):
    updater = client(agent, identities, who="updater")
    assert (await updater.health())["status"] == "ok"
    for call in (updater.status(), updater.deploy({"deckies": []}), updater.teardown()):
        with pytest.raises(RemoteError) as info:
            await call
        assert info.value.status == 403


@pytest.mark.parametrize("who", ["other-worker", "other-master", "foreign-master"])
@pytest_twisted.ensureDeferred
async def test_other_certificates_are_refused_at_the_handshake_and_logged(
    agent, identities, refusals, who
):
    with pytest.raises(PeerRefused):
        await client(agent, identities, who=who).health()
    reasons = [e.get("reason", "") for e in refusals]
    assert reasons, "the agent did not log the refusal"
    assert all(e.get("peer", "").startswith("127.0.0.1:") for e in refusals)


@pytest_twisted.ensureDeferred
async def test_a_worker_that_is_not_the_enrolled_one_fails_the_pin(agent, identities, master_home):
    wrong = attrs.evolve(agent.host, worker_fingerprint="ab" * 32)
    with pytest.raises(FingerprintMismatch, match="fingerprint mismatch"):
        await AgentClient(reactor, identities["master"], wrong).health()


def test_decommissioned_or_revoked_hosts_are_refused_before_connecting(agent, identities):
    gone = attrs.evolve(agent.host, status="decommissioned", revoked_at="2026-01-01T00:00:00+00:00")
    with pytest.raises(HostDecommissioned):
        AgentClient(reactor, identities["master"], gone)
    revoked = RevocationSet(fingerprints=[agent.host.worker_fingerprint])
    with pytest.raises(PeerRefused, match="revoked"):
        AgentClient(reactor, identities["master"], agent.host, revocations=revoked)


@pytest_twisted.ensureDeferred
async def test_an_agent_that_is_down_is_unreachable(agent, identities):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    down = attrs.evolve(agent.host, agent_port=free)
    with pytest.raises(Unreachable):
        await AgentClient(reactor, identities["master"], down, timeout=5).health()


@pytest_twisted.ensureDeferred
async def test_check_hosts_probes_concurrently_and_records_status(
    agent, identities, master_home, worker
):
    registry = Registry(master_home.registry)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    master = enrollment.load_master(master_home)
    other = enrollment.enroll(
        master, "client-down", "127.0.0.1", master_home.home.parent / "down-bundle"
    ).host
    hosts = [agent.host, attrs.evolve(other, agent_port=free)]
    results = await check_hosts(reactor, identities["master"], registry, hosts, timeout=5)
    assert [(r.name, r.ok, r.status) for r in results] == [
        ("client-w1", True, "active"),
        ("client-down", False, "unreachable"),
    ]
    assert results[0].health["host"] == "client-w1"
    assert registry.get("client-w1").status == "active"
    assert registry.get("client-down").status == "unreachable"


@pytest_twisted.ensureDeferred
async def test_a_health_probe_logs_no_factory_start_or_stop(agent, identities):
    """`check` runs a probe per host: Twisted's "Starting factory _HTTP11ClientFactory"
    and "Stopping factory" lines would be two log lines per host per run."""
    formats = []
    observer = lambda event: formats.append(event.get("log_format") or "")  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        c = client(agent, identities)
        for _ in range(2):
            assert (await c.health())["status"] == "ok"
        await c.close()
    finally:
        globalLogPublisher.removeObserver(observer)
    assert not [f for f in formats if "factory" in f.lower()], formats
