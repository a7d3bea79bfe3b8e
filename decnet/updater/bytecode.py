"""Byte code carried over from the release before, for the files that did not change.

A release usually changes a handful of decnet's files, and a new dependency set
usually keeps most of the old one's.  Byte-compiling everything again costs a
second of CPU per host (half a second for decnet alone, more for the plugin
cache's imports), which is most of an unchanged-dependencies update.

Python's default ``.pyc`` (PEP 552, "timestamp" based) starts with a 16-byte
header: the interpreter's magic number, flags 0, and the source's modification
time and size; the import system uses it when both of those match.  For a
source file whose bytes equal the same file in the previous environment, whose
``.pyc`` there is valid, :func:`carry_over` writes that ``.pyc`` with the
header's time and size replaced by the new file's own.  The code object inside
names the old path; the import system corrects ``co_filename`` to the file it
loaded (``_imp._fix_co_filename``), so tracebacks show the new one.

Twisted's plugin cache (``twisted/plugins/dropin.cache``) is carried the same
way when every plugin module is unchanged: it holds module and plugin names and
descriptions, no paths, and it is used while it is newer than every module.

Anything not carried over is left for the caller to compile; nothing here is
ever trusted from the new release: only files from the previous environment,
which the updater wrote itself, are copied, and only onto identical sources.
Blocking (file reads and writes): run in a thread.
"""

from __future__ import annotations

import importlib.util
import os
import py_compile
import shutil
import stat
import struct
import time
from pathlib import Path

import attrs

HEADER = struct.Struct("<4sIII")  # magic, flags, source mtime, source size
PLUGINS_DIR = Path("twisted", "plugins")
PLUGIN_CACHE = "dropin.cache"
_CHUNK = 1 << 20


def retarget(pyc: bytes, *, magic: bytes, old: os.stat_result, new: os.stat_result) -> bytes | None:
    """``pyc`` (valid for a source with stat ``old``) made valid for ``new``; ``None`` when
    ``pyc`` is not a timestamp ``.pyc`` of this interpreter matching ``old``."""
    if len(pyc) < HEADER.size:
        return None
    found_magic, flags, mtime, size = HEADER.unpack_from(pyc)
    if found_magic != magic or flags != 0:
        return None
    if mtime != _u32(int(old.st_mtime)) or size != _u32(old.st_size):
        return None
    return HEADER.pack(magic, 0, _u32(int(new.st_mtime)), _u32(new.st_size)) + pyc[HEADER.size :]


def _u32(value: int) -> int:
    return value & 0xFFFF_FFFF


@attrs.frozen
class Carried:
    """What :func:`carry_over` did: ``.pyc`` files written, sources still to compile, and
    whether the plugin cache was carried."""

    reused: int
    stale: tuple[Path, ...]
    plugin_cache: bool
    stale_bytes: int = 0  # the size of the sources still to compile, together

    def describe(self, site: Path) -> str:
        cache = "carried" if self.plugin_cache else "to build"
        return (
            f"byte code of {self.reused} unchanged file(s) carried over into {site}; "
            f"{len(self.stale)} to compile; plugin cache {cache}"
        )


def sources(site: Path) -> list[Path]:
    """Every regular ``.py`` file below ``site`` (relative paths), symlinks not followed."""
    found = []
    for top, dirs, files in os.walk(site):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            path = Path(top, name)
            if name.endswith(".py") and not path.is_symlink():
                found.append(path.relative_to(site))
    return sorted(found)


def _same_bytes(a: Path, b: Path) -> bool:
    """Whether two regular files hold the same bytes: sizes first, then a chunk at a time
    (a new release's file may be gigabytes: never read whole into the updater)."""
    try:
        with open(a, "rb") as fa, open(b, "rb") as fb:
            sa, sb = os.fstat(fa.fileno()), os.fstat(fb.fileno())
            if not (stat.S_ISREG(sa.st_mode) and stat.S_ISREG(sb.st_mode)):
                return False
            if sa.st_size != sb.st_size:
                return False
            while True:
                chunk = fa.read(_CHUNK)
                if chunk != fb.read(_CHUNK):
                    return False
                if not chunk:
                    return True
    except OSError:
        return False


def _carry_one(rel: Path, site: Path, previous: Path, magic: bytes) -> bool:
    new_py, old_py = site / rel, previous / rel
    if old_py.is_symlink() or not _same_bytes(new_py, old_py):
        return False
    old_pyc = Path(importlib.util.cache_from_source(str(old_py)))
    try:
        pyc = retarget(old_pyc.read_bytes(), magic=magic, old=old_py.stat(), new=new_py.stat())
    except OSError:
        return False
    if pyc is None:
        return False
    new_pyc = Path(importlib.util.cache_from_source(str(new_py)))
    new_pyc.parent.mkdir(exist_ok=True)
    new_pyc.write_bytes(pyc)
    return True


def _plugin_modules(directory: Path) -> list[str] | None:
    """The names of the files directly in ``directory`` but the cache, sorted: the plugin
    modules its cache describes are its ``.py`` *and* ``.pyc`` files (Twisted's
    ``PYTHON_EXTENSIONS``; a package keeps a cache of its own, in its own directory).
    ``None`` when one of them is a symlink or not a regular file."""
    names = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name == PLUGIN_CACHE or entry.is_dir(follow_symlinks=False):
                continue
            if not entry.is_file(follow_symlinks=False):
                return None
            names.append(entry.name)
    return sorted(names)


def _carry_plugin_cache(site: Path, previous: Path) -> bool:
    """Copy ``twisted/plugins/dropin.cache`` when the plugin modules are the same files."""
    new_dir, old_dir = site / PLUGINS_DIR, previous / PLUGINS_DIR
    old_cache = old_dir / PLUGIN_CACHE
    if not new_dir.is_dir() or not old_cache.is_file() or old_cache.is_symlink():
        return False
    modules = _plugin_modules(new_dir)
    if modules is None or modules != _plugin_modules(old_dir):
        return False
    if not all(_same_bytes(new_dir / m, old_dir / m) for m in modules):
        return False
    cache = new_dir / PLUGIN_CACHE
    shutil.copyfile(old_cache, cache)
    # Twisted rebuilds a cache that is not newer than every module (mtime >=).
    newest = max((os.stat(new_dir / m).st_mtime_ns for m in modules), default=0)
    stamp = max(time.time_ns(), newest + 1_000_000)
    os.utime(cache, ns=(stamp, stamp))
    return True


def carry_over(site: Path, previous: Path | None) -> Carried:
    """Carry byte code from ``previous`` (a site-packages) into ``site`` for unchanged
    sources (:func:`retarget`), then the plugin cache.  Blocking."""
    site = Path(site)
    files = sources(site)
    if previous is None or not Path(previous).is_dir():
        stale = [site / rel for rel in files]
        return Carried(0, tuple(stale), False, _total_size(stale))
    previous = Path(previous)
    magic = importlib.util.MAGIC_NUMBER
    stale = []
    reused = 0
    for rel in files:
        if _carry_one(rel, site, previous, magic):
            reused += 1
        else:
            stale.append(site / rel)
    cache = _carry_plugin_cache(site, previous)
    return Carried(reused, tuple(stale), cache, _total_size(stale))


def _total_size(paths: list[Path]) -> int:
    total = 0
    for path in paths:
        try:
            total += path.stat().st_size
        except OSError:
            pass
    return total


def compile_files(paths: tuple[Path, ...] | list[Path]) -> str:
    """Byte-compile ``paths`` with this interpreter (as ``compileall`` would: a file that
    does not compile is reported, not fatal).  Blocking."""
    failed = []
    for path in paths:
        try:
            py_compile.compile(str(path), doraise=True)
        except py_compile.PyCompileError as exc:
            failed.append(f"{path}: {exc.msg.strip()}")
    lines = [f"compiled {len(paths) - len(failed)} file(s) in process"]
    return "\n".join([*lines, *failed])
