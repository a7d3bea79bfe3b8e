"""The few file-system calls the tailer makes, behind one small seam.

:class:`OsFiles` is the real thing (blocking ``os`` calls; the forwarder runs
them in a thread).  The fault-model test passes an in-memory file system with
the same methods, so the tailer's rotation logic is exercised through
randomized crash schedules without touching a disk.

A handle is whatever ``open`` returned: for :class:`OsFiles` a descriptor,
which keeps a renamed or deleted file readable until it is closed.
"""

from __future__ import annotations

import fcntl
import os
import stat
from typing import Protocol

import attrs

# ioctl(FS_IOC_GETVERSION): the inode's generation number, which changes when
# an inode number is reused for a new file (ext4, xfs, btrfs; 0 elsewhere).
FS_IOC_GETVERSION = 0x80087601

# Compressed rotations (logrotate's ``compress``) cannot be read as lines: a
# generation that only survives compressed is gone for us.
GZIP_MAGIC = b"\x1f\x8b"
COMPRESSED_MAGIC = (GZIP_MAGIC, b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")


# What ``open`` returns: a descriptor for OsFiles (any int for a stand-in).
Handle = int


@attrs.frozen
class Stat:
    dev: int
    ino: int
    size: int
    mtime_ns: int
    regular: bool = True


@attrs.frozen
class Entry:
    """One directory entry (not following symlinks)."""

    name: str
    stat: Stat


class Files(Protocol):
    """What the tailer needs of a file system (:class:`OsFiles`, or a test's)."""

    def stat(self, path: str) -> Stat | None: ...
    def open(self, path: str) -> Handle | None: ...
    def fstat(self, handle: Handle) -> Stat: ...
    def pread(self, handle: Handle, size: int, offset: int) -> bytes: ...
    def version(self, handle: Handle) -> int: ...
    def close(self, handle: Handle) -> None: ...
    def listdir(self, directory: str) -> list[Entry]: ...


def _stat_of(st: os.stat_result) -> Stat:
    return Stat(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, stat.S_ISREG(st.st_mode))


class OsFiles:
    """The real file system."""

    def stat(self, path: str) -> Stat | None:
        try:
            return _stat_of(os.stat(path))
        except OSError:
            return None

    def open(self, path: str) -> Handle | None:
        """A read-only handle, or ``None`` when the file is not there (or not readable)."""
        flags = os.O_RDONLY | os.O_CLOEXEC
        try:
            return os.open(path, flags | getattr(os, "O_NOATIME", 0))
        except PermissionError:
            # O_NOATIME needs ownership; the forwarder may only have group read.
            try:
                return os.open(path, flags)
            except OSError:
                return None
        except OSError:
            return None

    def fstat(self, handle: Handle) -> Stat:
        return _stat_of(os.fstat(handle))

    def pread(self, handle: Handle, size: int, offset: int) -> bytes:
        return os.pread(handle, size, offset)

    def version(self, handle: Handle) -> int:
        """The inode's generation number, or 0 where the file system has none."""
        try:
            return int.from_bytes(fcntl.ioctl(handle, FS_IOC_GETVERSION, bytes(8))[:4], "little")
        except OSError:
            return 0

    def close(self, handle: Handle) -> None:
        os.close(handle)

    def listdir(self, directory: str) -> list[Entry]:
        try:
            entries = list(os.scandir(directory))
        except OSError:
            return []
        out = []
        for entry in entries:
            try:
                out.append(Entry(entry.name, _stat_of(entry.stat(follow_symlinks=False))))
            except OSError:
                continue
        return out
