"""Wheel releases on the master: one built wheel of DECNET, a manifest, the wheels a host lacks.

:func:`prepare` builds the release once per ``decnet-admin update``:

* the wheel of DECNET, either from a checkout (``--root``: the allow-listed
  tree of :mod:`decnet.master.tar_tree` is copied to a scratch directory and
  built there with setuptools, never in place) or, without ``--root`` on a
  master installed from a wheel, from the installed distribution itself
  (:func:`wheel_from_installed`: its files as ``RECORD`` lists them, repacked);
* the dependency set: every wheel of the wheelhouse but DECNET's own, each
  with its sha256 (:mod:`decnet.updater.manifest`).

Per host, :meth:`WheelRelease.tarball_for` writes the tarball a host gets:
``release.json``, the decnet wheel, and only the dependency wheels it lacks
(from its ``GET /wheels``).  Hosts lacking the same wheels share one tarball.
Every function blocks (hashing, zip, tar): callers run them in a thread or
before the reactor starts.
"""

from __future__ import annotations

import ast
import base64
import csv
import hashlib
import importlib.metadata
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorThreads
from twisted.python.failure import Failure

from decnet import config
from decnet.errors import ConfigError, DecnetError
from decnet.master import tar_tree, wheelhouse
from decnet.master.tar_tree import ReleaseArchive
from decnet.threads import run_in_pool
from decnet.updater.manifest import (
    Manifest,
    Wheel,
    make_manifest,
    missing_wheels,
    normal_name,
    wheel_of,
)

if TYPE_CHECKING:
    from decnet.master.updater_client import UpdaterClient

T = TypeVar("T")

OWN_DISTRIBUTION = wheelhouse.OWN_DISTRIBUTION
# Zip timestamps cannot go below 1980; the same tree gives the same wheel.
SOURCE_DATE_EPOCH = str(tar_tree.FIXED_MTIME)
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
BUILD_WHEEL_SCRIPT = (
    "import sys\nfrom setuptools import build_meta\nprint(build_meta.build_wheel(sys.argv[1]))\n"
)
_SKIPPED_DIST_FILES = ("INSTALLER", "REQUESTED", "direct_url.json", "RECORD")
TEMPLATE_FILE = "template.json"


@attrs.frozen
class WheelRelease:
    """A release built on the master: its manifest and where each of its wheels is."""

    manifest: Manifest
    paths: dict[str, Path]  # wheel file -> path on the master
    work: Path  # scratch directory holding the built wheel and the tarballs

    @property
    def release_id(self) -> str:
        return self.manifest.release

    def size_of(self, wheels: Iterable[Wheel]) -> int:
        return sum(self.paths[w.file].stat().st_size for w in wheels)

    def tarball_for(self, deps: Iterable[Wheel]) -> ReleaseArchive:
        """The tarball carrying ``release.json``, the decnet wheel and ``deps``."""
        deps = sorted(deps, key=lambda w: w.file)
        members: dict[str, Path | bytes] = {config.RELEASE_MANIFEST: self.manifest.to_json()}
        for wheel in (self.manifest.decnet, *deps):
            members[f"{config.RELEASE_WHEELS_DIR}/{wheel.file}"] = self.paths[wheel.file]
        key = hashlib.sha256("\n".join(w.file for w in deps).encode()).hexdigest()[:12]
        out = self.work / f"tar-{key}"
        archive = tar_tree.write_archive(members, out, compresslevel=1)
        git_sha, dirty = self.manifest.build.get("git_sha"), self.manifest.build.get("git_dirty")
        return attrs.evolve(
            archive,
            release=self.release_id,
            git_sha=git_sha if isinstance(git_sha, str) else None,
            git_dirty=dirty if isinstance(dirty, bool) else None,
        )

    def remove(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)


def dependency_wheels(directory: Path) -> list[tuple[Wheel, Path]]:
    """Every wheel of the wheelhouse but DECNET's own, hashed."""
    found = []
    for path in wheelhouse.wheels(directory):
        wheel = wheel_of(path.name, tar_tree.sha256_file(path))
        if normal_name(wheel.name) != normal_name(OWN_DISTRIBUTION):
            found.append((wheel, path))
    if not found:
        raise ConfigError(f"wheelhouse {directory} holds no dependency wheels")
    return found


def wheel_from_checkout(root: Path, out_dir: Path, cache_dir: Path | None = None) -> Path:
    """DECNET's wheel from the allow-listed files of the checkout at ``root``.

    setuptools runs (in a child process, on a scratch copy) only for what it
    decides: the wheel's name, its ``.dist-info`` and which files go in.  That
    is kept as a *template* under ``cache_dir``, keyed by everything it depends
    on (:func:`template_key`), and the wheel is always assembled from the
    template and the checkout's current files (:func:`assemble_wheel`,
    reproducible), so a release whose metadata did not change builds in
    milliseconds, and the same tree gives the same bytes, cached or not.
    """
    files, _skipped = tar_tree.collect(root)
    key = template_key(root, files)
    cached = Path(cache_dir) / f"wheel-template-{key}" if cache_dir and key else None
    if cached is not None and (cached / TEMPLATE_FILE).is_file():
        template = cached
    else:
        built = _setuptools_wheel(root, files, out_dir)
        saved = save_template(built, dict(files), cached or out_dir / "template")
        if saved is None:  # setuptools changed a file: ship exactly what it built
            return built
        template = saved
    return assemble_wheel(template, root, out_dir / "dist")


def _setuptools_wheel(root: Path, files: list[tuple[str, Path]], out_dir: Path) -> Path:
    scratch = Path(tempfile.mkdtemp(prefix="decnet-wheel-src-", dir=out_dir))
    for arcname, source in files:
        target = scratch / arcname
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    dist = out_dir / "setuptools"
    dist.mkdir(exist_ok=True)
    env = {**os.environ, "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH, "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", BUILD_WHEEL_SCRIPT, str(dist)],
        cwd=scratch,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    shutil.rmtree(scratch, ignore_errors=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout)[-2000:]
        raise ConfigError(f"building the decnet wheel from {root} failed:\n{tail}")
    return dist / result.stdout.strip().splitlines()[-1]


def declared_version(source: str) -> str | None:
    """The literal ``__version__ = "..."`` of a module's source, if it has exactly one."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    found = [
        node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and [getattr(t, "id", None) for t in node.targets] == ["__version__"]
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    ]
    return found[0] if len(found) == 1 else None


def template_key(root: Path, files: list[tuple[str, Path]]) -> str | None:
    """What setuptools' output depends on: the build files (``setup.cfg``, README, ...),
    the list of files, DECNET's ``__version__`` and the build tools.  ``None`` when the
    version is not a literal (then setuptools builds every time)."""
    version = declared_version((Path(root) / "decnet" / "__init__.py").read_text())
    if version is None:
        return None
    digest = hashlib.sha256()
    for part in (sys.version, _tool_version("setuptools"), _tool_version("wheel"), version):
        digest.update(part.encode() + b"\0")
    for arcname, path in files:
        digest.update(arcname.encode() + b"\0")
        if "/" not in arcname:  # setup.cfg, pyproject.toml, README, LICENSE: by content
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:32]


def _tool_version(name: str) -> str:
    try:
        return f"{name} {importlib.metadata.version(name)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{name} none"


def save_template(built: Path, files: dict[str, Path], target: Path) -> Path | None:
    """Keep the name, ``.dist-info`` and member list of the setuptools wheel ``built``.

    ``None`` if setuptools put in a file that is not a verbatim copy of the
    checkout's (the template could not reproduce it).
    """
    with zipfile.ZipFile(built) as zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        info_dirs = {i.filename.split("/")[0] for i in infos if ".dist-info/" in i.filename}
        if len(info_dirs) != 1:
            return None
        info_dir = info_dirs.pop()
        members = [i.filename for i in infos if not i.filename.startswith(info_dir + "/")]
        meta = _dist_info_files(zf, info_dir)
        if meta is None or not all(_verbatim(zf, name, files.get(name)) for name in members):
            return None
    partial = target.parent / f".{target.name}.{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "dist-info").mkdir(parents=True)
    for leaf, data in meta.items():
        (partial / "dist-info" / leaf).parent.mkdir(parents=True, exist_ok=True)
        (partial / "dist-info" / leaf).write_bytes(data)
    doc = {"wheel": built.name, "dist_info": info_dir, "members": sorted(members)}
    (partial / TEMPLATE_FILE).write_text(json.dumps(doc, indent=1) + "\n")
    if target.exists():  # made meanwhile by another decnet-admin: same key, same content
        shutil.rmtree(partial, ignore_errors=True)
    else:
        partial.rename(target)
    return target


def _verbatim(zf: zipfile.ZipFile, name: str, source: Path | None) -> bool:
    return source is not None and source.read_bytes() == zf.read(name)


def _dist_info_files(zf: zipfile.ZipFile, info_dir: str) -> dict[str, bytes] | None:
    """The ``.dist-info`` files to keep (not RECORD, by path below it); ``None`` if a name
    is odd."""
    found = {}
    for info in zf.infolist():
        if info.is_dir() or not info.filename.startswith(info_dir + "/"):
            continue
        leaf = info.filename[len(info_dir) + 1 :]
        if any(part in ("", ".", "..") for part in leaf.split("/")):
            return None
        if leaf not in _SKIPPED_DIST_FILES:
            found[leaf] = zf.read(info)
    return found


def assemble_wheel(template: Path, root: Path, dist: Path) -> Path:
    """The wheel of ``template`` with the current files of the checkout at ``root``."""
    doc = json.loads((template / TEMPLATE_FILE).read_text())
    info_dir = doc["dist_info"]
    members = [(name, Path(root) / name) for name in doc["members"]]
    missing = [name for name, path in members if not path.is_file() or path.is_symlink()]
    if missing:
        raise ConfigError(f"the checkout {root} lost {missing[:3]} since the wheel template")
    meta_dir = template / "dist-info"
    meta = [
        (f"{info_dir}/{p.relative_to(meta_dir).as_posix()}", p)
        for p in sorted(meta_dir.rglob("*"))
        if p.is_file()
    ]
    dist.mkdir(parents=True, exist_ok=True)
    target = dist / doc["wheel"]
    _write_wheel(target, members + meta, info_dir)
    return target


def installed_distribution() -> importlib.metadata.Distribution:
    """This DECNET's distribution, if it was installed from a wheel (not editable)."""
    try:
        dist = importlib.metadata.distribution(OWN_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(f"{OWN_DISTRIBUTION} is not installed; use --root CHECKOUT") from None
    direct = dist.read_text("direct_url.json")
    if direct and json.loads(direct).get("dir_info", {}).get("editable"):
        raise ConfigError(
            "this DECNET is an editable install of a checkout: release it with --root CHECKOUT"
        )
    return dist


def wheel_from_installed(
    out_dir: Path, dist: importlib.metadata.Distribution | None = None
) -> Path:
    """Repack the installed distribution into its wheel (reproducibly; no build tools).

    Everything ``RECORD`` lists inside site-packages goes in, but compiled
    files and the installer's own records; generated console scripts (outside
    site-packages) are left out: the installing pip writes them again.
    """
    dist = dist or installed_distribution()
    base = Path(str(dist.locate_file("")))
    info_dir = None
    members: list[tuple[str, Path]] = []
    for entry in dist.files or ():
        name = entry.as_posix()
        if name.startswith("../") or name.startswith("/") or "__pycache__/" in name:
            continue
        top = name.split("/")[0]
        if top.endswith(".dist-info"):
            info_dir = top
            if name.split("/")[-1] in _SKIPPED_DIST_FILES:
                continue
        path = base / name
        if path.is_file():
            members.append((name, path))
    if info_dir is None:
        raise ConfigError(f"the installed {OWN_DISTRIBUTION} has no .dist-info in its RECORD")
    file = f"{info_dir[: -len('.dist-info')]}-py3-none-any.whl"
    target = out_dir / "dist" / file
    target.parent.mkdir(parents=True, exist_ok=True)
    _write_wheel(target, sorted(members), info_dir)
    return target


def _write_wheel(target: Path, members: list[tuple[str, Path]], info_dir: str) -> None:
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
        # The .dist-info last, as the wheel spec recommends.
        for name, path in sorted(members, key=lambda m: (m[0].startswith(info_dir), m[0])):
            data = path.read_bytes()
            info = zipfile.ZipInfo(name, _ZIP_DATE)
            info.external_attr = (0o644 & 0xFFFF) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            writer.writerow((name, f"sha256={digest.decode()}", len(data)))
        writer.writerow((f"{info_dir}/RECORD", "", ""))
        info = zipfile.ZipInfo(f"{info_dir}/RECORD", _ZIP_DATE)
        info.external_attr = (0o644 & 0xFFFF) << 16
        zf.writestr(info, record.getvalue())


def prepare(
    root: Path | None, wheels: Path, *, git: bool = True, cache_dir: Path | None = None
) -> WheelRelease:
    """Build the release: DECNET's wheel (from ``root``, or the installed distribution when
    ``root`` is ``None``) and the dependency set of the wheelhouse ``wheels``; the wheel
    template of a checkout is kept in ``cache_dir`` (:func:`wheel_from_checkout`)."""
    work = Path(tempfile.mkdtemp(prefix="decnet-release-"))
    try:
        if root is not None:
            path = wheel_from_checkout(Path(root).absolute(), work, cache_dir)
            git_sha, dirty = tar_tree.git_state(Path(root)) if git else (None, None)
            build: dict[str, str | bool] = {"source": "checkout"}
            if git_sha:
                build.update(git_sha=git_sha, git_dirty=bool(dirty))
        else:
            path = wheel_from_installed(work)
            build = {"source": "installed"}
        decnet = wheel_of(path.name, tar_tree.sha256_file(path))
        deps = dependency_wheels(Path(wheels))
        manifest = make_manifest(decnet, [w for w, _ in deps], build)
        paths = {decnet.file: path, **{w.file: p for w, p in deps}}
        return WheelRelease(manifest, paths, work)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


class Tarballs:
    """Each host's tarball, built in a thread: the decnet wheel and the dependency wheels
    its inventory (``GET /wheels``) lacks.  Hosts lacking the same wheels share one."""

    def __init__(self, reactor: IReactorThreads, release: WheelRelease):
        self.reactor = reactor
        self.release = release
        self._built: dict[frozenset[str], defer.Deferred[ReleaseArchive]] = {}

    async def lacking(self, client: UpdaterClient) -> tuple[list[Wheel], str | None]:
        """The dependency wheels the host lacks, and why all are sent when it cannot say."""
        try:
            inventory = await client.wheels()
        except DecnetError as exc:
            return list(self.release.manifest.deps), f"no inventory ({exc}): every wheel is sent"
        return missing_wheels(self.release.manifest, inventory["wheels"], inventory["deps"]), None

    async def for_client(self, client: UpdaterClient) -> ReleaseArchive:
        wheels, _why = await self.lacking(client)
        key = frozenset(w.file for w in wheels)
        if key not in self._built:
            self._built[key] = run_in_pool(self.reactor, self.release.tarball_for, wheels)
        built: ReleaseArchive = await _shared(self._built[key])
        return built


def _shared(d: defer.Deferred[T]) -> defer.Deferred[T]:
    """A Deferred with ``d``'s result that leaves ``d`` usable by the next waiter."""
    out: defer.Deferred[T] = defer.Deferred()

    def relay(result: Any) -> Any:
        if isinstance(result, Failure):
            out.errback(result)
        else:
            out.callback(result)
        return result

    d.addBoth(relay)
    return out
