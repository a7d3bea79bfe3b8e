"""The sandbox's live view against real mTLS workers: a stalled one never holds back the others."""

import pytest_twisted
from twisted.internet import defer, reactor

from decnet.cli.sandbox_view import SandboxConsole
from decnet.master import enrollment
from decnet.sandbox.layout import SandboxLayout
from decnet.sandbox.live import LiveView
from decnet.tls import TLSIdentity
from tests.hostile_worker import FakeWorker, Reply, fresh_master, health, no_control_characters
from tests.hostile_worker import status as status_doc
from tests.support import free_port

GUARD = 15.0


@pytest_twisted.async_yield_fixture
async def sandbox(master_home, tmp_path):
    layout = SandboxLayout.at(tmp_path / "sb")
    layout.root.mkdir()
    master = fresh_master(master_home, layout.master.home)
    fakes, workers = {}, {}
    for name in ("w1", "w2"):
        port = free_port()
        enrolled = enrollment.enroll(master, name, "127.0.0.1", tmp_path / name, agent_port=port)
        fakes[name] = await FakeWorker(enrolled.bundle_dir).start(reactor, agent_port=port)
        workers[name] = {"address": "127.0.0.1", "decoy_log": str(tmp_path / f"{name}.log")}
    yield layout, TLSIdentity.master(master.paths), workers, fakes
    for fake in fakes.values():
        await fake.stop()


class Said:
    """A terminal that hands each block the console writes (a whole table at once) to ``say``."""

    def __init__(self, say):
        self.say = say

    def write(self, text: str) -> None:
        self.say(text.removesuffix("\n"))

    def flush(self) -> None:
        pass


@pytest_twisted.ensureDeferred
async def test_a_stalled_worker_never_holds_back_the_row_of_another(sandbox):
    layout, identity, workers, fakes = sandbox
    fakes["w1"].routes = {
        ("agent", "health"): Reply(health(release="r1\x1b]0;PWNED\x07\x1b[2J")),
        ("agent", "status"): Reply(status_doc()),
    }
    fakes["w2"].routes = {("agent", "health"): Reply(health(), stall=True)}
    shown = defer.Deferred()
    said: list[str] = []

    def say(text: str) -> None:
        said.append(text)
        rows = {line.split()[0]: line.split() for line in text.splitlines()[2:] if line}
        if rows.get("w1", [None] * 3)[2] == "up" and not shown.called:
            shown.callback(rows)

    live = LiveView(reactor, SandboxConsole(Said(say)).show, layout, identity, workers)
    timer = reactor.callLater(GUARD, lambda: shown.called or shown.errback(AssertionError(said)))
    try:
        polling = defer.ensureDeferred(live.poll_hosts())
        rows = await shown
        await polling
    finally:
        if timer.active():
            timer.cancel()
        live.stop()
    # w1 is shown while w2's probe still waits for a body that never comes.
    assert rows["w1"][:4] == ["w1", "127.0.0.1", "up", "r1\\x1b]0;PWNED\\x07\\x1b[2J"]
    assert rows["w2"][:3] == ["w2", "127.0.0.1", "waiting"]
    assert len(fakes["w2"].stalled) == 1
    assert no_control_characters("\n".join(said)) == []
