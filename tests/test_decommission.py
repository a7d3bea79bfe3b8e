"""``decnet-admin decommission``: confirmation, teardown through the agent first, then the
revocation; and a revoked worker's forwarder saying it is refused instead of looping."""

from __future__ import annotations

import io
import json
import socket
from types import SimpleNamespace

import pytest
import pytest_twisted
from OpenSSL import SSL
from twisted.internet.error import ConnectionRefusedError
from twisted.python.failure import Failure

from decnet import revocation
from decnet.cli import decommission as cli_decommission
from decnet.errors import ValidationError
from decnet.forwarder.client import REFUSED_AFTER, ForwarderFactory
from decnet.master import enroll_tokens, enrollment
from decnet.master.registry import Registry
from tests.enroll_support import fresh_master, registry_dump
from tests.logpipe_support import LogCapture
from tests.support import admin_output, record_ports, started_agent

SAID = "refused by the master: this worker's certificate is revoked or unknown"


@pytest.fixture
def master(master_home, tmp_path):
    return fresh_master(master_home, tmp_path)


async def admin(master, *args):
    return await admin_output(master.paths.home, *args)


@pytest_twisted.async_yield_fixture
async def agent(master, tmp_path):
    up = enrollment.enroll(master, "dec-up", "127.0.0.1", tmp_path / "up", updater=True)
    service = await started_agent(up.bundle_dir, tmp_path)
    record_ports(master.paths, "dec-up", agent_port=service.port)
    yield service
    await service.stopService()


@pytest_twisted.ensureDeferred
async def test_without_yes_on_a_pipe_it_refuses_says_pass_yes_and_changes_nothing(master, tmp_path):
    enrollment.enroll(master, "dec-01", "127.0.0.1", tmp_path / "b")
    before = registry_dump(master.paths.registry)
    out, err, code = await admin(master, "decommission", "dec-01")
    assert code == 1 and out == ""
    assert "stdin is not a terminal; pass --yes" in err and "Traceback" not in err
    assert registry_dump(master.paths.registry) == before
    assert revocation.read_entries(master.paths.revocations) == []


@pytest_twisted.ensureDeferred
async def test_it_tears_down_the_deckies_through_the_agent_then_revokes(master, agent, tmp_path):
    spec = {"deckies": [{"name": "web-01", "services": [{"type": "redis", "port": 0}]}]}
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    out, err, code = await admin(master, "deploy", "dec-up", "--spec", str(spec_file))
    assert code == 0, err
    assert agent.engine.status()["web-01"]

    out, err, code = await admin(master, "decommission", "dec-up", "--yes", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["teardown"] == {"state": "done", "detail": "1 services stopped"}
    assert doc["host"]["status"] == "decommissioned" and len(doc["revoked"]) == 2
    assert agent.engine.status() == {}
    host = Registry(master.paths.registry).get("dec-up")
    revoked = revocation.RevocationSet(master.paths.revocations)
    assert host.worker_fingerprint in revoked and host.updater_fingerprint in revoked


@pytest_twisted.ensureDeferred
async def test_an_unreachable_worker_is_reported_and_revoked_anyway(master, tmp_path):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        enrollment.enroll(master, "dec-02", "127.0.0.1", tmp_path / "b", agent_port=port)
        out, err, code = await admin(master, "decommission", "dec-02", "--yes")
    assert code == 0, err
    assert "teardown         failed: cannot reach" in out
    assert "Decommissioned dec-02" in out
    host = Registry(master.paths.registry).get("dec-02")
    assert host.worker_fingerprint in revocation.RevocationSet(master.paths.revocations)


@pytest_twisted.ensureDeferred
async def test_a_name_with_only_a_pending_token_is_cancelled_and_never_joins(master):
    enroll_tokens.issue_token(master, "dec-03", "127.0.0.1")
    out, err, code = await admin(master, "decommission", "dec-03", "--yes")
    assert code == 0, err
    assert "Cancelled 1 unused enrollment token(s) for dec-03" in out
    assert "never joined" in out


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("typed", "confirmed"), [("dec-04\n", True), ("y\n", False), ("", False)])
def test_on_a_terminal_the_operator_must_type_the_host_name(monkeypatch, typed, confirmed):
    monkeypatch.setattr("sys.stdin", _Terminal(typed))
    monkeypatch.setattr("sys.stderr", io.StringIO())
    args = SimpleNamespace(yes=False, name="dec-04")
    if confirmed:
        cli_decommission.confirm(args, None)
    else:
        with pytest.raises(ValidationError, match="not confirmed; 'dec-04' is unchanged"):
            cli_decommission.confirm(args, None)


@pytest_twisted.ensureDeferred
async def test_the_help_has_examples_and_describes_name_yes_and_no_teardown(master):
    text, _, code = await admin(master, "decommission", "--help")
    assert code == 0 and "examples:" in text and "the host to retire" in text
    assert "--yes" in text and "--no-teardown" in text


# -- the revoked worker's forwarder -------------------------------------------------------


def _alert(text: str) -> Failure:
    return Failure(SSL.Error([("SSL routines", "", text)]))


def _factory() -> ForwarderFactory:
    return ForwarderFactory(None, stream="decnet", mode="ack", target="master:6514")


def test_repeated_refusal_alerts_after_the_handshake_are_explained_once_then_quiet():
    """TLS 1.3: the client's handshake ends before the listener refuses its certificate."""
    factory = _factory()
    states = []
    factory.state_listeners.append(lambda state, detail: states.append(detail))
    with LogCapture() as logs:
        for _ in range(10):
            proto = SimpleNamespace(mode="ack", refusal=None)
            factory.connected(proto, "acknowledged")
            factory.disconnected(proto, _alert("tlsv1 alert internal error"))
    text = logs.text()
    assert text.count(SAID) == 1
    assert text.count("Disconnected from master:6514") == REFUSED_AFTER - 1
    assert SAID in states[-1]


def test_repeated_refusal_alerts_in_the_handshake_are_explained_once():
    factory = _factory()
    with LogCapture() as logs:
        for _ in range(10):
            factory.disconnected(
                SimpleNamespace(mode=None, refusal=None), _alert("sslv3 alert bad certificate")
            )
    assert logs.text().count(SAID) == 1


def test_other_failures_are_never_taken_for_a_revocation():
    factory = _factory()
    with LogCapture() as logs:
        for _ in range(10):
            factory.disconnected(
                SimpleNamespace(mode=None, refusal=None), Failure(ConnectionRefusedError())
            )
            proto = SimpleNamespace(mode="ack", refusal=None)
            factory.disconnected(proto, _alert("decryption failed or bad record mac"))
    assert SAID not in logs.text()


def test_once_the_master_admits_the_worker_a_later_refusal_is_explained_again():
    factory = _factory()
    with LogCapture() as logs:
        for _ in range(REFUSED_AFTER):
            factory.disconnected(
                SimpleNamespace(mode="ack", refusal=None), _alert("tlsv1 alert internal error")
            )
        factory.admitted()
        for _ in range(REFUSED_AFTER):
            factory.disconnected(
                SimpleNamespace(mode="ack", refusal=None), _alert("tlsv1 alert internal error")
            )
    assert logs.text().count(SAID) == 2
