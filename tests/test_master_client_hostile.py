"""The master's clients against a compromised worker: real mTLS, real sockets, lying replies.

The worker holds a valid, enrolled certificate (the pin passes), then redirects,
stalls or answers garbage.  Each time the master must end the call with a typed
error that names the host, within one deadline, without following anything.
"""

import json

import attrs
import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.web import resource, server

from decnet import config
from decnet.errors import (
    BadReply,
    HealthCheckFailed,
    RedirectRefused,
    RemoteError,
    ReplyTooLarge,
    Unreachable,
)
from decnet.master.agent_client import AgentClient, check_hosts
from decnet.master.http import client_for_host
from decnet.master.registry import Registry
from decnet.master.tar_tree import ReleaseArchive
from decnet.master.updater_client import UpdaterClient
from decnet.tls import TLSIdentity
from decnet.updater.health import HealthProbe
from tests.hostile_worker import (
    FakeWorker,
    Reply,
    fresh_master,
    health,
    listen_deaf,
    silent_factory,
    status,
)

GUARD = 20.0  # a test that would hang on main fails after this instead


@pytest.fixture(scope="module")
def fleet(master_home, tmp_path_factory):
    """A master of its own with two enrolled hosts (each with an updater)."""
    base = tmp_path_factory.mktemp("hostile-client")
    master = fresh_master(master_home, base / "home")
    hosts = {}
    for name in ("rogue", "good"):
        hosts[name] = enrollment_of(master, name, base / name)
    return master, hosts


def enrollment_of(master, name, out):
    from decnet.master import enrollment

    return enrollment.enroll(master, name, "127.0.0.1", out, updater=True)


@pytest_twisted.async_yield_fixture
async def worker(fleet):
    """The 'rogue' host's fake agent and updater; tests script ``worker.routes``."""
    _, hosts = fleet
    fake = await FakeWorker(hosts["rogue"].bundle_dir).start(reactor)
    fake.host = attrs.evolve(
        hosts["rogue"].host, agent_port=fake.agent_port, updater_port=fake.updater_port
    )
    yield fake
    await fake.stop()


def identity(fleet) -> TLSIdentity:
    return TLSIdentity.master(fleet[0].paths)


def agent(fleet, fake, **kw) -> AgentClient:
    return AgentClient(reactor, identity(fleet), fake.host, **kw)


def updater(fleet, fake, **kw) -> UpdaterClient:
    return UpdaterClient(reactor, identity(fleet), fake.host, **kw)


async def guarded(coro):
    """Await ``coro``; fail the test (instead of hanging the suite) after GUARD seconds.

    Expiring the guard is a test failure of its own, never mistaken for the
    client's deadline, even though it cancels the call to clean up.
    """
    d = defer.ensureDeferred(coro)
    expired = []
    timer = reactor.callLater(GUARD, lambda: (expired.append(True), d.cancel()))
    try:
        return await d
    finally:
        if timer.active():
            timer.cancel()
        if expired:
            pytest.fail(f"still waiting after {GUARD:g}s")


# -- redirects ------------------------------------------------------------------------------


class _Lure(resource.Resource):
    """Plain HTTP, no certificate: what a redirect would lead the master to."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.hits = []

    def render(self, request):
        self.hits.append(request.path)
        return json.dumps({"status": "ok", "host": "rogue", "release": "unauthenticated"}).encode()


@pytest_twisted.async_yield_fixture
async def lure():
    site = _Lure()
    port = reactor.listenTCP(0, server.Site(site), interface="127.0.0.1")
    site.url = f"http://127.0.0.1:{port.getHost().port}/"
    yield site
    await port.stopListening()


@pytest.mark.parametrize("code", [301, 302, 307, 308])
@pytest_twisted.ensureDeferred
async def test_a_redirect_is_refused_naming_the_host_and_its_target_is_never_fetched(
    fleet, worker, lure, code
):
    worker.routes[("agent", "health")] = Reply({}, code, {"location": lure.url})
    with pytest.raises(RedirectRefused) as info:
        await guarded(agent(fleet, worker).health())
    message = str(info.value)
    assert "bad reply from rogue at 127.0.0.1:" in message
    assert f"HTTP {code} redirect to {json.dumps(lure.url)}" in message
    assert lure.hits == []


@pytest_twisted.ensureDeferred
async def test_a_redirect_answering_a_deploy_or_an_update_is_a_typed_error_not_a_crash(
    fleet, worker, lure, tmp_path
):
    worker.routes[("agent", "deploy")] = Reply({}, 307, {"location": lure.url})
    worker.routes[("updater", "update")] = Reply({}, 308, {"location": lure.url})
    with pytest.raises(RedirectRefused, match="rogue"):
        await guarded(agent(fleet, worker).deploy({"deckies": []}))
    tarball = tmp_path / "r.tar.gz"
    tarball.write_bytes(b"not really a release")
    archive = ReleaseArchive(tarball, "ab" * 32, tarball.stat().st_size, (), (), None, None)
    with pytest.raises(RedirectRefused, match="updater@rogue"):
        await guarded(updater(fleet, worker).update(archive))
    assert lure.hits == []


# -- one deadline -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_worker_that_stalls_in_the_body_is_cut_off_at_the_deadline(fleet, worker):
    worker.routes[("agent", "health")] = Reply(health(), stall=True)
    with pytest.raises(Unreachable, match=r"rogue at 127\.0\.0\.1:\d+ did not answer within 0\.5s"):
        await guarded(agent(fleet, worker, timeout=0.5).health())
    assert len(worker.stalled) == 1
    # The master aborts the connection (it does not wait for a TLS close the peer never
    # sends): the stalled request sees its connection lost, not closed cleanly.
    with pytest.raises(ConnectionLost):
        await guarded(worker.stalled[0].notifyFinish())


@pytest_twisted.ensureDeferred
async def test_a_worker_that_never_sends_its_headers_is_cut_off_at_the_deadline(fleet, worker):
    worker.routes[("agent", "status")] = Reply(status(), hang=True)
    with pytest.raises(Unreachable, match=r"did not answer within 0\.5s"):
        await guarded(agent(fleet, worker, timeout=0.5).status())


@pytest_twisted.ensureDeferred
async def test_the_deadline_runs_on_the_injected_clock(fleet, worker):
    worker.routes[("agent", "health")] = Reply(health(), hang=True)
    clock = Clock()
    stalled = worker.next_stall()
    call = defer.ensureDeferred(agent(fleet, worker, timeout=5, clock=clock).health())
    await guarded(stalled)  # the request is at the worker, which will never answer
    clock.advance(4.9)
    assert not call.called
    clock.advance(0.1)
    with pytest.raises(Unreachable, match="did not answer within 5s"):
        await guarded(call)


@pytest_twisted.ensureDeferred
async def test_a_worker_that_never_starts_tls_is_cut_off_at_the_deadline(fleet, worker):
    factory = silent_factory()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        mute = attrs.evolve(worker.host, agent_port=port.getHost().port)
        client = AgentClient(reactor, identity(fleet), mute, timeout=0.5)
        with pytest.raises(Unreachable, match=r"did not answer within 0\.5s"):
            await guarded(client.health())
        assert len(factory.connected) == 1
        await guarded(factory.connected[0].lost)  # the master hung up
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_stalled_upload_answer_is_cut_off_at_the_deadline(fleet, worker, tmp_path):
    worker.routes[("updater", "update")] = Reply({"result": "updated"}, stall=True)
    tarball = tmp_path / "r.tar.gz"
    tarball.write_bytes(b"x" * 100_000)
    archive = ReleaseArchive(tarball, "ab" * 32, tarball.stat().st_size, (), (), None, None)
    with pytest.raises(Unreachable, match=r"updater@rogue at .* did not answer within 0\.5s"):
        await guarded(updater(fleet, worker).update(archive, timeout=0.5))


@pytest_twisted.ensureDeferred
async def test_an_updater_that_stops_reading_the_upload_is_cut_off_at_the_deadline(
    fleet, worker, tmp_path
):
    port, deaf = await listen_deaf(reactor, worker.bundle.directory, "updater")
    try:
        host = attrs.evolve(worker.host, updater_port=port.getHost().port)
        client = UpdaterClient(reactor, identity(fleet), host)
        tarball = tmp_path / "big.tar.gz"
        tarball.write_bytes(b"x" * (16 * 1024 * 1024))  # far more than the socket buffers
        archive = ReleaseArchive(tarball, "ab" * 32, tarball.stat().st_size, (), (), None, None)
        with pytest.raises(Unreachable, match=r"did not answer within 1s"):
            await guarded(client.update(archive, timeout=1.0))
        assert len(deaf.connected) == 1
    finally:
        await port.stopListening()


# -- replies are validated ----------------------------------------------------------------

BAD_AGENT_REPLIES = [
    # (route, reply, what the error must say)
    ("deploy", Reply({"problems": [1, 2]}, 400), "HTTP 400: problems[0]: must be a string"),
    ("deploy", Reply({"oops": "no problems list"}, 500), "HTTP 500: problems: is required"),
    ("deploy", Reply(b"<html>502 Bad Gateway</html>", 502), "HTTP 502, and the body is not JSON"),
    ("status", Reply({"host": "rogue", "summary": {}}), "deckies: is required"),
    ("status", Reply(status(port="22")), "deckies.web-01.services.redis.port: must be an integer"),
    ("status", Reply(status(decky="\x1b[2J")), '"\\u001b[2J" (key): must be a decky name'),
    ("health", Reply(b"", 200), "the body is not JSON"),
    ("health", Reply(b'{"status": "ok", "uptime": NaN}'), "not JSON"),
    ("health", Reply([1, 2, 3]), "the reply: must be an object, not a list"),
    ("health", Reply({"status": ["ok"]}), "status: must be a string, not a list"),
    ("health", Reply(b"[" * 100_000 + b"]" * 100_000), "not JSON"),
    ("health", Reply(health(uptime=True)), "uptime: must be a number, not a boolean"),
    ("health", Reply({}, 204), "not JSON"),
    ("health", Reply({"status": "ok"}, 600), "unexpected HTTP status 600"),
]


@pytest.mark.parametrize(("route", "reply", "why"), BAD_AGENT_REPLIES)
@pytest_twisted.ensureDeferred
async def test_a_reply_that_breaks_its_schema_is_a_bad_reply_naming_the_host(
    fleet, worker, route, reply, why
):
    worker.routes[("agent", route)] = reply
    client = agent(fleet, worker)
    call = {
        "health": client.health,
        "status": client.status,
        "deploy": lambda: client.deploy({"deckies": []}),
    }[route]
    with pytest.raises(BadReply) as info:
        await guarded(call())
    assert str(info.value).startswith("bad reply from rogue at 127.0.0.1:")
    assert why in str(info.value)
    assert str(info.value).isascii()


@pytest_twisted.ensureDeferred
async def test_an_oversized_reply_is_refused_without_reading_it_all(fleet, worker):
    worker.routes[("agent", "status")] = Reply(b'{"pad": "' + b"x" * (9 * 1024 * 1024) + b'"}')
    with pytest.raises(ReplyTooLarge, match="larger than 8388608 bytes"):
        await guarded(agent(fleet, worker).status())


BAD_UPDATER_REPLIES = [
    ("update", Reply({"result": "updated"}), "release: is required"),
    ("update", Reply({"result": "rolled_back", "release": "x"}), "result: must be one of updated"),
    ("releases", Reply({"releases": "all of them"}), "releases: must be a list, not a string"),
    ("releases", Reply({"releases": [{"id": 7}]}), "releases[0].id: must be a string"),
    ("rollback", Reply({"result": "rolled_back"}), "release: is required"),
    ("rollback", Reply({"problems": "x", "result": 1}, 409), "HTTP 409: problems: must be a list"),
    ("health", Reply({"status": "ok", "busy": 3}), "busy: must be a string, not an integer"),
]


@pytest.mark.parametrize(("route", "reply", "why"), BAD_UPDATER_REPLIES)
@pytest_twisted.ensureDeferred
async def test_an_updater_reply_that_breaks_its_schema_is_a_bad_reply(
    fleet, worker, tmp_path, route, reply, why
):
    worker.routes[("updater", route)] = reply
    client = updater(fleet, worker)
    tarball = tmp_path / "r.tar.gz"
    tarball.write_bytes(b"release")
    archive = ReleaseArchive(tarball, "ab" * 32, tarball.stat().st_size, (), (), None, None)
    call = {
        "update": lambda: client.update(archive),
        "releases": client.releases,
        "rollback": client.rollback,
        "health": client.health,
    }[route]
    with pytest.raises(BadReply) as info:
        await guarded(call())
    assert str(info.value).startswith("bad reply from updater@rogue at 127.0.0.1:")
    assert why in str(info.value)


@pytest_twisted.ensureDeferred
async def test_a_valid_error_reply_is_still_the_daemons_own_words(fleet, worker):
    worker.routes[("agent", "teardown")] = Reply({"problems": ["no decky named 'x'"]}, 404)
    with pytest.raises(RemoteError) as info:
        await guarded(agent(fleet, worker).teardown("x"))
    assert info.value.status == 404 and info.value.problems == ["no decky named 'x'"]


@pytest_twisted.ensureDeferred
async def test_check_hosts_reports_a_bad_reply_as_that_hosts_row_and_the_others_as_they_are(
    fleet, worker
):
    master, hosts = fleet
    good = await FakeWorker(hosts["good"].bundle_dir, {("agent", "health"): Reply(health())}).start(
        reactor
    )
    try:
        worker.routes[("agent", "health")] = Reply({"status": "ok", "release": ["r", 1]})
        arrived = []
        rogue_host = worker.host
        good_host = attrs.evolve(hosts["good"].host, agent_port=good.agent_port)
        results = await guarded(
            check_hosts(
                reactor,
                identity(fleet),
                Registry(master.paths.registry),
                [rogue_host, good_host],
                arrived=arrived.append,
            )
        )
    finally:
        await good.stop()
    assert [(r.name, r.ok, r.bad_reply) for r in results] == [
        ("rogue", False, True),
        ("good", True, False),
    ]
    assert "release: must be a string" in results[0].detail
    assert sorted(r.name for r in arrived) == ["good", "rogue"]
    assert Registry(master.paths.registry).get("rogue").status == "unreachable"


@pytest_twisted.ensureDeferred
async def test_the_updaters_health_probe_never_takes_a_health_reply_that_breaks_its_schema(
    fleet, worker
):
    """The updater probes its agent with the same pinned client and the agent's /health schema:
    an answer naming the awaited release, with a lying field, is not a healthy agent."""
    worker.routes[("agent", "health")] = Reply({"status": "ok", "release": "r1", "uptime": "1d"})
    client = client_for_host(reactor, identity(fleet), worker.host, config.ROLE_WORKER)
    probe = HealthProbe(reactor, client, interval=0.05)
    with pytest.raises(HealthCheckFailed) as info:
        await guarded(probe.wait_for("r1", timeout=0.5))
    assert "bad reply from rogue at 127.0.0.1:" in str(info.value)
    assert "uptime: must be a number, not a string" in str(info.value)
