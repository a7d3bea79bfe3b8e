"""The dependency store: pruning rules, and a crash at every step of building, reusing and
pruning dependency environments (alongside the release store's own steps)."""

import hashlib
import os
import stat

import pytest

from decnet import config
from decnet.updater.deps import DepsStore, plan_deps_prune
from decnet.updater.manifest import deps_id, wheel_of
from decnet.updater.releases import IDLE, OP_UPDATE, ReleaseStore
from tests.test_updater_releases import A, B, Crash, activate, install


def fake_wheel(tmp, name: str, version: str = "1.0"):
    """A stand-in wheel file (the store never opens it) and its :class:`Wheel`."""
    data = f"{name}-{version}".encode()
    path = tmp / f"{name}-{version}-py3-none-any.whl"
    path.write_bytes(data)
    return wheel_of(path.name, hashlib.sha256(data).hexdigest()), path


def build_env(deps: DepsStore, wheels, hook=None) -> str:
    """What the updater does for a new dependency set, with a fake pip."""
    env = deps_id([w for w, _ in wheels])
    for wheel, path in wheels:
        deps.store_wheel(path, wheel)
    directory = deps.begin_env(env)
    site = directory / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True)
    if hook is not None:
        hook("pip")
    (site / "dep.py").write_text("X = 1\n")
    (directory / "bin").mkdir()
    (directory / "bin" / "tool").write_text("#!/bin/sh\n")
    deps.finish_env(env, [w for w, _ in wheels])
    return env


# -- pruning (pure) -------------------------------------------------------------------------------


def test_an_environment_stays_while_a_retained_release_refers_to_it():
    plan = plan_deps_prune({"e1": {"w1", "w2"}, "e2": {"w2", "w3"}}, {"e2"}, {"w1", "w2", "w3"})
    assert plan.envs == ("e1",)
    assert plan.wheels == ("w1",)  # w2 is shared with the kept environment


def test_wheels_no_environment_uses_go_and_nothing_referenced_goes():
    assert plan_deps_prune({}, set(), {"w9"}).wheels == ("w9",)
    kept = plan_deps_prune({"e1": {"w1"}}, {"e1", "gone"}, {"w1"})
    assert kept.envs == () and kept.wheels == ()


# -- the store on disk ----------------------------------------------------------------------------


def test_a_complete_environment_is_read_only_and_listed_with_its_wheels(tmp_path):
    deps = DepsStore(tmp_path / "install")
    wheels = [fake_wheel(tmp_path, "alpha"), fake_wheel(tmp_path, "beta")]
    env = build_env(deps, wheels)
    directory = deps.env_dir(env)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o555
    dep = directory / "lib" / "python3.11" / "site-packages" / "dep.py"
    assert stat.S_IMODE(dep.stat().st_mode) & 0o222 == 0
    with pytest.raises(PermissionError):
        if os.geteuid() == 0:  # root ignores modes: check them instead
            raise PermissionError
        dep.write_text("changed")
    assert deps.inventory() == {"wheels": sorted(w.sha256 for w, _ in wheels), "deps": [env]}
    assert deps.envs()[env] == {w.sha256 for w, _ in wheels}


def test_pruning_deletes_a_read_only_environment_and_its_wheels(tmp_path):
    deps = DepsStore(tmp_path / "install")
    env = build_env(deps, [fake_wheel(tmp_path, "alpha")])
    plan = deps.prune(set())
    assert plan.envs == (env,)
    assert deps.inventory() == {"wheels": [], "deps": []}
    assert list(deps.deps_dir.iterdir()) == []


def test_a_path_like_environment_id_is_refused(tmp_path):
    deps = DepsStore(tmp_path / "install")
    with pytest.raises(ValueError):
        deps.env_dir("../../etc")
    assert deps.wheel_path("../x") is None


# -- a crash at every step ------------------------------------------------------------------------


class Hook:
    """One crash hook for both stores: raises before the ``n``-th durable step."""

    def __init__(self, n):
        self.n = n
        self.steps: list[str] = []

    def __call__(self, step):
        self.steps.append(step)
        if len(self.steps) == self.n:
            raise Crash(step)


def stores(root, hook=None):
    s = ReleaseStore(root, hook)
    s.journal = s.read_journal()
    return s, DepsStore(root, hook)


def prepare(root, tmp):
    """Release A current, on dependency environment ENV_A (wheels alpha, beta)."""
    s, deps = stores(root)
    s.reconcile()
    env = build_env(deps, [fake_wheel(tmp, "alpha"), fake_wheel(tmp, "beta")])
    install(s, A, at="1", deps=env)
    activate(s, A)
    return env


def next_release_new_deps(root, tmp, hook):
    """Release B on a new environment (beta kept, gamma new): build it, switch, prune both."""
    s, deps = stores(root, hook)
    s.begin_install(B)
    env = build_env(deps, [fake_wheel(tmp, "beta"), fake_wheel(tmp, "gamma")], hook)
    (s.release_dir(B) / "venv").mkdir()
    s.finish_install(B, {"installed_at": "2", "deps": env}, "log")
    s.switch_to(B, OP_UPDATE)
    s.commit()
    s.prune(1)
    deps.prune(s.deps_refs())


def next_release_same_deps(root, tmp, hook):
    """Release B on A's environment: nothing is built, nothing of the store is pruned."""
    s, deps = stores(root, hook)
    (env,) = deps.envs()
    install(s, B, at="2", deps=env)
    s.switch_to(B, OP_UPDATE)
    s.commit()
    s.prune(1)
    deps.prune(s.deps_refs())


SCENARIOS = {"new-deps": next_release_new_deps, "same-deps": next_release_same_deps}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_a_crash_at_every_step_leaves_every_retained_release_its_dependencies(tmp_path, name):
    """kill -9 before every durable step of building a dependency environment, storing its
    wheels, installing the release, switching and pruning releases and environments: after
    the start-up reconcile no half-built environment or stored wheel is left, every complete
    environment is sealed, and every retained release (current first) still has its own."""
    scenario = SCENARIOS[name]
    counter = Hook(10**9)
    prepare(tmp_path / "count", tmp_path)
    scenario(tmp_path / "count", tmp_path, counter)
    total = len(counter.steps)
    assert total >= 8
    for n in range(1, total + 2):
        root = tmp_path / f"crash-{n}"
        prepare(root, tmp_path)
        hook = Hook(n)
        try:
            scenario(root, tmp_path, hook)
        except Crash:
            pass
        where = f"crash before step {n}/{total} ({hook.steps[-1]})"
        s, deps = stores(root)
        s.reconcile()
        deps.reconcile(s.deps_refs())
        assert s.read_journal().state == IDLE, where
        envs = deps.envs()
        for entry in deps.deps_dir.iterdir():
            assert entry.name in envs, (where, entry.name)  # complete, or gone
            assert stat.S_IMODE(entry.stat().st_mode) == 0o555, where
        for release in s.scan().complete:
            env = s.release_info(release)["deps"]
            assert env in envs, (where, release)
            assert envs[env] <= set(deps.wheels()), (where, "wheels of a kept environment")
        assert s.current() in s.scan().complete, where
        assert set(envs) == s.deps_refs(), (where, "an unreferenced environment survived")
        assert not any(p.name.startswith(".") for p in deps.wheels_dir.iterdir()), where
        # Repair is idempotent.
        assert deps.reconcile(s.deps_refs()) == [], where


def test_a_half_built_environment_is_removed_and_built_again(tmp_path):
    root = tmp_path / "install"
    prepare(root, tmp_path)
    s, deps = stores(root)
    wheels = [fake_wheel(tmp_path, "delta")]
    env = deps_id([w for w, _ in wheels])
    directory = deps.begin_env(env)
    (directory / "partial").write_text("pip was killed here")
    notes = deps.reconcile(s.deps_refs())
    assert any("incomplete dependency environment" in n for n in notes)
    assert not directory.exists()
    assert build_env(deps, [fake_wheel(tmp_path, "delta")]) == env
    assert deps.is_complete(env)


def test_install_info_records_the_environment_a_release_uses(tmp_path):
    root = tmp_path / "install"
    env = prepare(root, tmp_path)
    s, _ = stores(root)
    assert s.deps_refs() == {env}
    assert s.list_releases()[0]["deps"] == env
    assert (root / config.DEPS_DIR / env / config.DEPS_ENV_FILE).is_file()
