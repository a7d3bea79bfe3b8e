"""A real, offline pip install of a small release into its own virtualenv."""

import io
import json
import subprocess

import pytest
import pytest_twisted
from twisted.internet import reactor

from decnet import config
from decnet.errors import InstallFailed
from decnet.updater import archive
from decnet.updater.installer import Installer
from tests.support import make_tarball

pytestmark = pytest.mark.slow

SETUP_CFG = b"""\
[metadata]
name = tinyrelease
version = 1.2.3

[options]
packages = tinyrelease
install_requires = {requires}

[options.entry_points]
console_scripts =
    tinyrelease = tinyrelease:main
"""
PYPROJECT = b'[build-system]\nrequires = ["setuptools>=64", "wheel"]\n'
MODULE = b"def main():\n    print('tiny release says hi')\n"


def tiny_release(wheelhouse, requires: str = "") -> bytes:
    wheels = [
        (f"wheelhouse/{p.name}", p.read_bytes())
        for p in sorted(wheelhouse.glob("*.whl"))
        if p.name.startswith(("setuptools-", "wheel-", "packaging-"))
    ]
    return make_tarball(
        [
            ("setup.cfg", SETUP_CFG.replace(b"{requires}", requires.encode())),
            ("pyproject.toml", PYPROJECT),
            ("tinyrelease/__init__.py", MODULE),
            *wheels,
        ]
    )


def extract_release(tmp_path, data: bytes):
    release_dir = tmp_path / "releases" / "0123456789abcdef"
    release_dir.mkdir(parents=True)
    summary = archive.extract(io.BytesIO(data), release_dir / config.RELEASE_SRC_DIR)
    assert summary.has_wheelhouse
    return release_dir


@pytest_twisted.ensureDeferred
async def test_a_release_installs_offline_into_its_own_venv(tmp_path, wheelhouse):
    release_dir = extract_release(tmp_path, tiny_release(wheelhouse))
    installer = Installer(reactor, compile_bytecode=False)
    commands = installer.commands(release_dir)
    assert [label for label, _ in commands] == [
        "create the venv",
        "pip install",
        "build the plugin cache",
    ]
    assert "--no-index" in commands[1][1] and "--find-links" in commands[1][1]
    output = await installer.install(release_dir)
    assert "Successfully installed tinyrelease-1.2.3" in output
    venv = release_dir / config.RELEASE_VENV_DIR
    said = subprocess.run([str(venv / "bin" / "tinyrelease")], capture_output=True, text=True)
    assert said.stdout.strip() == "tiny release says hi"
    # Its own environment: the updater's packages are not visible in it.
    probe = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import sys, importlib.util as u; "
            "print(sys.prefix, u.find_spec('twisted') is not None)",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # not the checkout: its twisted/plugins would look like a package
    )
    prefix, sees_twisted = probe.stdout.split()
    assert prefix == str(venv) and sees_twisted == "False"
    # decnet.release finds release.json next to the venv once it is written.
    (release_dir / "release.json").write_text(json.dumps({"id": release_dir.name}))
    from decnet.release import release_info

    assert release_info(venv)["id"] == release_dir.name


PLUGIN_SETUP_CFG = b"""\
[metadata]
name = tinyplugin
version = 1.0

[options]
packages =
    tinyplugin
    twisted.plugins
install_requires = twisted
"""
PLUGIN = b"""\
from twisted.application.service import ServiceMaker

tiny = ServiceMaker("tiny", "tinyplugin", "a plugin of a tiny release", "tiny-daemon")
"""
TWISTED_AND_ITS_DEPENDENCIES = (
    "setuptools-", "wheel-", "packaging-", "twisted-", "attrs-", "automat-", "constantly-",
    "hyperlink-", "idna-", "incremental-", "typing_extensions-", "zope_interface-",
)  # fmt: skip


@pytest_twisted.ensureDeferred
async def test_the_release_venv_holds_a_fresh_plugin_cache_its_daemons_need_not_write(
    tmp_path, wheelhouse
):
    """The agent and the forwarder run from a release as users that cannot write it, so
    the updater (the venv's owner) builds Twisted's dropin.cache at install time: a later
    ``twistd`` finds the release's plugin in it and has nothing to rewrite."""
    wheels = [
        (f"wheelhouse/{p.name}", p.read_bytes())
        for p in sorted(wheelhouse.glob("*.whl"))
        if p.name.startswith(TWISTED_AND_ITS_DEPENDENCIES)
    ]
    data = make_tarball(
        [
            ("setup.cfg", PLUGIN_SETUP_CFG),
            ("pyproject.toml", PYPROJECT),
            ("tinyplugin/__init__.py", b""),
            ("twisted/plugins/tinyplugin_plugins.py", PLUGIN),
            *wheels,
        ]
    )
    release_dir = extract_release(tmp_path, data)
    await Installer(reactor, compile_bytecode=False).install(release_dir)
    venv = release_dir / config.RELEASE_VENV_DIR
    [cache] = venv.glob("lib/python*/site-packages/twisted/plugins/dropin.cache")
    built = cache.stat().st_mtime_ns
    listed = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "from twisted.plugin import IPlugin, getPlugins; "
            "print(sorted(getattr(p, 'tapname', '') for p in getPlugins(IPlugin)))",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert "'tiny-daemon'" in listed.stdout, listed.stderr
    assert cache.stat().st_mtime_ns == built  # up to date: a reader never needs to write it


@pytest_twisted.ensureDeferred
async def test_a_dependency_missing_from_the_wheelhouse_fails_with_pips_output(
    tmp_path, wheelhouse
):
    data = tiny_release(wheelhouse, requires="definitely-not-in-the-wheelhouse")
    release_dir = extract_release(tmp_path, data)
    with pytest.raises(InstallFailed) as info:
        await Installer(reactor, compile_bytecode=False).install(release_dir)
    assert "definitely-not-in-the-wheelhouse" in info.value.details["output"]["install"]
    assert "pip install failed" in str(info.value)
