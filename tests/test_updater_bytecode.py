"""Byte code carried over from the release in use (decnet.updater.bytecode)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from decnet.updater.bytecode import HEADER, carry_over, compile_files, retarget

MAGIC = importlib.util.MAGIC_NUMBER


def stat(mtime: int, size: int) -> os.stat_result:
    return os.stat_result((0o644, 0, 0, 1, 0, 0, size, mtime, mtime, mtime))


def pyc_of(path: Path) -> Path:
    return Path(importlib.util.cache_from_source(str(path)))


def write(path: Path, text: str, mtime: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def test_retarget_rewrites_only_the_source_time_and_size():
    body = b"\xe3marshalled code"
    old = HEADER.pack(MAGIC, 0, 1_700_000_000, 42) + body
    new = retarget(old, magic=MAGIC, old=stat(1_700_000_000, 42), new=stat(1_800_000_000, 42))
    assert new == MAGIC + b"\0\0\0\0" + (1_800_000_000).to_bytes(4, "little") + b"*\0\0\0" + body


@pytest.mark.parametrize(
    "pyc",
    [
        b"",
        MAGIC + b"\0" * 8,  # short header
        HEADER.pack(b"\x00\x0d\r\n", 0, 1_700_000_000, 42) + b"x",  # another interpreter
        HEADER.pack(MAGIC, 1, 1_700_000_000, 42) + b"x",  # a hash-based pyc
        HEADER.pack(MAGIC, 0, 1_700_000_001, 42) + b"x",  # stale: the source changed after
        HEADER.pack(MAGIC, 0, 1_700_000_000, 43) + b"x",
    ],
)
def test_retarget_refuses_what_the_import_system_would_not_use(pyc):
    assert retarget(pyc, magic=MAGIC, old=stat(1_700_000_000, 42), new=stat(1, 42)) is None


def test_retarget_wraps_times_and_sizes_like_the_import_system():
    big = 2**32 + 5
    pyc = HEADER.pack(MAGIC, 0, 5, 5) + b"x"
    assert retarget(pyc, magic=MAGIC, old=stat(big, big), new=stat(big + 1, 7)) == (
        HEADER.pack(MAGIC, 0, 6, 7) + b"x"
    )


@pytest.fixture
def two_sites(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    for site, changed in ((old, "A = 1\n"), (new, "A = 2\n")):
        write(site / "pkg" / "__init__.py", "", 1_600_000_000 if site == old else None)
        write(site / "pkg" / "same.py", "def f():\n    raise ValueError('here')\n")
        write(site / "pkg" / "changed.py", changed)
        write(site / "twisted" / "plugins" / "mine.py", "PLUGIN = 1\n")
    write(new / "pkg" / "added.py", "B = 1\n")
    write(old / "pkg" / "stale.py", "C = 1\n")
    write(new / "pkg" / "stale.py", "C = 1\n")
    compile_files(sorted(old.rglob("*.py")))
    write(old / "pkg" / "stale.py", "C = 1\n", mtime=1_000)  # its pyc no longer matches
    write(old / "twisted" / "plugins" / "dropin.cache", "cache")
    return old, new


def test_unchanged_files_get_a_pyc_the_import_system_accepts_and_the_rest_is_left_to_compile(
    two_sites,
):
    old, new = two_sites
    carried = carry_over(new, old)
    assert carried.reused == 3  # __init__, same, twisted/plugins/mine
    assert sorted(p.relative_to(new).as_posix() for p in carried.stale) == [
        "pkg/added.py",
        "pkg/changed.py",
        "pkg/stale.py",
    ]
    for name in ("__init__.py", "same.py"):
        pyc = pyc_of(new / "pkg" / name).read_bytes()
        st = (new / "pkg" / name).stat()
        assert pyc[:16] == HEADER.pack(MAGIC, 0, int(st.st_mtime), st.st_size)
        assert pyc[16:] == pyc_of(old / "pkg" / name).read_bytes()[16:]
    assert not pyc_of(new / "pkg" / "changed.py").exists()
    assert carried.plugin_cache
    assert (new / "twisted" / "plugins" / "dropin.cache").read_text() == "cache"
    # The interpreter uses the carried pyc, and reports the new path in tracebacks.
    compile_files(carried.stale)
    probe = (
        "import sys, traceback; sys.path.insert(0, sys.argv[1]); import pkg.same as m\n"
        "print(m.__cached__)\n"
        "try:\n    m.f()\nexcept ValueError as e:\n"
        "    print(traceback.extract_tb(e.__traceback__)[-1].filename)\n"
    )
    before = {p: p.stat().st_mtime_ns for p in new.rglob("*.pyc")}
    writing = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    out = subprocess.run(
        [sys.executable, "-c", probe, str(new)],
        capture_output=True,
        text=True,
        check=True,
        env=writing,  # a pyc the interpreter found stale would be written again
    ).stdout.split()
    assert out == [str(pyc_of(new / "pkg" / "same.py")), str(new / "pkg" / "same.py")]
    assert {p: p.stat().st_mtime_ns for p in new.rglob("*.pyc")} == before  # none rewritten


def test_a_changed_plugin_module_means_the_plugin_cache_is_built_again(two_sites):
    old, new = two_sites
    write(new / "twisted" / "plugins" / "mine.py", "PLUGIN = 2\n")
    assert not carry_over(new, old).plugin_cache
    assert not (new / "twisted" / "plugins" / "dropin.cache").exists()


def test_an_added_plugin_module_means_the_plugin_cache_is_built_again(two_sites):
    old, new = two_sites
    write(new / "twisted" / "plugins" / "other.py", "PLUGIN = 3\n")
    assert not carry_over(new, old).plugin_cache


def test_nothing_is_read_through_a_symlink_of_the_old_release(two_sites, tmp_path):
    old, new = two_sites
    elsewhere = write(tmp_path / "elsewhere.py", "def f():\n    raise ValueError('here')\n")
    (old / "pkg" / "same.py").unlink()
    (old / "pkg" / "same.py").symlink_to(elsewhere)
    carried = carry_over(new, old)
    assert new / "pkg" / "same.py" in carried.stale


def test_without_a_release_in_use_everything_is_left_to_compile(two_sites, tmp_path):
    _, new = two_sites
    for previous in (None, tmp_path / "missing"):
        carried = carry_over(new, previous)
        assert carried.reused == 0 and not carried.plugin_cache
        assert len(carried.stale) == len(list(new.rglob("*.py")))


def test_the_carried_plugin_cache_is_the_one_twisted_uses(tmp_path):
    """Twisted keeps a cache that is newer than every plugin module; it rewrites one it
    finds stale, so an unchanged cache file proves it was used."""
    old, new = tmp_path / "old", tmp_path / "new"
    plugin = (
        "from zope.interface import provider\n"
        "from twisted.plugin import IPlugin\n"
        "@provider(IPlugin)\nclass Mine:\n    pass\n"
    )
    for site in (old, new):
        write(site / "twisted" / "plugins" / "decnet_probe.py", plugin)
    build = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from twisted.plugin import IPlugin, getPlugins\n"
        "print(sorted(p.__name__ for p in getPlugins(IPlugin) if 'Mine' in repr(p)))\n"
    )
    run = [sys.executable, "-c", build]
    subprocess.run([*run, str(old)], check=True, capture_output=True)
    assert carry_over(new, old).plugin_cache
    cache = new / "twisted" / "plugins" / "dropin.cache"
    before = (cache.read_bytes(), cache.stat().st_mtime_ns)
    out = subprocess.run([*run, str(new)], check=True, capture_output=True, text=True).stdout
    assert "Mine" in out
    assert (cache.read_bytes(), cache.stat().st_mtime_ns) == before


def test_a_file_that_does_not_compile_is_reported_not_fatal(tmp_path):
    good = write(tmp_path / "good.py", "A = 1\n")
    bad = write(tmp_path / "bad.py", "def (:\n")
    out = compile_files([good, bad])
    assert out.splitlines()[0] == "compiled 1 file(s) in process"
    assert str(bad) in out and pyc_of(good).is_file() and not pyc_of(bad).exists()
