"""Installing a wheel by unpacking it into ``site-packages``, as pip does, without pip.

A wheel is a zip archive with a ``.dist-info`` directory; installing one
(PEP 427 / the binary distribution format) means: copy its members into
``site-packages`` (``<name>.data/purelib`` and ``platlib`` there too), write a
console script for each ``console_scripts`` entry point, mark it ``INSTALLER``
and extend ``RECORD``.  Starting pip for it costs about a CPU-second per run
(its own imports and resolver set-up), most of a release on an existing
dependency environment; unpacking costs a few milliseconds per wheel.

:func:`plan_wheel` is pure: from the member names, ``WHEEL`` and
``entry_points.txt`` it decides where each member goes, and refuses what is
unsafe (an absolute name, ``..``, a backslash, a duplicate) with
:class:`~decnet.errors.WheelRefused`.  What this module does not do
(``<name>.data/scripts``, ``headers`` or ``data``, a ``Wheel-Version`` other
than 1.x, a file two wheels both ship) raises
:class:`~decnet.errors.WheelUnsupported`: the installer then uses pip for
that environment.  :func:`unpack_wheel` is the blocking executor: every file
is created with ``O_EXCL | O_NOFOLLOW`` in directories it made, and checked
against the sha256 its ``RECORD`` lists while it is written.

Byte-compiling is not done here: the installer runs :data:`FINISH_SCRIPT`
with the environment's own interpreter (``compileall`` with workers, then
Twisted's plugin cache) in one child process.
"""

from __future__ import annotations

import base64
import configparser
import csv
import hashlib
import io
import os
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path

import attrs

from decnet.errors import WheelRefused, WheelUnsupported

INSTALLER_NAME = "decnet-updater"
_CHUNK = 256 * 1024
_SCRIPT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_SITE_DATA = ("purelib", "platlib")

# pip's console-script template (pip 26: pip._internal.operations.install.wheel).
SCRIPT_TEMPLATE = (
    "import sys\n"
    "from {module} import {head}\n"
    "if __name__ == '__main__':\n"
    "    sys.argv[0] = sys.argv[0].removesuffix('.exe')\n"
    "    sys.exit({call}())\n"
)

# Run by the environment's own interpreter: argv[1] the site-packages to compile ("" for
# none), argv[2] the number of compile workers, argv[3] a regex of paths not to compile ("" for
# none).  Compile errors are printed, never fatal (pip ignores them too).  Then Twisted's
# plugin cache, when there is a Twisted.  At a lower priority (nice 10): the decoys, the
# agents starting on a release and the updaters answering come first.
FINISH_SCRIPT = (
    "import compileall, importlib.util, os, re, sys\n"
    "os.nice(10)\n"
    "if sys.argv[1]:\n"
    "    skip = re.compile(sys.argv[3]) if sys.argv[3] else None\n"
    "    compileall.compile_dir(sys.argv[1], quiet=1, workers=int(sys.argv[2]), rx=skip)\n"
    "if importlib.util.find_spec('twisted') is not None:\n"
    "    from twisted.plugin import IPlugin, getPlugins\n"
    "    list(getPlugins(IPlugin))\n"
)


def suite_dirs_pattern(site: Path | str) -> str:
    """The paths below ``site`` inside a ``test`` or ``tests`` directory (a regex).

    The dependencies' own test suites (a third of Twisted's files) are never
    imported by a daemon; byte-compiling them would cost a second of CPU per
    dependency environment for nothing.
    """
    return re.escape(str(site)) + r"/(?:[^/]+/)*tests?/"


@attrs.frozen
class ConsoleScript:
    name: str
    module: str
    attr: str

    def text(self) -> str:
        head = self.attr.split(".")[0]
        return SCRIPT_TEMPLATE.format(module=self.module, head=head, call=self.attr)


@attrs.frozen
class WheelPlan:
    """Where each member of one wheel goes (relative to ``site-packages``)."""

    dist_info: str
    files: tuple[tuple[str, str], ...]  # (member name, target below site-packages)
    scripts: tuple[ConsoleScript, ...]


def _member_problem(name: str) -> str | None:
    if not name or "\x00" in name or "\\" in name:
        return "a NUL byte or a backslash"
    if name.startswith("/"):
        return "an absolute path"
    parts = name.rstrip("/").split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "an empty, '.' or '..' path component"
    return None


def _dist_info(names: Sequence[str]) -> str:
    tops = {n.split("/")[0] for n in names if n.count("/") == 1 and n.endswith(".dist-info/WHEEL")}
    if len(tops) != 1:
        raise WheelRefused(f"a wheel needs exactly one .dist-info/WHEEL, found {len(tops)}")
    return tops.pop()


def _target(name: str, data_dir: str) -> str:
    """Where member ``name`` goes below site-packages."""
    if not name.startswith(data_dir + "/"):
        return name
    kind, _, rest = name[len(data_dir) + 1 :].partition("/")
    if kind not in _SITE_DATA or not rest:
        raise WheelUnsupported(f"{name}: {data_dir}/{kind} is installed by pip only")
    return rest


def check_wheel_metadata(text: str) -> None:
    """``WHEEL`` must say ``Wheel-Version: 1.x``."""
    versions = [
        line.partition(":")[2].strip()
        for line in text.splitlines()
        if line.lower().startswith("wheel-version:")
    ]
    if len(versions) != 1 or not re.fullmatch(r"1\.\d+", versions[0]):
        raise WheelUnsupported(f"Wheel-Version {versions!r} is not 1.x")


def console_scripts(text: str | None) -> tuple[ConsoleScript, ...]:
    """The ``[console_scripts]`` of ``entry_points.txt``; an unsafe one is refused."""
    if not text:
        return ()
    parser = configparser.ConfigParser(delimiters=("=",), interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        parser.read_string(text)
    except configparser.Error as exc:
        raise WheelRefused(f"entry_points.txt does not parse: {exc}") from None
    if not parser.has_section("console_scripts"):
        return ()
    found = []
    for name, value in sorted(parser.items("console_scripts")):
        module, _, attr = value.partition(":")
        module, attr = module.strip(), attr.split("[")[0].strip()
        if not _SCRIPT_NAME.fullmatch(name) or not _DOTTED.fullmatch(module):
            raise WheelRefused(f"console script {name!r} = {value!r} is not a safe entry point")
        if not _DOTTED.fullmatch(attr):
            raise WheelRefused(f"console script {name!r} = {value!r} is not a safe entry point")
        found.append(ConsoleScript(name, module, attr))
    return tuple(found)


def plan_wheel(names: Sequence[str], wheel_text: str, entry_points: str | None) -> WheelPlan:
    """Where each member of a wheel with these member ``names`` goes."""
    seen: set[str] = set()
    for name in names:
        problem = _member_problem(name)
        if problem:
            raise WheelRefused(f"wheel member {name!r} has {problem}")
        if name in seen:
            raise WheelRefused(f"wheel member {name!r} appears twice")
        seen.add(name)
    check_wheel_metadata(wheel_text)
    dist_info = _dist_info(names)
    data_dir = dist_info[: -len(".dist-info")] + ".data"
    files = []
    targets: set[str] = set()
    for name in names:
        if name.endswith("/"):
            continue
        target = _target(name, data_dir)
        if target in targets:
            raise WheelRefused(f"two wheel members install as {target!r}")
        targets.add(target)
        files.append((name, target))
    return WheelPlan(dist_info, tuple(files), console_scripts(entry_points))


def parse_record(text: str) -> dict[str, str]:
    """``RECORD``: path -> ``sha256=<urlsafe b64>`` (rows without a hash are left out)."""
    hashes = {}
    for row in csv.reader(io.StringIO(text)):
        if len(row) >= 2 and row[1]:
            hashes[row[0]] = row[1]
    return hashes


def record_hash(digest: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


# pip's form for an interpreter path too long for a #! line (Linux truncates at 127 bytes).
SH_EXEC = b"#!/bin/sh\n" + b"'" * 3 + b'exec\' %s "$0" "$@"\n\' ' + b"'" * 3 + b"\n"
_MAX_SHEBANG = 127


def shebang(python: bytes) -> bytes:
    """The first line(s) of a console script run by ``python``, as pip writes them."""
    if len(python) + 2 <= _MAX_SHEBANG:
        return b"#!" + python + b"\n"
    return SH_EXEC % python


def script_bytes(python: bytes, script: ConsoleScript) -> bytes:
    return shebang(python) + script.text().encode()


def _open_new(path: Path, mode: int) -> int:
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    except FileExistsError:
        raise WheelUnsupported(f"{path} exists already (shipped by two wheels?)") from None


def _mkdirs(site: Path, relative: str, made: set[str]) -> None:
    parts = relative.split("/")[:-1]
    for i in range(1, len(parts) + 1):
        sub = "/".join(parts[:i])
        if sub in made:
            continue
        path = site / sub
        try:
            path.mkdir(mode=0o755)
        except FileExistsError:
            if path.is_symlink() or not path.is_dir():
                raise WheelRefused(f"{path} is not a directory") from None
        made.add(sub)


def _copy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path) -> str:
    executable = (info.external_attr >> 16) & 0o111
    fd = _open_new(target, 0o755 if executable else 0o644)
    digest = hashlib.sha256()
    with os.fdopen(fd, "wb") as out, zf.open(info) as src:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            out.write(chunk)
    return record_hash(digest.digest())


def unpack_wheel(wheel: Path, site: Path, bin_dir: Path, python: Path) -> WheelPlan:
    """Install ``wheel`` into ``site`` (scripts into ``bin_dir``, run by ``python``). Blocking.

    A member whose content does not match its ``RECORD`` hash is refused
    (:class:`WheelRefused`); the caller discards the half-written environment.
    """
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        infos = {i.filename: i for i in zf.infolist()}
        dist = _dist_info(names)
        entry = f"{dist}/entry_points.txt"
        plan = plan_wheel(
            names,
            zf.read(f"{dist}/WHEEL").decode("utf-8", "replace"),
            zf.read(entry).decode("utf-8", "replace") if entry in infos else None,
        )
        record_name = f"{plan.dist_info}/RECORD"
        if record_name not in infos:
            raise WheelRefused(f"{wheel.name} has no {record_name}")
        expected = parse_record(zf.read(record_name).decode("utf-8", "replace"))
        made: set[str] = set()
        rows: list[tuple[str, str, int]] = []
        for name, target in plan.files:
            if name == record_name:
                continue
            _mkdirs(site, target, made)
            got = _copy_member(zf, infos[name], site / target)
            if name in expected and expected[name] != got:
                raise WheelRefused(f"{wheel.name}: {name} does not match its RECORD hash")
            rows.append((target, got, infos[name].file_size))
    _finish_record(plan, site, bin_dir, python, rows)
    return plan


def _write_new(path: Path, data: bytes, mode: int) -> tuple[str, int]:
    """Create ``path`` with ``data``; its RECORD hash and size."""
    with os.fdopen(_open_new(path, mode), "wb") as out:
        out.write(data)
    return record_hash(hashlib.sha256(data).digest()), len(data)


def _finish_record(
    plan: WheelPlan, site: Path, bin_dir: Path, python: Path, rows: list[tuple[str, str, int]]
) -> None:
    """Write the console scripts, ``INSTALLER`` and the installed ``RECORD``."""
    bin_rel = os.path.relpath(bin_dir, site)
    for script in plan.scripts:
        body = script_bytes(str(python).encode(), script)
        rows.append((f"{bin_rel}/{script.name}", *_write_new(bin_dir / script.name, body, 0o755)))
    installer = f"{plan.dist_info}/INSTALLER"
    data = f"{INSTALLER_NAME}\n".encode()
    rows.append((installer, *_write_new(site / installer, data, 0o644)))
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    for row in sorted(rows):
        writer.writerow(row)
    writer.writerow((f"{plan.dist_info}/RECORD", "", ""))
    fd = _open_new(site / plan.dist_info / "RECORD", 0o644)
    with os.fdopen(fd, "w") as out:
        out.write(text.getvalue())
