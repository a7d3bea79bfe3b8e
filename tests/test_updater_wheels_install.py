"""A real wheel release: the master builds DECNET's wheel, the updater builds the dependency
environment once (offline pip) and each release's small venv on top of it."""

import os
import subprocess
import zipfile

import pytest
import pytest_twisted
from twisted.internet import reactor

from decnet import config
from decnet.master import wheel_release
from decnet.threads import pool_runner
from decnet.updater.deps import DepsStore
from decnet.updater.installer import DEPS_PTH, Installer
from tests.support import REPO_ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(wheelhouse):
    release = wheel_release.prepare(REPO_ROOT, wheelhouse)
    yield release
    release.remove()


def test_the_decnet_wheel_is_built_once_reproducibly_and_outside_the_checkout(built, wheelhouse):
    before = sorted(p.name for p in REPO_ROOT.iterdir())
    again = wheel_release.prepare(REPO_ROOT, wheelhouse)
    assert sorted(p.name for p in REPO_ROOT.iterdir()) == before  # nothing built in place
    try:
        assert again.release_id == built.release_id
        assert again.manifest.decnet.sha256 == built.manifest.decnet.sha256
    finally:
        again.remove()
    names = zipfile.ZipFile(built.paths[built.manifest.decnet.file]).namelist()
    assert "twisted/plugins/decnet_plugins.py" in names and "decnet/updater/deps.py" in names
    assert not any(
        n.startswith(("tests/", "twisted/__init__", "twisted/plugins/__init__")) for n in names
    )
    assert built.manifest.build["source"] == "checkout"
    assert {w.name.lower() for w in built.manifest.deps} >= {"twisted", "klein", "treq"}


def test_a_release_of_unchanged_dependencies_is_under_one_mebibyte(built):
    only_decnet = built.tarball_for([])
    assert only_decnet.release_id == built.release_id
    assert only_decnet.size < 1024 * 1024
    everything = built.tarball_for(built.manifest.deps)
    assert everything.release_id == built.release_id and everything.size > only_decnet.size


def test_the_installed_distribution_repacks_into_an_installable_wheel(tmp_path, built):
    """A master installed from a wheel has no checkout: ``update`` repacks what is installed."""
    venv = tmp_path / "master-venv"
    subprocess.run(["python3", "-m", "venv", "--without-pip", str(venv)], check=True)
    wheel = built.paths[built.manifest.decnet.file]
    pip = [str(REPO_ROOT / ".venv" / "bin" / "python"), "-m", "pip", "--python"]
    subprocess.run(
        [
            *pip,
            str(venv / "bin" / "python"),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        check=True,
    )
    script = (
        "import sys, pathlib\n"
        "from decnet.master import wheel_release\n"
        "out = pathlib.Path(sys.argv[1])\n"
        "print(wheel_release.wheel_from_installed(out))\n"
    )
    # The dependencies from the test venv, *after* the master venv's own site-packages (a plain
    # path line: the test venv's editable install of the checkout is not activated).
    site = next((REPO_ROOT / ".venv").glob("lib/python*/site-packages"))
    own = next(venv.glob("lib/python*/site-packages"))
    (own / "zz-test-deps.pth").write_text(f"{site}\n")
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    path = done.stdout.strip()
    repacked = zipfile.ZipFile(path).namelist()
    original = zipfile.ZipFile(wheel).namelist()
    assert sorted(n for n in repacked if not n.endswith("RECORD")) == sorted(
        n for n in original if not n.endswith("RECORD")
    )


@pytest_twisted.ensureDeferred
async def test_two_releases_share_one_read_only_environment_and_each_runs_its_own_code(
    tmp_path, built
):
    deps = DepsStore(tmp_path / "install")
    installer = Installer(reactor, compile_bytecode=False, to_thread=pool_runner(reactor))
    wheels = []
    for wheel in built.manifest.deps:
        source = tmp_path / wheel.file
        source.write_bytes(built.paths[wheel.file].read_bytes())
        wheels.append(deps.store_wheel(source, wheel))
    env = built.manifest.deps_id
    env_dir = deps.begin_env(env)
    await installer.build_deps(env_dir, wheels)
    deps.finish_env(env, built.manifest.deps)
    assert deps.is_complete(env)

    decnet_wheel = built.paths[built.manifest.decnet.file]
    compiling = Installer(reactor, to_thread=pool_runner(reactor))
    outputs = []
    previous = None
    for name in ("r1", "r2"):
        release_dir = tmp_path / name
        release_dir.mkdir()
        outputs.append(
            await compiling.install_wheel(
                release_dir,
                deps.site_packages(env),
                env_dir / "bin",
                decnet_wheel,
                with_pip=False,
                previous=previous,
            )
        )
        previous = next((release_dir / "venv").glob("lib/python*/site-packages"))
        python = release_dir / config.RELEASE_VENV_DIR / "bin" / "python"
        where = subprocess.run(
            [
                str(python),
                "-c",
                "import decnet, twisted, klein; print(decnet.__file__, twisted.__file__)",
            ],
            check=True,
            capture_output=True,
            text=True,
            cwd=tmp_path,  # not the checkout: "" on sys.path would import it
        ).stdout.split()
        assert where[0].startswith(str(release_dir))  # the release's own code
        assert where[1].startswith(str(env_dir))  # the shared dependencies
        twistd = release_dir / config.RELEASE_VENV_DIR / "bin" / "twistd"
        assert twistd.read_text().startswith(f"#!{python}")
        helped = subprocess.run(
            [str(twistd), "--help"], capture_output=True, text=True, cwd=tmp_path
        )
        assert "decnet-agent" in helped.stdout
        pth = next((release_dir / "venv").glob(f"lib/python*/site-packages/{DEPS_PTH}"))
        assert str(deps.site_packages(env)) in pth.read_text()
    # The first release was compiled by a child interpreter; the second, the same wheel,
    # carried all of its byte code and its plugin cache over and needed no child.
    assert "$ " in outputs[0] and "byte code" not in outputs[0]
    assert "$ " not in outputs[1] and "compiled 0 file(s) in process" in outputs[1]
    assert "to compile; plugin cache carried" in outputs[1]
    stamps = {p: p.stat().st_mtime_ns for p in previous.rglob("*.pyc")}
    stamps[previous / "twisted" / "plugins" / "dropin.cache"] = 0
    stamps = {p: p.stat().st_mtime_ns for p in stamps}
    assert len(stamps) > 100
    writing = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run(
        [str(python), "-c", "import decnet.agent.service, decnet.updater.service"],
        check=True,
        cwd=tmp_path,
        env=writing,  # a pyc the interpreter found stale would be written again
    )
    helped = subprocess.run([str(twistd), "--help"], capture_output=True, cwd=tmp_path, env=writing)
    assert b"decnet-agent" in helped.stdout
    # Nothing was compiled or cached again by what ran: the carried files were used.
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # Nothing the releases ran wrote into the environment.
    assert deps.is_complete(env) and (env_dir / "lib").stat().st_mode & 0o222 == 0
