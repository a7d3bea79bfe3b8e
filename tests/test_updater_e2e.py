"""End to end: real ``twistd decnet-updater`` processes supervising the agent (spawn),
real per-release venvs installed offline with pip, pushed by the real ``decnet-admin``.

The agent is the repository's own ``twistd decnet-agent``, from each release's venv.
"""

import json
import subprocess
import uuid

import pytest

from tests.support import LocalUpdater, admin, wait_for

pytestmark = pytest.mark.slow


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def updaters(tmp_path, master_home):
    started = []

    def make(count=1, **kw):
        for _ in range(count):
            started.append(LocalUpdater(tmp_path, master_home, unique("e2e"), **kw).start())
        return started[-count:]

    yield make
    for u in started:
        u.stop()


def update(paths, *args, root, wheelhouse, timeout=300):
    return admin(paths, "update", *args, "--root", str(root), "--wheelhouse", str(wheelhouse))


def release_of(result) -> str:
    first = result.stdout.splitlines()[0]
    assert first.startswith("Release "), result.stdout + result.stderr
    return first.split()[1].rstrip(":")


def releases(u):
    result = admin(u.paths, "releases", u.name, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_good_push_bad_pushes_rollback_and_update_self(
    updaters, master_home, release_trees, wheelhouse
):
    """A whole life on one worker: pushes good and bad, rollback, update-self."""
    (u,) = updaters(1)
    assert u.health()["release"] is None  # the updater itself runs from a checkout
    paths = master_home

    # A good release: installed into its own venv, the agent reports its id.
    r = update(paths, "--host", u.name, root=release_trees["good1"], wheelhouse=wheelhouse)
    assert r.returncode == 0, r.stdout + r.stderr + u.tail()
    id1 = release_of(r)
    assert f"{u.name}  updated  {id1}" in r.stdout
    assert u.agent_release() == id1
    venv_python = u.install / "releases" / id1 / "venv" / "bin" / "python"
    assert venv_python.exists()

    # A second good release.
    r = update(paths, "--host", u.name, root=release_trees["good2"], wheelhouse=wheelhouse)
    assert r.returncode == 0, r.stdout + r.stderr + u.tail()
    id2 = release_of(r)
    assert u.agent_release() == id2

    # An agent that crashes at start: rolled back, healthy on id2, output captured.
    r = update(paths, "--host", u.name, root=release_trees["crash"], wheelhouse=wheelhouse)
    assert r.returncode == 1
    assert f"{u.name}  rolled_back  {id2}" in r.stdout, r.stdout
    assert u.agent_release() == id2 and u.current() == id2
    crash = release_of(r)

    # An agent that never reports its release: rolled back after the health timeout.
    r = update(paths, "--host", u.name, root=release_trees["wrong"], wheelhouse=wheelhouse)
    assert r.returncode == 1
    assert "rolled_back" in r.stdout and "did not report release" in r.stdout, r.stdout
    assert u.agent_release() == id2
    wrong = release_of(r)

    # --keep 3: of four releases, the older failed one went first; the other is marked.
    listing = releases(u)
    assert listing["current"] == id2
    rows = {r["id"]: r for r in listing["releases"]}
    assert set(rows) == {id1, id2, wrong} and crash not in rows
    assert rows[id1]["rollback_target"] and rows[wrong]["failed"] and not rows[id2]["failed"]
    # The agent runs from id2's venv and pins it; nothing runs from the others.
    assert rows[id2]["in_use"] and not rows[id1]["in_use"] and not rows[wrong]["in_use"]
    table = admin(paths, "releases", u.name).stdout
    assert "in use" in next(line for line in table.splitlines() if line.startswith(id2))
    assert "failed" in next(line for line in table.splitlines() if line.startswith(wrong))

    # Rollback: the previous release's own venv runs again.
    r = admin(paths, "rollback", u.name)
    assert r.returncode == 0, r.stderr
    assert f"back on release {id1}" in r.stdout
    assert u.agent_release() == id1

    # update-self: the agent goes to id2 (already installed), then the updater
    # installs id2 for itself, re-executes, and answers /health with it.
    r = update(
        paths,
        "--host",
        u.name,
        "--include-self",
        root=release_trees["good2"],
        wheelhouse=wheelhouse,
    )
    assert r.returncode == 0, r.stdout + r.stderr + u.tail()
    assert "updater now on" in r.stdout
    assert u.health()["release"] == id2
    wait_for(lambda: u.agent_release() == id2, 30, what="the agent after the updater restart")
    assert u.process.poll() is None  # same process, new code (exec)


def test_kill_9_of_the_updater_mid_update_is_repaired_on_restart(
    updaters, master_home, release_trees, wheelhouse
):
    (u,) = updaters(1, health_timeout=30)
    paths = master_home
    r = update(paths, "--host", u.name, root=release_trees["good1"], wheelhouse=wheelhouse)
    assert r.returncode == 0, r.stdout + r.stderr + u.tail()
    id1 = release_of(r)

    def push_in_background(tree):
        return subprocess.Popen(
            [
                str(__import__("tests.support").support.BIN / "decnet-admin"),
                "--home",
                str(paths.home),
                "update",
                "--host",
                u.name,
                "--root",
                str(tree),
                "--wheelhouse",
                str(wheelhouse),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    # 1. Killed while pip installs the new release (journal: staging).
    pusher = push_in_background(release_trees["good2"])
    wait_for(lambda: u.journal().get("state") == "staging", 60, what="staging")
    u.kill9()
    out, _ = pusher.communicate(timeout=60)
    assert pusher.returncode == 1 and "failed" in out
    u.start()
    assert u.current() == id1
    assert u.journal()["state"] == "idle"
    assert sorted(p.name for p in (u.install / "releases").iterdir()) == [id1]
    wait_for(lambda: u.agent_release() == id1, 30, what="the agent back on id1")

    # 2. Killed after the switch, while the new release is being probed
    #    (journal: switched; this agent never reports healthy).
    pusher = push_in_background(release_trees["wrong"])
    wait_for(lambda: u.journal().get("state") == "switched", 120, what="switched")
    u.kill9()
    pusher.communicate(timeout=60)
    u.start()
    assert u.current() == id1 and u.journal()["state"] == "idle"
    wait_for(lambda: u.agent_release() == id1, 30, what="the agent back on id1")
    assert not (u.install / ".trash").exists()


def test_update_all_with_a_canary_across_several_updaters(
    updaters, master_home, release_trees, wheelhouse
):
    # Two updaters build their dependency environment and start their agent at the same
    # time on a loaded machine: give the agents the daemon's default health timeout (a
    # crashing agent is still detected at once, by its exit).
    fleet = updaters(3, health_timeout=30)
    paths = master_home
    names = [u.name for u in fleet]
    hosts = [arg for n in names for arg in ("--host", n)]
    r = update(
        paths,
        *hosts,
        "--canary",
        "1",
        "--concurrency",
        "3",
        root=release_trees["good1"],
        wheelhouse=wheelhouse,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    id1 = release_of(r)
    assert "canary phase" in r.stdout
    for u in fleet:
        assert u.agent_release() == id1, u.tail()

    # A bad release stops at the canary; the others are never touched.
    r = update(paths, *hosts, "--canary", "1", root=release_trees["crash"], wheelhouse=wheelhouse)
    assert r.returncode == 1
    rows = {
        line.split()[0]: line.split()[1]
        for line in r.stdout.splitlines()
        if line.startswith("e2e-")
    }
    assert sorted(rows.values()) == ["rolled_back", "skipped", "skipped"], r.stdout
    for u in fleet:
        assert u.agent_release() == id1
    canary = next(n for n, result in rows.items() if result == "rolled_back")
    others = [u for u in fleet if u.name != canary]
    assert all(len(list((u.install / "releases").iterdir())) == 1 for u in others)


def test_the_reason_a_release_failed_reaches_the_operator_and_the_agents_log(
    tmp_path, updaters, master_home, wheelhouse
):
    """An agent that dies with a traceback at start: the traceback is in update --json
    (results[].output.agent) and in the agent's twistd log (--agent-twistd-log)."""
    from tests.support import copy_release_tree

    tree = copy_release_tree(tmp_path / "traceback")
    with open(tree / "decnet" / "agent" / "tap.py", "a") as fh:
        fh.write('\nraise RuntimeError("this agent is broken on purpose")\n')
    agent_log = tmp_path / "agent-twistd.log"
    (u,) = updaters(1, extra=["--agent-twistd-log", str(agent_log)])
    r = update(master_home, "--host", u.name, "--json", root=tree, wheelhouse=wheelhouse)
    assert r.returncode == 1, r.stdout + r.stderr + u.tail()
    (result,) = json.loads(r.stdout)["results"]
    assert result["result"] == "failed", result
    agent = result["output"]["agent"]
    assert "Traceback (most recent call last)" in agent, result
    assert "RuntimeError: this agent is broken on purpose" in agent
    logged = agent_log.read_text()
    assert "Traceback (most recent call last)" in logged
    assert "RuntimeError: this agent is broken on purpose" in logged
