"""The agent's Klein app with StubTreq: routes, per-route authorization, error mapping.

Synchronous: the engine and the desired-state store are in-memory fakes, and the
TLS peer certificate is injected per request.
"""

import json

import pytest
from OpenSSL import crypto
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from zope.interface import implementer

from decnet import pki
from decnet.agent.app import make_app
from decnet.agent.controller import Controller
from decnet.agent.engine import IDeckyEngine

HOST = "w1"


@implementer(IDeckyEngine)
class FakeEngine:
    """Records applied specs; a service on port 1 'fails' like a privileged port would."""

    name = "fake"

    def __init__(self):
        self.applied = []
        self.running = {}

    def apply(self, spec):
        self.applied.append(spec)
        results = {}
        desired = {s.key: s for s in spec.services()}
        for key in set(self.running) - set(desired):
            results[key] = {"action": "removed", "state": "stopped"}
            del self.running[key]
        for key, s in desired.items():
            before = self.running.get(key)
            action = "unchanged" if before and before.digest == s.digest else "started"
            self.running[key] = s
            failed = s.port == 1
            results[key] = {
                "action": action,
                "type": s.type,
                "state": "failed" if failed else "listening",
                "reason": "cannot listen on 0.0.0.0:1: permission denied" if failed else None,
                "address": None if failed else f"{s.bind}:{s.port}",
            }
        return defer.succeed(results)

    def status(self):
        out = {}
        for (decky, name), s in self.running.items():
            out.setdefault(decky, {})[name] = {"type": s.type, "state": "listening"}
        return out

    def stop(self):
        self.running.clear()
        return defer.succeed(None)


class MemoryStore:
    def __init__(self, spec=None):
        self.saved = []
        self.spec = spec

    def save(self, spec):
        self.saved.append(spec)
        return defer.succeed(None)

    def load(self):
        return defer.succeed(self.spec)


class _WithCert:
    """The request's transport, plus the TLS peer certificate a test chose."""

    def __init__(self, inner, cert):
        self._inner = inner
        self._cert = cert

    def getPeerCertificate(self):
        return self._cert

    def __getattr__(self, name):
        return getattr(self._inner, name)


class AsPeer(Resource):
    isLeaf = True

    def __init__(self, inner, cert):
        super().__init__()
        self.inner = inner
        self.cert = cert

    def render(self, request):
        request.transport = _WithCert(request.transport, self.cert)
        return self.inner.render(request)


@pytest.fixture(scope="module")
def certs(ca, foreign_ca):
    def x509(authority, role, name=None):
        return crypto.X509.from_cryptography(pki.issue_leaf(authority, role, name).cert)

    return {
        "master": x509(ca, "master"),
        "other-master": x509(ca, "master"),  # right CA and role, not the pinned one
        "updater": x509(ca, "updater", HOST),
        "other-updater": x509(ca, "updater", "w2"),
        "worker": x509(ca, "worker", "w2"),
        "self": x509(ca, "worker", HOST),
        "none": None,
    }


class Agent:
    def __init__(self, certs, store=None):
        self.engine = FakeEngine()
        self.store = store or MemoryStore()
        self.clock = Clock()
        self.clock.advance(1000)
        self.controller = Controller(self.engine, self.store, self.clock, host=HOST)
        master_fp = pki.fingerprint(certs["master"].to_cryptography())
        self.app = make_app(self.controller, host=HOST, master_fingerprint=master_fp)
        self.certs = certs

    def as_(self, who: str) -> StubTreq:
        return StubTreq(AsPeer(self.app.resource(), self.certs[who]))

    def call(self, who, method, path, body=None, raw=None):
        stub = self.as_(who)
        kw = {}
        if body is not None:
            kw["data"] = json.dumps(body).encode()
        if raw is not None:
            kw["data"] = raw
        d = stub.request(method, f"https://{HOST}:8765{path}", **kw)
        stub.flush()
        response = self.result(d)
        text = self.result(response.content())
        return response.code, json.loads(text) if text else None

    @staticmethod
    def result(d):
        out = []
        d.addBoth(out.append)
        assert out, "the request did not complete synchronously"
        if isinstance(out[0], Exception) or hasattr(out[0], "raiseException"):
            out[0].raiseException()
        return out[0]


@pytest.fixture
def agent(certs):
    return Agent(certs)


SPEC = {
    "deckies": [
        {"name": "web-01", "services": [{"type": "ssh", "port": 2222}, {"type": "http"}]},
        {"name": "db-01", "services": [{"type": "redis"}]},
    ]
}


def test_health_reports_status_version_release_and_uptime(certs, monkeypatch):
    monkeypatch.setenv("DECNET_RELEASE_ID", "r-20260102")
    agent = Agent(certs)
    # The release is the one the process started from, even if `current`
    # (here: the environment) changes before the agent is restarted.
    monkeypatch.setenv("DECNET_RELEASE_ID", "r-later")
    agent.clock.advance(42.5)
    code, doc = agent.call("master", "GET", "/health")
    assert code == 200
    assert doc == {
        "status": "ok",
        "host": HOST,
        "version": __import__("decnet").__version__,
        "release": "r-20260102",
        "engine": "fake",
        "uptime": 42.5,
    }


@pytest.mark.parametrize(
    ("who", "route", "expected"),
    [
        ("master", ("GET", "/health"), 200),
        ("updater", ("GET", "/health"), 200),
        ("other-updater", ("GET", "/health"), 403),
        ("worker", ("GET", "/health"), 403),
        ("self", ("GET", "/health"), 403),
        ("other-master", ("GET", "/health"), 403),
        ("none", ("GET", "/health"), 403),
        ("master", ("GET", "/status"), 200),
        ("updater", ("GET", "/status"), 403),
        ("worker", ("GET", "/status"), 403),
        ("updater", ("POST", "/deploy"), 403),
        ("worker", ("POST", "/deploy"), 403),
        ("other-master", ("POST", "/deploy"), 403),
        ("updater", ("POST", "/teardown"), 403),
        ("master", ("GET", "/nope"), 404),
        ("updater", ("GET", "/nope"), 403),
        ("master", ("GET", "/deploy"), 405),
        ("updater", ("GET", "/deploy"), 403),
    ],
)
def test_every_route_authorizes_by_role(agent, who, route, expected):
    method, path = route
    body = SPEC if path == "/deploy" and method == "POST" else None
    code, doc = agent.call(who, method, path, body=body)
    assert code == expected, doc
    if expected == 403:
        assert doc == {"problems": ["forbidden: this certificate may not call this route"]}
        assert agent.engine.applied == []


def test_deploy_applies_persists_and_reports_per_service_results(agent):
    code, doc = agent.call("master", "POST", "/deploy", SPEC)
    assert code == 200
    assert doc["ok"] is True and doc["changed"] is True and doc["failed"] == []
    assert doc["deckies"]["web-01"]["ssh"]["address"] == "0.0.0.0:2222"
    assert doc["deckies"]["db-01"]["redis"]["action"] == "started"
    assert len(agent.store.saved) == 1
    code, status = agent.call("master", "GET", "/status")
    assert status["spec_hash"] == doc["spec_hash"] == agent.store.saved[0].digest
    assert status["spec"]["deckies"][0]["services"][0]["type"] == "ssh"
    assert status["deckies"]["db-01"]["services"]["redis"]["state"] == "listening"


def test_deploying_the_same_spec_again_changes_nothing(agent):
    _, first = agent.call("master", "POST", "/deploy", SPEC)
    _, second = agent.call("master", "POST", "/deploy", SPEC)
    assert second["changed"] is False and second["spec_hash"] == first["spec_hash"]
    actions = {s["action"] for d in second["deckies"].values() for s in d.values()}
    assert actions == {"unchanged"}
    assert len(agent.store.saved) == 1


def test_a_service_that_cannot_bind_is_a_per_service_failure_not_an_error(agent):
    spec = {"deckies": [{"name": "d", "services": [{"type": "ftp", "port": 1}, {"type": "ssh"}]}]}
    code, doc = agent.call("master", "POST", "/deploy", spec)
    assert code == 200
    assert doc["ok"] is False
    assert doc["failed"] == ["d/ftp: cannot listen on 0.0.0.0:1: permission denied"]
    assert doc["deckies"]["d"]["ssh"]["state"] == "listening"


def test_an_invalid_spec_is_refused_with_every_problem_before_anything_changes(agent):
    bad = {"deckies": [{"name": "UPPER", "services": [{"type": "ssh", "port": -1}]}]}
    code, doc = agent.call("master", "POST", "/deploy", bad)
    assert code == 400
    assert len(doc["problems"]) == 2
    assert agent.engine.applied == [] and agent.store.saved == []


def test_a_body_that_is_not_json_is_a_400(agent):
    code, doc = agent.call("master", "POST", "/deploy", raw=b"{nope")
    assert code == 400 and "not valid JSON" in doc["problems"][0]


def test_teardown_of_one_decky_keeps_the_others(agent):
    agent.call("master", "POST", "/deploy", SPEC)
    code, doc = agent.call("master", "POST", "/teardown", {"decky": "web-01"})
    assert code == 200
    assert doc["removed"] == [
        {"decky": "web-01", "service": "http"},
        {"decky": "web-01", "service": "ssh"},
    ]
    _, status = agent.call("master", "GET", "/status")
    assert list(status["deckies"]) == ["db-01"]
    assert [d.name for d in agent.store.saved[-1].deckies] == ["db-01"]


def test_teardown_without_a_body_stops_everything(agent):
    agent.call("master", "POST", "/deploy", SPEC)
    code, doc = agent.call("master", "POST", "/teardown", raw=b"")
    assert code == 200 and len(doc["removed"]) == 3
    assert agent.engine.running == {}


def test_teardown_of_an_unknown_decky_is_a_404(agent):
    code, doc = agent.call("master", "POST", "/teardown", {"decky": "ghost"})
    assert code == 404
    assert doc == {"problems": ["no decky named 'ghost' is deployed on w1"]}


@pytest.mark.parametrize("body", [{"decky": 3}, {"decky": "x", "all": True}, ["web-01"]])
def test_teardown_refuses_malformed_bodies(agent, body):
    code, _ = agent.call("master", "POST", "/teardown", body)
    assert code == 400


def test_internal_errors_are_not_echoed(agent):
    def explode(spec):
        raise RuntimeError("secret /etc/shadow detail")

    agent.engine.apply = explode
    code, doc = agent.call("master", "POST", "/deploy", SPEC)
    assert code == 500
    assert doc == {"problems": ["internal error (see the daemon's log)"]}


def test_restore_reapplies_the_saved_spec(certs):
    from decnet.agent.spec import parse_spec

    store = MemoryStore(parse_spec(SPEC))
    a = Agent(certs, store=store)
    a.result(defer.ensureDeferred(a.controller.restore()))
    assert a.engine.applied[0].digest == store.spec.digest
    assert store.saved == []  # restoring does not rewrite the file
    _, status = a.call("master", "GET", "/status")
    assert status["summary"] == {"deckies": 2, "services": 3, "listening": 3, "failed": 0}
