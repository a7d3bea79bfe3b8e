"""Crash-safe file primitives: write new, fsync, atomic rename, fsync the directory.

Everything that persists state (keys, bundles, revocation lists, desired state,
release journals) goes through here so that a ``kill -9`` or power loss leaves
either the old file or the new one, never a torn mix.  These functions block;
daemons call them from a thread (:mod:`decnet.threads`), never on the reactor.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or create inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_private_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and parents) as 0700; tighten it if it already exists."""
    path = Path(path)
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    os.chmod(path, PRIVATE_DIR_MODE)
    return path


def write_new_file(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> None:
    """Create ``path`` exclusively with ``mode`` from the first byte, then fsync.

    ``O_EXCL`` plus the mode in ``open(2)`` means a private key is never
    readable by others, not even for the instant a write-then-chmod leaves.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: str | os.PathLike, data: bytes, mode: int = 0o644, *, gid: int | None = None
) -> None:
    """Replace ``path`` with ``data`` atomically and durably.

    ``gid``: the new file's group, set while it is still private (0600) and
    before it gets ``mode``, so a key is never readable by the wrong group (a
    file made in a setgid directory starts with the directory's group).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        write_new_file(tmp, data, mode if gid is None else PRIVATE_FILE_MODE)
        if gid is not None:
            os.chown(tmp, -1, gid)
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def lock_path_for(path: str | os.PathLike) -> Path:
    """The lock file that guards read-modify-write of ``path``: ``.<name>.lock`` beside it.

    A separate file, because ``path`` itself is replaced by :func:`atomic_write`
    (a lock on the old inode would not exclude a writer that opened the new one).
    """
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def locked(lock_path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (created 0600) for the block.

    The one lock helper of the project: first-time creation (``ensure_ca``,
    the master identity) and every read-modify-write of a file several
    processes may change at once (``revoked.json``, the host registry; see
    :func:`lock_path_for`).  The lock goes with the open file description, so
    a process killed inside the block releases it.  Not reentrant: a block
    must not take the same lock again.
    """
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
