"""The updater's HTTP API over real sockets and real certificates, driven by UpdaterClient.

The domain object is the real :class:`Updater` with a fake installer and agent,
so these tests are about the wire: who may call what, streaming uploads hashed
on arrival, status codes and bodies the master's client turns into outcomes.
"""

import hashlib
import itertools

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from decnet import config, pki
from decnet.errors import FingerprintMismatch, PeerRefused, RemoteError, Unreachable
from decnet.httpapi import make_site
from decnet.httpclient import PinnedClient
from decnet.master import enrollment
from decnet.master.registry import Registry
from decnet.master.tar_tree import ReleaseArchive
from decnet.master.updater_client import UpdaterClient
from decnet.threads import pool_runner
from decnet.tls import Accept, PeerPolicy, PolicyOptions, TLSIdentity, listen_tls
from decnet.updater.app import build_app, upload_limits
from decnet.updater.engine import Updater
from decnet.updater.health import HealthProbe
from decnet.updater.releases import ReleaseStore, release_id_for
from tests.support import eventually, minimal_release, write_identity
from tests.test_updater_archive import HOSTILE_HEADERS
from tests.test_updater_engine import FakeAgent, FakeAgentHealth, FakeInstaller

_names = itertools.count()


@pytest.fixture(scope="module")
def world(master_home, foreign_ca, tmp_path_factory):
    """Two enrolled hosts (w-a with an updater, w-b too) and some impostor identities."""
    base = tmp_path_factory.mktemp("updater-http")
    master = enrollment.load_master(master_home)
    suffix = next(_names)
    names = {k: f"uh{suffix}-{k}" for k in ("a", "b", "c")}
    bundles = {}
    for key, name in names.items():
        enrollment.enroll(
            master, name, "127.0.0.1", base / name, updater=(key != "c"), updater_port=1
        )
        bundles[key] = pki.WorkerBundle.load(base / name)
    registry = Registry(master_home.registry)
    return {
        "paths": master_home,
        "names": names,
        "bundles": bundles,
        "hosts": {k: registry.get(n) for k, n in names.items()},
        "master": TLSIdentity.master(master_home),
        "worker-a": TLSIdentity.from_bundle(bundles["a"], "worker"),
        "updater-b": TLSIdentity.from_bundle(bundles["b"], "updater"),
        "foreign-master": write_identity(base / "fm", foreign_ca, "master", trust=master.ca),
        "base": base,
    }


class Served:
    pass


def fake_updater(base, agent: FakeAgent, restart_self) -> Updater:
    """The real :class:`Updater` over ``base/install`` with a fake installer and agent."""
    return Updater(
        clock=reactor,
        store=ReleaseStore(base / "install"),
        self_store=ReleaseStore(base / "install" / "updater"),
        installer=FakeInstaller(),
        agent=agent,
        probe=HealthProbe(reactor, FakeAgentHealth(agent), interval=0.01),
        to_thread=pool_runner(reactor),
        health_timeout=0.3,
        restart_self=restart_self,
        restart_delay=0.01,
    )


@pytest_twisted.async_yield_fixture
async def served(world, tmp_path):
    bundle = world["bundles"]["a"]
    identity = TLSIdentity.from_bundle(bundle, "updater")
    master = Accept("master", cn=config.MASTER_CN, fingerprint=bundle.master_fingerprint)
    local = (Accept("worker", cn=bundle.name), Accept("updater", cn=f"updater@{bundle.name}"))
    agent = FakeAgent()
    restarts = []
    restarted = defer.Deferred()

    def restart_self(release_dir):
        restarts.append(release_dir)
        restarted.callback(release_dir)

    updater = fake_updater(tmp_path, agent, restart_self)
    await updater.start()
    site = make_site(
        build_app(updater, master=master, local=local).resource(),
        limits=upload_limits(master, 3 * 1024 * 1024),
    )
    port = await listen_tls(
        reactor,
        "tcp:0:interface=127.0.0.1",
        PolicyOptions(identity, PeerPolicy([master, *local])),
        site,
    )
    s = Served()
    s.port = port.getHost().port
    s.updater, s.agent, s.restarts, s.restarted = updater, agent, restarts, restarted
    yield s
    await port.stopListening()


def client_for(world, served, **kw):
    import attrs

    host = attrs.evolve(world["hosts"]["a"], updater_port=served.port)
    return UpdaterClient(reactor, world["master"], host, **kw)


def archive_of(tmp_path, data: bytes) -> ReleaseArchive:
    path = tmp_path / f"r-{hashlib.sha256(data).hexdigest()[:8]}.tar.gz"
    path.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    return ReleaseArchive(path, digest, len(data), (), (), None, None)


def raw_client(world, served, who):
    """A PinnedClient presenting ``who``'s certificate to w-a's updater."""
    bundle = world["bundles"]["a"]
    fp = pki.fingerprint(pki.load_cert(bundle.cert_path("updater")))
    return PinnedClient(
        reactor,
        world[who],
        address="127.0.0.1",
        port=served.port,
        accept=Accept("updater", cn=f"updater@{bundle.name}", fingerprint=fp),
    )


@pytest_twisted.ensureDeferred
async def test_the_master_pushes_a_release_and_lists_it(world, served, tmp_path):
    # ~2 MiB of incompressible data: spooled to a temp file, hashed as it streams.
    padding = hashlib.sha256(b"seed").digest() * (2 * 1024 * 1024 // 32)
    data = minimal_release(extra=[("demo/blob.bin", padding)])
    client = client_for(world, served)
    result = await client.update(archive_of(tmp_path, data))
    release = release_id_for(hashlib.sha256(data).hexdigest())
    assert result["result"] == "updated" and result["release"] == release
    listing = await client.releases()
    assert listing["current"] == release
    assert listing["releases"][0]["sha256"] == hashlib.sha256(data).hexdigest()
    health = await client.health()
    assert health["status"] == "ok" and health["version"]


@pytest_twisted.ensureDeferred
async def test_a_wrong_sha256_or_a_hostile_header_is_a_400_and_a_hostile_member_a_422(
    world, served, tmp_path
):
    client = client_for(world, served)
    good = archive_of(tmp_path, minimal_release())
    import attrs

    with pytest.raises(RemoteError) as info:
        await client.update(attrs.evolve(good, sha256="0" * 64))
    assert info.value.status == 400 and info.value.body["result"] == "failed"
    hostile = archive_of(tmp_path, minimal_release(extra=[("../evil.py", b"x")]))
    with pytest.raises(RemoteError) as info:
        await client.update(hostile)
    assert info.value.status == 422 and "escapes" in info.value.problems[0]
    long_name = archive_of(tmp_path, HOSTILE_HEADERS["1 MiB GNU long name"]())
    with pytest.raises(RemoteError) as info:
        await client.update(long_name)
    assert (
        info.value.status == 400
        and "GNU long name header of 1048576 bytes" in (info.value.problems[0])
    )


@pytest_twisted.ensureDeferred
async def test_a_release_that_fails_health_comes_back_rolled_back_with_output(
    world, served, tmp_path
):
    client = client_for(world, served)
    good = minimal_release(name="good")
    await client.update(archive_of(tmp_path, good))
    bad = minimal_release(name="bad")
    served.agent.sick.add(release_id_for(hashlib.sha256(bad).hexdigest()))
    with pytest.raises(RemoteError) as info:
        await client.update(archive_of(tmp_path, bad))
    body = info.value.body
    assert info.value.status == 409 and body["result"] == "rolled_back"
    assert body["current"] == release_id_for(hashlib.sha256(good).hexdigest())
    assert "agent output of" in body["output"]["agent"]
    assert (await client.releases())["current"] == body["current"]


@pytest_twisted.ensureDeferred
async def test_rollback_over_http(world, served, tmp_path):
    client = client_for(world, served)
    one, two = minimal_release(name="one"), minimal_release(name="two")
    await client.update(archive_of(tmp_path, one))
    await client.update(archive_of(tmp_path, two))
    result = await client.rollback()
    assert result["release"] == release_id_for(hashlib.sha256(one).hexdigest())
    with pytest.raises(RemoteError) as info:
        await client.rollback()
    assert info.value.status == 409 and "no previous release" in info.value.problems[0]
    with pytest.raises(RemoteError) as info:
        await client.rollback(to="f" * 16)
    assert info.value.status == 404


@pytest_twisted.ensureDeferred
async def test_update_self_answers_202_then_restarts(world, served, tmp_path):
    client = client_for(world, served)
    data = minimal_release(name="selfy")
    result = await client.update_self(archive_of(tmp_path, data))
    assert result["result"] == "restarting"
    restarted_onto = await served.restarted
    assert [p.name for p in served.restarts] == [restarted_onto.name] == [result["release"]]


@pytest_twisted.ensureDeferred
async def test_this_hosts_worker_certificate_may_only_read_health(world, served):
    worker = raw_client(world, served, "worker-a")
    assert (await worker.call("GET", "health"))["status"] == "ok"
    routes = (("GET", "releases"), ("GET", "wheels"), ("POST", "rollback"), ("POST", "update"))
    for method, route in routes:
        with pytest.raises(RemoteError) as info:
            await worker.call(method, route, data=b"x")
        assert info.value.status == 403, route


@pytest_twisted.ensureDeferred
async def test_the_master_reads_the_wheel_inventory_over_mtls(world, served):
    client = client_for(world, served)
    try:
        assert await client.wheels() == {"wheels": [], "deps": []}
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_a_large_upload_from_anyone_but_the_master_is_refused_while_it_arrives(
    world, served, tmp_path
):
    worker = raw_client(world, served, "worker-a")
    body = b"\0" * (config.MAX_SMALL_BODY + 1)
    with pytest.raises(RemoteError) as info:
        await worker.call("POST", "update", data=body, query={"sha256": "0" * 64})
    assert info.value.status == 403
    assert served.updater.store.current() is None


@pytest_twisted.ensureDeferred
async def test_an_oversized_upload_is_a_413(world, served, tmp_path):
    client = client_for(world, served)
    big = archive_of(tmp_path, b"\0" * (3 * 1024 * 1024 + 1))
    with pytest.raises(RemoteError) as info:
        await client.update(big)
    assert info.value.status == 413


@pytest.mark.parametrize("who", ["updater-b", "foreign-master"])
@pytest_twisted.ensureDeferred
async def test_other_identities_are_refused_in_the_handshake(world, served, who):
    with pytest.raises(PeerRefused):
        await raw_client(world, served, who).call("GET", "health")


@pytest_twisted.ensureDeferred
async def test_a_master_certificate_other_than_the_pinned_one_is_refused(world, served):
    from decnet.master.enrollment import load_master

    ca = load_master(world["paths"]).ca
    other_master = write_identity(world["base"] / "om", ca, "master")
    with pytest.raises(PeerRefused):
        await PinnedClient(
            reactor,
            other_master,
            address="127.0.0.1",
            port=served.port,
            accept=raw_client(world, served, "master").accept,
        ).call("GET", "health")


@pytest_twisted.ensureDeferred
async def test_the_client_pins_the_enrolled_updater(world, served):
    import attrs

    # Right name, but the fingerprint enrolled for another host's updater.
    host = attrs.evolve(
        world["hosts"]["a"],
        updater_port=served.port,
        updater_fingerprint=world["hosts"]["b"].updater_fingerprint,
    )
    with pytest.raises(FingerprintMismatch):
        await UpdaterClient(reactor, world["master"], host).health()
    # Another host's name and pin: refused for the CN.
    host = attrs.evolve(world["hosts"]["b"], updater_port=served.port)
    with pytest.raises(PeerRefused, match="not the expected peer"):
        await UpdaterClient(reactor, world["master"], host).health()


def test_a_host_without_an_updater_has_no_client(world):
    with pytest.raises(PeerRefused, match="without an updater"):
        UpdaterClient(reactor, world["master"], world["hosts"]["c"])


@pytest_twisted.ensureDeferred
async def test_a_dropped_connection_does_not_abort_the_update(world, served, tmp_path):
    """The master gives up waiting; the updater still finishes (and confirms) the release."""
    hanging = defer.Deferred()
    served.updater.probe.client.pending = hanging
    client = client_for(world, served)
    data = minimal_release(name="patient")
    with pytest.raises(Unreachable, match=r"did not answer within 0\.5s"):
        await client.update(archive_of(tmp_path, data), timeout=0.5)
    served.updater.probe.client.pending = None
    release = release_id_for(hashlib.sha256(data).hexdigest())
    hanging.callback({"status": "ok", "release": release})
    # The rest of the update runs in the thread pool: no event to wait for but its end.
    await eventually(lambda: served.updater.busy is None, 5, what="the update to finish")
    assert served.updater.store.current() == release
