"""Build a release tarball from a source tree: an allow-list, reproducibly.

Only what a worker needs to install DECNET goes in:

* the packages ``decnet/`` and ``twisted/plugins/`` (our plugin declarations),
* ``setup.cfg``, ``pyproject.toml``, ``setup.py`` if any, README and LICENSE,
* optionally a wheelhouse (``*.whl`` files only, flat) for offline installs,
* ``decnet-build.json``: the git commit of the tree when there is one.

Inside those, anything that is not source is left out even when it sits in an
allowed directory: private keys and certificates, ``.env`` files, databases,
logs, VCS metadata, caches and compiled files, editor backups, every dotfile,
and every symbolic link (never followed).  :data:`EXCLUDED_NAMES` and
:data:`EXCLUDED_SUFFIXES` are the list.

The archive is reproducible: members sorted, mtimes fixed, owners ``0:0`` with
empty names, modes normalised to ``0644``/``0755``, a gzip header without a
name or timestamp.  The same tree gives the same sha256 on the same Python.

Blocking (file I/O, compression): the CLI calls it before its reactor runs.
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable
from pathlib import Path

import attrs

from decnet import config
from decnet.errors import ConfigError

# Top-level entries copied when present, and which of them must exist.
INCLUDE_DIRS = ("decnet", "twisted/plugins")
INCLUDE_FILES = ("setup.cfg", "pyproject.toml", "setup.py", "README.md", "README.rst", "LICENSE")
REQUIRED = ("decnet", "setup.cfg")

EXCLUDED_NAMES = (
    "__pycache__",
    "*.pyc",
    "*.pyo",
    ".*",  # dotfiles and dot-directories: .git, .env, .venv, .pytest_cache, .DS_Store ...
    "*.egg-info",
    "build",
    "dist",
    "venv",
    "node_modules",
    "dropin.cache",  # Twisted's plugin cache (a pickle written at run time)
    "*~",
    "*.swp",
    "*.orig",
    "*.rej",
)
EXCLUDED_SUFFIXES = (
    # secrets and identities
    ".key",
    ".pem",
    ".crt",
    ".csr",
    ".p12",
    ".pfx",
    ".jks",
    ".env",
    # state and data
    ".sqlite",
    ".sqlite3",
    ".db",
    ".db-wal",
    ".db-shm",
    ".sqlite-wal",
    ".sqlite-shm",
    ".log",
    ".pid",
    ".tmp",
)
SECRET_NAMES = ("id_rsa", "id_ed25519", "id_ecdsa", "bundle.json", "revoked.json", "master.json")

FIXED_MTIME = 315532800  # 1980-01-01T00:00:00Z, the SOURCE_DATE_EPOCH floor zip formats use
GZIP_LEVEL = 6


@attrs.frozen
class Skipped:
    path: str
    reason: str


@attrs.frozen
class ReleaseArchive:
    """A built tarball on disk and what it holds."""

    path: Path
    sha256: str
    size: int
    files: tuple[str, ...]
    skipped: tuple[Skipped, ...]
    git_sha: str | None
    git_dirty: bool | None
    #: A wheel release's id (from its manifest); a source release's is its sha256 prefix.
    release: str | None = None

    @property
    def release_id(self) -> str:
        return self.release or self.sha256[: config.RELEASE_ID_LENGTH]

    def open(self):
        return open(self.path, "rb")  # the caller closes it


def excluded(name: str) -> str | None:
    """Why ``name`` (one path component) never ships, or ``None``."""
    for pattern in EXCLUDED_NAMES:
        if fnmatch.fnmatchcase(name, pattern):
            return f"excluded name ({pattern})"
    lowered = name.lower()
    for suffix in EXCLUDED_SUFFIXES:
        if lowered.endswith(suffix):
            return f"excluded type ({suffix})"
    if lowered in SECRET_NAMES:
        return "excluded secret/state file"
    return None


def collect(
    root: Path, wheelhouse: Path | None = None
) -> tuple[list[tuple[str, Path]], list[Skipped]]:
    """``(archive name, source path)`` pairs to ship (sorted), and what was skipped and why."""
    root = Path(root).absolute()
    missing = [name for name in REQUIRED if not (root / name).exists()]
    if missing:
        raise ConfigError(
            f"{root} is not a DECNET source tree (missing {', '.join(missing)}); use --root"
        )
    found = _Collected(root)
    for name in INCLUDE_FILES:
        path = root / name
        if path.exists() or path.is_symlink():
            found.add_file(name, path)
    for top in INCLUDE_DIRS:
        found.add_tree(top)
    if wheelhouse is not None:
        found.add_wheelhouse(Path(wheelhouse))
    return sorted(found.chosen.items()), found.skipped


_SYMLINK = "symbolic link (never followed)"


class _Collected:
    """What :func:`collect` chose under ``root`` so far, and what it left out and why."""

    def __init__(self, root: Path):
        self.root = root
        self.chosen: dict[str, Path] = {}
        self.skipped: list[Skipped] = []

    def add_file(self, arcname: str, path: Path) -> None:
        if path.is_symlink():
            self.skipped.append(Skipped(arcname, _SYMLINK))
        elif not path.is_file():
            self.skipped.append(Skipped(arcname, "not a regular file"))
        else:
            self.chosen[arcname] = path

    def add_tree(self, top: str) -> None:
        """Every file below ``root/top`` that may ship; a link to the tree is not followed."""
        base = self.root / top
        if base.is_symlink():
            self.skipped.append(Skipped(top, _SYMLINK))
            return
        if not base.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(base):
            directory = Path(dirpath)
            rel_dir = directory.relative_to(self.root)
            dirnames[:] = [d for d in sorted(dirnames) if self._enter(directory, rel_dir, d)]
            for f in sorted(filenames):
                arcname = (rel_dir / f).as_posix()
                reason = excluded(f)
                if reason is None:
                    self.add_file(arcname, directory / f)
                elif not f.endswith((".pyc", ".pyo")):  # compiled files: too many to list
                    self.skipped.append(Skipped(arcname, reason))

    def _enter(self, directory: Path, rel_dir: Path, name: str) -> bool:
        """Whether the walk goes into subdirectory ``name``; if not, why is recorded."""
        reason = excluded(name)
        if reason is None and (directory / name).is_symlink():
            reason = _SYMLINK
        if reason is None:
            return True
        if not name.startswith("__pycache__"):
            self.skipped.append(Skipped((rel_dir / name).as_posix() + "/", reason))
        return False

    def add_wheelhouse(self, wheelhouse: Path) -> None:
        if not wheelhouse.is_dir():
            raise ConfigError(f"wheelhouse {wheelhouse} is not a directory")
        wheels = sorted(p for p in wheelhouse.iterdir() if p.name.endswith(".whl"))
        if not wheels:
            raise ConfigError(f"wheelhouse {wheelhouse} holds no .whl files")
        for wheel in wheels:
            self.add_file(f"{config.RELEASE_WHEELHOUSE}/{wheel.name}", wheel)


def git_state(root: Path) -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the checkout at ``root``, or ``(None, None)`` without git."""
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--verify", "HEAD"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", "."],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    return (sha or None), bool(status.strip())


def _dirs_of(names: Iterable[str]) -> list[str]:
    dirs = set()
    for name in names:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:i]))
    return sorted(dirs)


def _info(name: str, *, directory: bool = False, size: int = 0, executable: bool = False):
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode = 0o755 if directory or executable else 0o644
    info.size = size
    info.mtime = FIXED_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def build_release(
    root: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    wheelhouse: str | os.PathLike | None = None,
    git: bool = True,
) -> ReleaseArchive:
    """Write ``decnet-release-<id>.tar.gz`` into ``out_dir`` (a new temp dir by default)."""
    root = Path(root).absolute()
    files, skipped = collect(root, Path(wheelhouse) if wheelhouse else None)
    git_sha, dirty = git_state(root) if git else (None, None)
    build_info: dict[str, str | bool] = {"format": "decnet-build/1", "project": "decnet"}
    if git_sha:
        build_info["git_sha"] = git_sha
        build_info["git_dirty"] = bool(dirty)
    info_bytes = (json.dumps(build_info, indent=2, sort_keys=True) + "\n").encode()

    out_dir = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="decnet-release-"))
    members: dict[str, Path | bytes] = dict(files)
    members[config.RELEASE_BUILD_INFO] = info_bytes
    archive = write_archive(members, out_dir)
    return attrs.evolve(archive, skipped=tuple(skipped), git_sha=git_sha, git_dirty=dirty)


def write_archive(
    members: dict[str, Path | bytes], out_dir: Path, *, compresslevel: int = GZIP_LEVEL
) -> ReleaseArchive:
    """Write ``members`` (name -> file or content) reproducibly into
    ``out_dir/decnet-release-<sha256 prefix>.tar.gz``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / ".decnet-release.partial.tar.gz"
    with open(partial, "wb") as raw:
        # filename="" and mtime=0: no name or timestamp in the gzip header.
        with gzip.GzipFile(
            filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=compresslevel
        ) as gz:
            with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for directory in _dirs_of(members):
                    tar.addfile(_info(directory, directory=True))
                for name in sorted(members):
                    _add(tar, name, members[name])
    sha256 = sha256_file(partial)
    final = out_dir / f"decnet-release-{sha256[: config.RELEASE_ID_LENGTH]}.tar.gz"
    os.replace(partial, final)
    return ReleaseArchive(
        path=final,
        sha256=sha256,
        size=final.stat().st_size,
        files=tuple(sorted(members)),
        skipped=(),
        git_sha=None,
        git_dirty=None,
    )


def _add(tar: tarfile.TarFile, name: str, source: Path | bytes) -> None:
    if isinstance(source, bytes):
        tar.addfile(_info(name, size=len(source)), io.BytesIO(source))
        return
    st = source.stat()
    info = _info(name, size=st.st_size, executable=bool(st.st_mode & 0o111))
    with open(source, "rb") as fh:
        tar.addfile(info, fh)


def sha256_file(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB chunks (blocking)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()
