"""Wheel releases through the updater's domain logic: dependency environments reused by
content, only missing wheels shipped, and hostile manifests refused before anything changes.

Synchronous, with the fakes of tests/test_updater_engine.py plus a fake pip that records
which environments it built (tests/test_updater_wheels_install.py runs the real one).
"""

import hashlib
import json

import pytest

from decnet import config
from decnet.errors import BadManifest, UnsafeArchive
from decnet.updater.manifest import (
    Manifest,
    check_wheels,
    make_manifest,
    missing_wheels,
    parse_manifest,
    wheel_of,
)
from tests.support import make_tarball, tree_snapshot
from tests.test_updater_engine import env, push  # noqa: F401  (env is a fixture)


class WheelInstaller:
    """A fake pip: records the environments and release venvs it was asked to build."""

    def __init__(self):
        self.envs = []
        self.venvs = []
        # The site-packages each build was told to carry byte code over from.
        self.previous_envs = []
        self.previous_venvs = []

    async def build_deps(self, env_dir, wheels, previous=None):
        (env_dir / "lib" / "python3.11" / "site-packages").mkdir(parents=True)
        (env_dir / "bin").mkdir()
        self.envs.append((env_dir.name, sorted(p.name for p in wheels)))
        self.previous_envs.append(previous)
        return "built"

    async def install_wheel(
        self, release_dir, deps_site, deps_bin, wheel, *, with_pip, previous=None
    ):
        (release_dir / "venv" / "lib" / "python3.11" / "site-packages").mkdir(parents=True)
        (release_dir / "venv" / "deps").write_text(str(deps_site))
        self.venvs.append((release_dir.name, wheel.name))
        self.previous_venvs.append(previous)
        return "installed"


@pytest.fixture
def wenv(env):  # noqa: F811
    env.updater.installer = WheelInstaller()
    env.installer = env.updater.installer
    return env


def wheel_bytes(name: str, version: str) -> tuple[str, bytes]:
    return f"{name}-{version}-py3-none-any.whl", f"wheel {name} {version}".encode()


DEPS = {"attrs": "26.1", "twisted": "26.10", "klein": "24.8"}


def release(code: str = "1", deps=DEPS, ship=None, manifest=None, extra=()) -> bytes:
    """A wheel release tarball; ``ship``: dependency names shipped (default: all)."""
    decnet_file, decnet_data = wheel_bytes("decnet_swarm", f"0.1.{code}")
    wheels = {decnet_file: decnet_data}
    dep_files = {n: wheel_bytes(n, v) for n, v in deps.items()}
    wheels.update(dict(dep_files.values()))
    built = make_manifest(
        wheel_of(decnet_file, sha(decnet_data)),
        [wheel_of(f, sha(d)) for f, d in dep_files.values()],
        {"source": "checkout"},
    )
    shipped = [decnet_file] + [dep_files[n][0] for n in (deps if ship is None else ship)]
    members = [(config.RELEASE_MANIFEST, manifest if manifest is not None else built.to_json())]
    members += [(f"wheels/{f}", wheels[f]) for f in shipped]
    return make_tarball([*members, *extra])


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest_of(data: bytes) -> Manifest:
    import gzip
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(data))) as tar:
        member = tar.extractfile(config.RELEASE_MANIFEST)
        assert member is not None
        return parse_manifest(member.read())


def inventory(e):
    return e.run(e.updater.wheels())


# -- reuse by content -----------------------------------------------------------------------------


def test_the_first_release_builds_its_environment_and_the_next_one_reuses_it(wenv):
    first = release("1")
    result = push(wenv, first)
    m1 = manifest_of(first)
    assert result["result"] == "updated" and result["release"] == m1.release
    assert wenv.installer.envs == [(m1.deps_id, sorted(w.file for w in m1.deps))]
    assert inventory(wenv) == {"wheels": sorted(w.sha256 for w in m1.deps), "deps": [m1.deps_id]}

    # Same dependencies, new code, and the master sends none of them.
    second = release("2", ship=[])
    assert push(wenv, second)["result"] == "updated"
    m2 = manifest_of(second)
    assert m2.deps_id == m1.deps_id and m2.release != m1.release
    assert len(wenv.installer.envs) == 1  # nothing rebuilt
    info = wenv.updater.store.release_info(m2.release)
    assert info["deps"] == m1.deps_id and info["wheel"] == m2.decnet.file
    # Byte code comes from the release in use, and from nowhere for the first one.
    site = wenv.updater.store.release_dir(m1.release) / "venv" / "lib" / "python3.11"
    assert wenv.installer.previous_venvs == [None, site / "site-packages"]
    assert wenv.installer.previous_envs == [None]


def test_one_changed_dependency_ships_one_wheel_and_builds_one_new_environment(wenv):
    push(wenv, release("1"))
    changed = {**DEPS, "klein": "25.1"}
    m = manifest_of(release("2", deps=changed))
    have = inventory(wenv)
    lacking = missing_wheels(m, have["wheels"], have["deps"])
    assert [w.name for w in lacking] == ["klein"]
    push(wenv, release("2", deps=changed, ship=["klein"]))
    assert len(wenv.installer.envs) == 2 and wenv.installer.envs[1][0] == m.deps_id
    # The new environment carries byte code over from the one in use.
    in_use = wenv.updater.deps.site_packages(wenv.installer.envs[0][0])
    assert wenv.installer.previous_envs == [None, in_use]


def test_rollback_goes_back_to_the_old_code_on_its_old_environment(wenv):
    old = manifest_of(release("1"))
    push(wenv, release("1"))
    push(wenv, release("2", deps={**DEPS, "attrs": "27.0"}, ship=["attrs"]))
    result = wenv.run(wenv.updater.rollback())
    assert result["release"] == old.release
    info = wenv.updater.store.release_info(old.release)
    assert info["deps"] == old.deps_id
    assert wenv.updater.deps.is_complete(old.deps_id)
    venv = wenv.updater.store.release_dir(old.release) / "venv"
    assert old.deps_id in (venv / "deps").read_text()


def test_an_environment_goes_with_the_last_release_that_used_it(wenv):
    first = manifest_of(release("1"))
    push(wenv, release("1"))
    for i, attrs_version in enumerate(("27", "28", "29", "30"), start=2):
        push(wenv, release(str(i), deps={**DEPS, "attrs": attrs_version}, ship=["attrs"]))
    assert first.release not in wenv.updater.store.scan().complete  # keep=3
    have = inventory(wenv)
    assert first.deps_id not in have["deps"]
    assert len(have["deps"]) == len(wenv.updater.store.scan().complete)
    attrs_26 = next(w for w in first.deps if w.name == "attrs")
    assert attrs_26.sha256 not in have["wheels"]  # no kept environment uses it
    twisted = next(w for w in first.deps if w.name == "twisted")
    assert twisted.sha256 in have["wheels"]  # every kept one does


def test_a_dependency_neither_shipped_nor_stored_is_refused_before_anything_changes(wenv):
    push(wenv, release("1"))
    before = tree_snapshot(wenv.root)
    with pytest.raises(BadManifest) as info:
        push(wenv, release("2", deps={**DEPS, "six": "1.17"}, ship=[]))
    assert info.value.status == 400 and "neither shipped nor stored" in str(info.value)
    assert tree_snapshot(wenv.root) == before


# -- hostile manifests ----------------------------------------------------------------------------


def good_doc() -> dict:
    return json.loads(manifest_of(release("1")).to_json())


def doc_bytes(doc) -> bytes:
    return json.dumps(doc).encode()


def with_dep(doc, **change) -> dict:
    doc["deps"][0].update(change)
    return doc


def renamed_twice(doc) -> dict:
    doc["deps"].append(dict(doc["deps"][0]))
    return doc


HOSTILE = {
    "a dependency sha256 that does not match its wheel": lambda: doc_bytes(
        with_dep(good_doc(), sha256="0" * 64)
    ),
    "a wheel name with '..' in it": lambda: doc_bytes(
        with_dep(good_doc(), file="attrs-26.1-py3-none-..whl")
    ),
    "a wheel name that climbs out": lambda: doc_bytes(
        with_dep(good_doc(), file="../../attrs-26.1-py3-none-any.whl")
    ),
    "an absolute wheel path": lambda: doc_bytes(
        with_dep(good_doc(), file="/etc/attrs-26.1-py3-none-any.whl")
    ),
    "the same name twice": lambda: doc_bytes(renamed_twice(good_doc())),
    "a version that disagrees with the file": lambda: doc_bytes(
        with_dep(good_doc(), version="9.9")
    ),
    "deps of the wrong type": lambda: doc_bytes({**good_doc(), "deps": "attrs"}),
    "a sha256 of the wrong type": lambda: doc_bytes(with_dep(good_doc(), sha256=12)),
    "a decnet entry that is a list": lambda: doc_bytes({**good_doc(), "decnet": []}),
    "an unknown format": lambda: doc_bytes({**good_doc(), "format": "decnet-release/9"}),
    "a release id that its wheels do not derive": lambda: doc_bytes(
        {**good_doc(), "release": "0" * 16}
    ),
    "not JSON": lambda: b"\xff{not json",
    "a JSON list": lambda: b"[]",
    "a huge manifest": lambda: b" " * (config.MAX_MANIFEST_BYTES + 1),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_manifest_is_refused_with_400_and_the_install_dir_untouched(wenv, case):
    push(wenv, release("1"))
    before = tree_snapshot(wenv.root)
    data = release("2", manifest=HOSTILE[case]())
    with pytest.raises(BadManifest) as info:
        push(wenv, data)
    assert info.value.status == 400
    assert tree_snapshot(wenv.root) == before


def test_a_shipped_wheel_the_manifest_does_not_list_is_refused(wenv):
    push(wenv, release("1"))
    before = tree_snapshot(wenv.root)
    smuggled = ("wheels/evil-1.0-py3-none-any.whl", b"not listed")
    with pytest.raises(BadManifest, match="does not list"):
        push(wenv, release("2", extra=[smuggled]))
    nested = ("wheels/sub/attrs-26.1-py3-none-any.whl", b"nested")
    with pytest.raises(BadManifest, match="does not list"):
        push(wenv, release("3", extra=[nested]))
    assert tree_snapshot(wenv.root) == before


def test_a_wheel_member_escaping_the_tarball_is_refused_by_the_extractor(wenv):
    push(wenv, release("1"))
    before = tree_snapshot(wenv.root)
    with pytest.raises(UnsafeArchive):  # refused while it streams, before any write
        push(wenv, release("2", extra=[("wheels/../../x.whl", b"x")]))
    assert tree_snapshot(wenv.root) == before


def test_the_manifest_checks_are_pure_and_name_the_problem():
    m = manifest_of(release("1"))
    shipped = {w.file: w.sha256 for w in m.wheels}
    assert check_wheels(m, shipped, [], have_env=False) == m.deps
    with pytest.raises(BadManifest, match="sha256"):
        check_wheels(m, {**shipped, m.deps[0].file: "1" * 64}, [], have_env=False)
    with pytest.raises(BadManifest, match="decnet wheel"):
        check_wheels(m, {}, [w.sha256 for w in m.deps], have_env=False)
    only_decnet = {m.decnet.file: m.decnet.sha256}
    assert check_wheels(m, only_decnet, [], have_env=True) == ()
    assert missing_wheels(m, [], [m.deps_id]) == []
    assert missing_wheels(m, [m.deps[0].sha256], []) == list(m.deps[1:])


@pytest.mark.parametrize("length", [40, 200])
def test_console_scripts_are_moved_onto_the_release_interpreter_in_either_shebang_form(length):
    from decnet.updater.installer import script_body, shebang

    deps_python = ("/opt/decnet/deps/" + "d" * length + "/bin/python").encode()
    release_python = ("/opt/decnet/releases/" + "r" * length + "/venv/bin/python").encode()
    body = b"import sys\nfrom twisted.scripts.twistd import run\nsys.exit(run())\n"
    script = shebang(deps_python) + body
    assert (script.startswith(b"#!/bin/sh\n")) == (length > 100)
    assert script_body(script, deps_python) == body
    assert script_body(script, release_python) is None  # not ours to move
    assert script_body(shebang(release_python) + body, release_python) == body


class FailingInstaller(WheelInstaller):
    """pip dies half-way through the dependency environment (a full disk, a broken wheel)."""

    async def build_deps(self, env_dir, wheels, previous=None):
        (env_dir / "lib").mkdir()
        (env_dir / "lib" / "half-written.py").write_text("x" * 100)
        from decnet.errors import InstallFailed

        raise InstallFailed("pip install the dependency wheels failed (No space left on device)")


def test_a_dependency_environment_that_fails_to_build_leaves_the_directory_as_it_was(wenv):
    push(wenv, release("1"))
    before = tree_snapshot(wenv.root)
    wenv.updater.installer = FailingInstaller()
    from decnet.errors import InstallFailed

    with pytest.raises(InstallFailed, match="No space left"):
        push(wenv, release("2", deps={**DEPS, "six": "1.17"}, ship=["six"]))
    assert tree_snapshot(wenv.root) == before  # no half env, no orphan wheel, same current
    assert wenv.agent.running == manifest_of(release("1")).release


def test_a_dependency_environment_is_byte_compiled_even_with_no_compile(tmp_path):
    """It is read-only: no daemon can write its bytecode later, every start would recompile."""
    from decnet.updater.installer import Installer

    installer = Installer(None, compile_bytecode=False, use_own_pip=True)
    (_, create), (_, install), _ = installer.deps_commands(tmp_path / "env", [tmp_path / "a.whl"])
    assert "--no-compile" not in install and "--no-deps" in install and "--no-index" in install
    assert "--without-pip" in create
    venv_install = installer._venv_and_pip(tmp_path / "venv", with_pip=False)[1]
    assert "--no-compile" in venv_install
