"""Pruning never deletes the current, the previous good or a running process's release.

Which release a process runs from is told by a pin: every daemon holds a shared
``flock`` on its release's ``release.json`` (``decnet.release.pin_running_release``).
Here the pinning process is a real one, started from the release's venv path
(``sys.prefix``-style), and killed with SIGKILL to show the kernel drops the pin.
"""

import fcntl
import os
import signal
import subprocess
import sys

import pytest

from decnet import release as release_module
from decnet.errors import RolledBack
from decnet.updater.releases import ReleaseStore
from tests.support import minimal_release
from tests.test_updater_engine import env, push, rid  # noqa: F401 - env is a fixture

PINNER = """
import sys
from decnet.release import pin_running_release
print(pin_running_release(sys.argv[1]), flush=True)
sys.stdin.read()
"""

RELEASES = [minimal_release(name=f"r{i}") for i in range(7)]


class Pinner:
    """A process that runs 'from' a release: it pins it, then waits for its stdin to close."""

    def __init__(self, venv):
        self.process = subprocess.Popen(
            [sys.executable, "-c", PINNER, str(venv)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.pinned = self.process.stdout.readline().strip()

    def kill9(self):
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)
        self.process.stdin.close()
        self.process.stdout.close()


@pytest.fixture
def pinners():
    started = []

    def start(venv):
        started.append(Pinner(venv))
        return started[-1]

    yield start
    for p in started:
        if p.process.poll() is None:
            p.kill9()


def listing(env):  # noqa: F811
    return {r["id"]: r for r in env.run(env.updater.releases())["releases"]}


def test_the_repro_keep_3_keeps_the_forwarders_release_and_prunes_the_rolled_back_one(
    env,  # noqa: F811
    pinners,
):
    """Before: --keep 3 deleted A (the forwarder's known-good release) and kept broken C."""
    a, b, c, d = RELEASES[:4]
    push(env, a)
    forwarder = pinners(env.root / "releases" / rid(a) / "venv")
    assert forwarder.pinned.endswith(f"releases/{rid(a)}/release.json")
    push(env, b)
    env.agent.sick.add(rid(c))
    with pytest.raises(RolledBack):
        push(env, c)
    rows = listing(env)
    assert rows[rid(c)]["failed"] and not rows[rid(b)]["failed"]
    assert rows[rid(a)]["in_use"] and not rows[rid(b)]["in_use"]
    push(env, d)
    assert set(listing(env)) == {rid(a), rid(b), rid(d)}


def test_a_pinned_release_outlives_keep_until_its_process_dies(env, pinners):  # noqa: F811
    env.updater.keep = 2
    first = RELEASES[0]
    push(env, first)
    forwarder = pinners(env.root / "releases" / rid(first) / "venv")
    for data in RELEASES[1:5]:
        push(env, data)
    kept = set(listing(env))
    assert kept == {rid(first), rid(RELEASES[4]), rid(RELEASES[3])}
    forwarder.kill9()  # the kernel drops the pin with the process
    push(env, RELEASES[5])
    assert set(listing(env)) == {rid(RELEASES[5]), rid(RELEASES[4])}


def test_a_failed_release_that_is_pushed_again_and_works_is_no_longer_failed(env):  # noqa: F811
    good, flaky = RELEASES[:2]
    push(env, good)
    env.agent.sick.add(rid(flaky))
    with pytest.raises(RolledBack):
        push(env, flaky)
    assert listing(env)[rid(flaky)]["failed"]
    env.agent.sick.clear()
    assert push(env, flaky)["installed"] is False  # still installed: only re-activated
    assert not listing(env)[rid(flaky)]["failed"]


def install(store: ReleaseStore, release: str) -> None:
    store.begin_install(release)
    store.finish_install(release, {})
    store.journal = store.journal.abort()


def test_a_pin_taken_after_the_plan_still_saves_the_release(tmp_path, pinners, monkeypatch):
    """The pin is checked again under the exclusive lock that is held across the rename."""
    store = ReleaseStore(tmp_path)
    store.reconcile()
    ids = ["a" * 16, "b" * 16, "c" * 16]
    for r in ids:
        install(store, r)
    store.switch_to(ids[-1], "update")
    store.commit()
    pinners(store.release_dir(ids[0]) / "venv")
    monkeypatch.setattr(store, "in_use", lambda release: False)  # free when the plan was made
    assert store.prune(1) == [ids[1]]
    assert store.is_complete(ids[0])


def test_the_exclusive_lock_is_held_while_a_release_is_renamed_into_the_trash(tmp_path):
    seen = []

    def hook(step):
        if step.startswith("discard:"):
            path = tmp_path / "releases" / step.split(":")[1] / "release.json"
            fd = os.open(path, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                seen.append("free")
            except BlockingIOError:
                seen.append("locked")
            finally:
                os.close(fd)

    store = ReleaseStore(tmp_path, crash_hook=hook)
    store.reconcile()
    for r in ("a" * 16, "b" * 16):
        install(store, r)
    store.switch_to("b" * 16, "update")
    store.commit()
    assert store.prune(1) == ["a" * 16]
    assert seen == ["locked"]


def test_outside_a_release_nothing_is_pinned(tmp_path):
    assert release_module.pin_running_release(tmp_path / "no-release" / "venv") is None
