"""Release tarballs on the worker: allow-list extraction of hostile input.

The master is trusted to *choose* what to install, not to be free of bugs or of
an attacker sitting in its place with a broken tarball, so extraction assumes
the worst:

* only regular files and directories; links (symbolic or hard), devices, FIFOs,
  sparse and contiguous files are refused;
* member names must be relative, free of ``..``, backslashes and NUL, and short
  enough to extract (``ENAMETOOLONG`` below the destination is the archive's fault);
* modes come from an allow-list (``0644``, or ``0755`` when any execute bit
  was set): setuid, setgid and sticky bits never reach the disk;
* the number of members and the total uncompressed size are capped while the
  archive streams, so a gzip bomb is refused after at most the cap, never
  inflated to the end;
* every header is checked on the raw stream before :mod:`tarfile` parses it
  (:mod:`decnet.updater.tarscan`): an extended (pax or GNU long-name) header
  larger than 64 KiB, chained extended headers, a corrupt header or a sparse
  file is refused (:class:`MalformedArchive`, 400) without being read into
  memory;
* a truncated or corrupt gzip stream is refused.

The archive is decompressed here, chunk by chunk (:class:`_ScannedGunzip`),
so that the scanner sees every byte before ``tarfile`` does; ``tarfile`` reads
an uncompressed stream (``r|``) and keeps no list of past members.  Memory
stays bounded by a few chunks and one capped header, whatever the archive.

:func:`inspect` walks the archive without writing anything (the updater runs it
before it touches the install directory); :func:`extract` writes into a new,
empty directory with ``O_EXCL | O_NOFOLLOW`` and refuses on the first problem.
Both block: call them in a thread.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import tarfile
import zlib
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import BinaryIO

import attrs

from decnet import config
from decnet.errors import BadManifest, UnsafeArchive
from decnet.updater.tarscan import TarHeaderScanner

CHUNK = 256 * 1024
_GZIP_WBITS = 16 + zlib.MAX_WBITS  # gzip header and trailer (CRC-32, size) checked
_BUILD_INFO_MAX = 64 * 1024
_NAME_MAX, _COMPONENT_MAX = 4096, 255  # PATH_MAX and NAME_MAX on Linux
_ALLOWED_TYPES = {tarfile.REGTYPE: "file", tarfile.AREGTYPE: "file", tarfile.DIRTYPE: "dir"}
_TYPE_NAMES = {
    tarfile.SYMTYPE: "symbolic link",
    tarfile.LNKTYPE: "hard link",
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.FIFOTYPE: "FIFO",
    tarfile.CONTTYPE: "contiguous file",
    tarfile.GNUTYPE_SPARSE: "sparse file",
}


@attrs.frozen
class Limits:
    max_bytes: int = config.MAX_RELEASE_BYTES
    max_members: int = config.MAX_RELEASE_MEMBERS
    max_header: int = config.MAX_RELEASE_HEADER_BYTES


DEFAULT_LIMITS = Limits()


@attrs.frozen
class Summary:
    """What a release tarball holds (after it passed every check)."""

    members: int
    files: int
    total_bytes: int
    build_info: dict
    has_wheelhouse: bool
    has_project: bool
    #: A wheel release: the raw ``release.json`` (``None`` for a source release) ...
    manifest: bytes | None = None
    #: ... and every file under ``wheels/``: name below it -> sha256, hashed as it streamed.
    wheels: dict[str, str] = attrs.field(factory=dict)


def safe_name(member: tarfile.TarInfo) -> str | None:
    """The member's normalised relative path; ``None`` for the archive root (``.``)."""
    name = member.name
    if not name or "\x00" in name or "\\" in name:
        raise UnsafeArchive(f"member {name!r} has an empty or forbidden name")
    if name.startswith("/"):
        raise UnsafeArchive(f"member {name!r} is an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchive(f"member {name!r} escapes the release directory ('..')")
    if len(name.encode("utf-8", "surrogateescape")) > _NAME_MAX or any(
        len(p.encode("utf-8", "surrogateescape")) > _COMPONENT_MAX for p in parts
    ):
        raise UnsafeArchive(f"member {name[:64]!r}... has a name longer than a file system allows")
    if not parts:
        return None
    return "/".join(parts)


def member_kind(member: tarfile.TarInfo) -> str:
    """``"file"`` or ``"dir"``; anything else is refused."""
    kind = _ALLOWED_TYPES.get(member.type)
    if kind is None:
        what = _TYPE_NAMES.get(member.type, f"type {member.type!r}")
        target = f" -> {member.linkname!r}" if member.linkname else ""
        raise UnsafeArchive(f"member {member.name!r} is a {what}{target}: only files and dirs")
    return kind


def safe_mode(member: tarfile.TarInfo) -> int:
    """An allow-listed mode: setuid/setgid/sticky and group/other write never survive."""
    if member.isdir() or member.mode & 0o111:
        return 0o755
    return 0o644


def inspect(fileobj: BinaryIO, limits: Limits = DEFAULT_LIMITS) -> Summary:
    """Check every member and cap; write nothing.  :class:`UnsafeArchive` on the first problem."""
    return _walk(fileobj, limits, None)


def extract(fileobj: BinaryIO, dest: str | os.PathLike, limits: Limits = DEFAULT_LIMITS) -> Summary:
    """Extract into ``dest`` (created; must not exist) under the same checks as :func:`inspect`."""
    dest = Path(dest)
    dest.mkdir(mode=0o755)
    return _walk(fileobj, limits, dest)


class _ScannedGunzip(io.RawIOBase):
    """The decompressed tar stream of a ``.tar.gz``, shown to the header scanner first.

    ``read(n)`` inflates at most ``n`` bytes (``max_length``), so a bomb never
    expands beyond what the reader asked for, and every byte goes through
    :meth:`TarHeaderScanner.feed` before it is returned.  Concatenated gzip
    members are one stream, as for ``gzip``; a stream that ends early is
    refused.
    """

    def __init__(self, raw: BinaryIO, scanner: TarHeaderScanner):
        self._raw = raw
        self._scanner = scanner
        self._inflate = zlib.decompressobj(_GZIP_WBITS)
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def _read(self, n: int) -> bytes:
        while n > 0:
            inflate = self._inflate
            if inflate.eof:
                rest = inflate.unused_data or self._raw.read(CHUNK)
                if not rest:
                    return b""
                self._inflate = inflate = zlib.decompressobj(_GZIP_WBITS)
                self._pending = rest
            if not self._pending:
                self._pending = self._raw.read(CHUNK)
                if not self._pending:
                    raise UnsafeArchive("not a valid gzip-compressed tar archive (truncated)")
            out = inflate.decompress(self._pending, n)
            self._pending = inflate.unconsumed_tail
            if out:
                self._scanner.feed(out)
                return out
        return b""


def _walk(fileobj: BinaryIO, limits: Limits, dest: Path | None) -> Summary:
    fileobj.seek(0)
    walk = _Walk(limits, dest)
    stream = _ScannedGunzip(fileobj, TarHeaderScanner(limits.max_header))
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            while (member := tar.next()) is not None:
                tar.members.clear()  # type: ignore[attr-defined]  # tarfile keeps every TarInfo otherwise
                walk.member(tar, member)
    except UnsafeArchive:
        raise
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        refusal = _refusal(exc, walk.name)
        if refusal is None:
            raise  # a real disk problem (ENOSPC, EACCES): not the archive's fault
        raise refusal from None
    return walk.summary()


def _refusal(exc: BaseException, name: str) -> UnsafeArchive | None:
    """The archive's fault in a failure while reading or writing it; ``None``: the disk's."""
    if isinstance(exc, FileExistsError | NotADirectoryError | IsADirectoryError):
        return UnsafeArchive(f"member collides with another: {exc.filename}")
    if isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG:
        # Within _NAME_MAX on its own, over PATH_MAX below the release directory.
        return UnsafeArchive(f"member {name[:64]!r}... is too long a path to extract")
    if isinstance(exc, OSError) and exc.errno is not None:
        return None
    return UnsafeArchive(f"not a valid gzip-compressed tar archive ({_short(exc)})")


class _Walk:
    """One pass over the members: every check, the counts, and the writing when ``dest`` is set."""

    def __init__(self, limits: Limits, dest: Path | None):
        self.limits = limits
        self.dest = dest
        # Named as Summary's fields: summary() copies them by name.
        self.members = self.files = self.total_bytes = 0
        self.build_info: dict = {}
        self.has_wheelhouse = self.has_project = False
        self.manifest: bytes | None = None
        self.wheels: dict[str, str] = {}
        self.seen: dict[str, str] = {}  # name -> "file" | "dir"
        self.name = ""  # the member being checked or written

    def member(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise UnsafeArchive(f"more than {self.limits.max_members} members")
        kind = member_kind(member)
        name = safe_name(member)
        if name is None:
            return
        self.name = name
        if kind == "file":
            self._count_size(member.size)
        self._place(name, kind)
        if kind == "dir":
            if self.dest is not None:
                (self.dest / name).mkdir(mode=0o755, parents=True, exist_ok=True)
            return
        self._file(tar, member, name)

    def _count_size(self, size: int) -> None:
        self.total_bytes += size
        if size < 0 or self.total_bytes > self.limits.max_bytes:
            raise UnsafeArchive(f"release larger than {self.limits.max_bytes} bytes uncompressed")

    def _place(self, name: str, kind: str) -> None:
        """Refuse a name seen before (but a directory again) or one below a file."""
        previous = self.seen.get(name)
        if previous is not None and (previous, kind) != ("dir", "dir"):
            raise UnsafeArchive(f"member {name!r} appears twice")
        parts = name.split("/")[:-1]
        for i in range(len(parts)):
            if self.seen.get("/".join(parts[: i + 1])) == "file":
                raise UnsafeArchive(f"member {name!r} is inside a file")
        self.seen[name] = kind

    def _file(self, tar: tarfile.TarFile, member: tarfile.TarInfo, name: str) -> None:
        self.files += 1
        if name in ("setup.cfg", "pyproject.toml", "setup.py"):
            self.has_project = True
        if name.startswith(config.RELEASE_WHEELHOUSE + "/") and name.endswith(".whl"):
            self.has_wheelhouse = True
        source = tar.extractfile(member)
        if source is None:  # pragma: no cover - a regular file always has a reader
            raise UnsafeArchive(f"member {name!r} cannot be read")
        if name == config.RELEASE_BUILD_INFO and member.size <= _BUILD_INFO_MAX:
            data = source.read()
            self.build_info = _parse_build_info(data)
            chunks: Iterable[bytes] = [data]
        elif name == config.RELEASE_MANIFEST:
            if member.size > config.MAX_MANIFEST_BYTES:
                raise BadManifest(f"release.json is larger than {config.MAX_MANIFEST_BYTES} bytes")
            self.manifest = source.read()
            chunks = [self.manifest]
        else:
            chunks = iter(partial(source.read, CHUNK), b"")
        prefix = config.RELEASE_WHEELS_DIR + "/"
        if name.startswith(prefix):
            chunks = _hashed(chunks, self.wheels, name[len(prefix) :])
        if self.dest is None:
            for _ in chunks:
                pass
        else:
            _write_file(self.dest, name, chunks, safe_mode(member))

    def summary(self) -> Summary:
        return Summary(**{field.name: getattr(self, field.name) for field in attrs.fields(Summary)})


def _hashed(chunks: Iterable[bytes], into: dict[str, str], key: str) -> Iterable[bytes]:
    """``chunks`` unchanged; once they are all read, ``into[key]`` is their sha256."""
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
        yield chunk
    into[key] = digest.hexdigest()


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 120 else text[:117] + "..."


def _parse_build_info(data: bytes) -> dict:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(doc, dict):
        return {}
    # Only short strings travel into release.json.
    return {k: v for k, v in doc.items() if isinstance(k, str) and isinstance(v, str | int | bool)}


def _write_file(dest: Path, name: str, chunks: Iterable[bytes], mode: int) -> None:
    path = dest / name
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, mode)
    try:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
        os.fchmod(fd, mode)  # the umask may have narrowed it; never widen beyond 0755
    finally:
        os.close(fd)
