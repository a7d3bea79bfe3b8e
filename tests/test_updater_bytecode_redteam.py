"""Attacks on the byte code carried over from the release in use (decnet.updater.bytecode):
what the carry got wrong, each shown against the release it builds."""

import py_compile
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor

from decnet.updater.bytecode import carry_over, compile_files
from decnet.updater.installer import Installer, create_venv, site_packages
from tests.test_updater_wheelinstall import make_wheel


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


PLUGIN = (
    "from zope.interface import provider\n"
    "from twisted.plugin import IPlugin\n"
    "@provider(IPlugin)\nclass {name}:\n    pass\n"
)
LIST_PLUGINS = (
    "import sys; sys.path.insert(0, sys.argv[1])\n"
    "from twisted.plugin import IPlugin, getPlugins\n"
    "print(sorted(p.__name__ for p in getPlugins(IPlugin) if 'Probe' in repr(p)))\n"
)


def plugins_of(site: Path) -> str:
    run = [sys.executable, "-c", LIST_PLUGINS, str(site)]
    return subprocess.run(run, check=True, capture_output=True, text=True).stdout.strip()


def test_a_changed_sourceless_plugin_module_is_not_hidden_by_a_carried_plugin_cache(tmp_path):
    """Twisted's plugin modules in ``twisted/plugins`` are the ``*.py`` *and* the ``*.pyc``
    files there (``twisted.python.modules.PYTHON_EXTENSIONS``; a package keeps its own cache
    in its own directory).  The carry compared the ``*.py`` files only, carried the cache and
    stamped it newer than every module: Twisted then trusts it for a sourceless module whose
    code changed, lists the plugin that is gone and never finds the new one."""
    old, new = tmp_path / "old", tmp_path / "new"
    for site, name in ((old, "ProbeOld"), (new, "ProbeNew")):
        write(site / "twisted" / "plugins" / "decnet_probe.py", PLUGIN.format(name="ProbeSame"))
        source = write(tmp_path / name / "legacy.py", PLUGIN.format(name=name))
        py_compile.compile(str(source), cfile=str(site / "twisted" / "plugins" / "legacy.pyc"))
    assert plugins_of(old) == "['ProbeOld', 'ProbeSame']"  # builds the old release's cache
    carried = carry_over(new, old)
    assert plugins_of(new) == "['ProbeNew', 'ProbeSame']"
    assert not carried.plugin_cache


# Run in a child under an address-space limit: a 4 GiB file must never be read whole.
READ_UNDER_LIMIT = textwrap.dedent(
    """
    import resource, sys
    from pathlib import Path
    from decnet.updater.bytecode import carry_over
    limit = int(sys.argv[3])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    carried = carry_over(Path(sys.argv[1]), Path(sys.argv[2]))
    print(carried.reused, len(carried.stale))
    """
)


def test_a_huge_file_in_the_new_release_is_never_read_whole_into_the_updater(tmp_path):
    """A wheel member can be a zip bomb: a few MiB of wheel that unpack into gigabytes.  The
    carry read the new file and the old one whole to compare them, in the updater's own
    process (the daemon that rolls back), even when their sizes already differ."""
    old, new = tmp_path / "old", tmp_path / "new"
    for site in (old, new):
        write(site / "pkg" / "__init__.py", "")
        write(site / "pkg" / "same.py", "A = 1\n")
    compile_files(sorted(old.rglob("*.py")))
    with open(new / "pkg" / "same.py", "r+b") as fh:
        fh.truncate(4 << 30)  # sparse: no disk, but 4 GiB to whoever reads it
    ru = resource.getrusage(resource.RUSAGE_SELF)  # only to size the limit sensibly
    limit = max(1 << 30, ru.ru_maxrss * 1024 * 4)
    done = subprocess.run(
        [sys.executable, "-c", READ_UNDER_LIMIT, str(new), str(old), str(limit)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-400:]
    assert done.stdout.split() == ["1", "1"]  # __init__ carried, the huge one left to compile


@pytest_twisted.ensureDeferred
async def test_a_large_changed_file_is_compiled_by_the_child_not_in_the_updater(tmp_path):
    """A release venv with at most 16 files to compile compiled them in the updater's
    thread, whatever their size: compiling holds the GIL (about 1 s per 3 MiB of source),
    so the updater's reactor (its API, the health checks, the rollback timers) stood still
    for as long, with no install timeout and at normal priority.  The child that did it
    before runs niced, under the timeout, in its own process.  Above a small budget of
    bytes, the child compiles."""
    deps = tmp_path / "deps"
    create_venv(deps)
    # A stand-in Twisted for the child's plugin-cache step (the real one is not in this venv).
    write(site_packages(deps) / "twisted" / "__init__.py", "")
    write(
        site_packages(deps) / "twisted" / "plugin.py",
        "IPlugin = None\ndef getPlugins(interface):\n    return []\n",
    )
    old = tmp_path / "old"
    old_files = {
        "demo/__init__.py": b"",
        "demo/table.py": b"TABLE = [\n" + b"    (1, 2, 3),\n" * 10 + b"]\n",
        "twisted/plugins/demo_plugins.py": b"# declarations only\n",
    }
    for name, data in old_files.items():
        (old / name).parent.mkdir(parents=True, exist_ok=True)
        (old / name).write_bytes(data)
    compile_files(sorted(old.rglob("*.py")))
    (old / "twisted" / "plugins" / "dropin.cache").write_bytes(b"cache")
    big = b"TABLE = [\n" + b"    (1, 2, 3),\n" * 300_000 + b"]\n"  # 4.5 MB of generated data
    wheel = make_wheel(tmp_path / "demo-1.0-py3-none-any.whl", {**old_files, "demo/table.py": big})
    release = tmp_path / "release"
    release.mkdir()
    installer = Installer(reactor)
    output = await installer.install_wheel(
        release, site_packages(deps), deps / "bin", wheel, with_pip=False, previous=old
    )
    assert "1 to compile; plugin cache carried" in output
    assert "in process" not in output and "$ " in output  # the child compiled it
    site = site_packages(release / "venv")
    assert list((site / "demo" / "__pycache__").glob("table.*.pyc"))
