"""``decnet-admin bundle refresh`` against a real updater (its Klein app over real mTLS,
in this process) and the real console script: only the master may replace the listener
list, a hostile list changes nothing, and a lying answer is one failed row."""

from __future__ import annotations

import json
import os

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue

from decnet import config, pki
from decnet.errors import BadReply, PeerRefused, RemoteError
from decnet.httpapi import make_site
from decnet.httpclient import PinnedClient
from decnet.master import enrollment
from decnet.master.listeners import add_listener
from decnet.master.refresh import FAILED, refresh_listeners
from decnet.master.registry import Registry
from decnet.master.updater_client import UpdaterClient
from decnet.threads import pool_runner
from decnet.tls import Accept, PeerPolicy, PolicyOptions, TLSIdentity, listen_tls
from decnet.updater.app import build_app, upload_limits
from tests.listeners_support import own_master_home
from tests.support import BIN, free_port, write_identity
from tests.test_updater_engine import FakeAgent
from tests.test_updater_http import fake_updater

ADMIN = str(BIN / "decnet-admin")


@pytest.fixture
def paths(master_home, tmp_path) -> config.MasterPaths:
    """A master home of its own (the session's CA and identities, copied: no keygen)."""
    return own_master_home(master_home, tmp_path)


@pytest_twisted.async_yield_fixture
async def worker(paths, tmp_path):
    """An enrolled worker (an old bundle: no listener list) and its updater, serving."""
    master = enrollment.load_master(paths)
    port = free_port()
    enrollment.enroll(
        master, "rf-a", "127.0.0.1", tmp_path / "bundle", updater=True, updater_port=port
    )
    bundle = pki.WorkerBundle.load(tmp_path / "bundle")
    identity = TLSIdentity.from_bundle(bundle, "updater")
    master_rule = Accept("master", cn=config.MASTER_CN, fingerprint=bundle.master_fingerprint)
    local = (Accept("worker", cn=bundle.name), Accept("updater", cn=f"updater@{bundle.name}"))
    updater = fake_updater(tmp_path, FakeAgent(), lambda _: None)
    await updater.start()
    app = build_app(
        updater,
        master=master_rule,
        local=local,
        bundle_dir=bundle.directory,
        run=pool_runner(reactor),
    )
    site = make_site(app.resource(), limits=upload_limits(master_rule, 1024 * 1024))
    listening = await listen_tls(
        reactor,
        f"tcp:{port}:interface=127.0.0.1",
        PolicyOptions(identity, PeerPolicy([master_rule, *local])),
        site,
    )
    yield bundle
    await listening.stopListening()


async def admin(paths, *args):
    out, err, code = await getProcessOutputAndValue(
        ADMIN, ["--home", str(paths.home), *args], env=dict(os.environ), reactor=reactor
    )
    return out.decode(), err.decode(), code


def _client(paths, who=None, identity=None):
    host = Registry(paths.registry).get("rf-a")
    if who is None:
        return UpdaterClient(reactor, TLSIdentity.master(paths), host, timeout=10)
    fp = host.updater_fingerprint
    return PinnedClient(
        reactor,
        identity,
        address="127.0.0.1",
        port=host.updater_port,
        accept=Accept("updater", cn="updater@rf-a", fingerprint=fp),
    )


@pytest_twisted.ensureDeferred
async def test_refresh_replaces_only_the_listener_list_and_reports_per_host(paths, worker):
    before = json.loads((worker.directory / config.BUNDLE_CONFIG).read_text())
    add_listener(paths, "127.0.0.1:7001")
    add_listener(paths, "127.0.0.2:7002")
    out, err, code = await admin(paths, "bundle", "refresh", "rf-a", "--json")
    assert code == 0, (out, err)
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[0] == {"host": "rf-a", "result": "refreshed", "detail": ""}
    assert lines[-1] == {"summary": True, "hosts": 1, "failed": 0}
    after = json.loads((worker.directory / config.BUNDLE_CONFIG).read_text())
    assert after == {**before, "listeners": ["127.0.0.1:7001", "127.0.0.2:7002"]}
    assert pki.WorkerBundle.load(worker.directory).listeners == [
        ("127.0.0.1", 7001),
        ("127.0.0.2", 7002),
    ]
    out, err, code = await admin(paths, "bundle", "refresh", "--all")
    assert code == 0, (out, err)
    assert "[rf-a] unchanged" in out and "RESULT" in out


@pytest_twisted.ensureDeferred
async def test_refresh_with_an_empty_list_says_what_to_do_and_contacts_nobody(paths, worker):
    _, err, code = await admin(paths, "bundle", "refresh", "rf-a")
    assert code == 1
    assert "decnet-admin listeners add" in err


@pytest.mark.parametrize(
    "body",
    [
        {"listeners": [f"10.0.{i // 250}.{i % 250 + 1}:6514" for i in range(33)]},
        {"listeners": ["bad_host:6514"]},
        {"listeners": ["10.0.0.1:6514", "10.0.0.1:6514"]},
        {"listeners": []},
        {"listeners": "10.0.0.1:6514"},
        {"listeners": ["10.0.0.1:6514"], "master_fingerprint": "00" * 32},
        ["10.0.0.1:6514"],
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_hostile_list_is_refused_with_400_and_the_bundle_is_untouched(paths, worker, body):
    raw = (worker.directory / config.BUNDLE_CONFIG).read_bytes()
    client = _client(paths)
    try:
        with pytest.raises(RemoteError) as caught:
            await client.http.call("POST", "listeners", json=body)
    finally:
        await client.close()
    assert caught.value.status == 400
    assert (worker.directory / config.BUNDLE_CONFIG).read_bytes() == raw


@pytest_twisted.ensureDeferred
async def test_only_the_master_may_replace_the_list(paths, worker, tmp_path, foreign_ca):
    raw = (worker.directory / config.BUNDLE_CONFIG).read_bytes()
    master = enrollment.load_master(paths)
    others = {
        "the worker itself": TLSIdentity.from_bundle(worker, "worker"),
        "its own updater": TLSIdentity.from_bundle(worker, "updater"),
        "another worker": write_identity(tmp_path / "w2", master.ca, "worker", "rf-b"),
        "a master of another CA": write_identity(
            tmp_path / "fm", foreign_ca, "master", trust=master.ca
        ),
    }
    for who, identity in others.items():
        client = _client(paths, who, identity)
        try:
            # Refused in the handshake (another host's worker) or with 403 (this host's
            # own identities, admitted on GET /health only).
            with pytest.raises((RemoteError, PeerRefused)) as caught:
                await client.call("POST", "listeners", json={"listeners": ["10.6.6.6:6514"]})
        finally:
            await client.close()
        if isinstance(caught.value, RemoteError):
            assert caught.value.status == 403, who
        else:
            assert who in ("another worker", "a master of another CA")
    assert (worker.directory / config.BUNDLE_CONFIG).read_bytes() == raw


class _Liar:
    """An updater that answers with another list than the one it was sent."""

    def __init__(self, host, paths):
        self.client = UpdaterClient(reactor, TLSIdentity.master(paths), host, timeout=5)

        async def lie(*args, **kwargs):
            return {"listeners": ["10.6.6.6:6514"], "changed": True}

        self.client.http.call = lie

    async def set_listeners(self, listeners, timeout=None):
        return await self.client.set_listeners(listeners, timeout)

    async def close(self):
        await self.client.close()


@pytest_twisted.ensureDeferred
async def test_an_updater_lying_about_the_list_is_one_failed_row(paths, worker):
    host = Registry(paths.registry).get("rf-a")
    with pytest.raises(BadReply):
        await _Liar(host, paths).set_listeners(["127.0.0.1:7001"])
    results = await refresh_listeners(
        [host], ["127.0.0.1:7001"], lambda h: _Liar(h, paths), concurrency=2
    )
    assert [r.result for r in results] == [FAILED]
    assert "another listener list" in results[0].detail
