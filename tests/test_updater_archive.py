"""Hostile release tarballs: each is refused and the install directory is left untouched."""

import gzip
import hashlib
import io
import json
import stat
import subprocess
import sys
import tarfile
import zlib

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from decnet import config
from decnet.errors import DigestMismatch, MalformedArchive, UnsafeArchive
from decnet.threads import inline_runner
from decnet.updater import archive
from decnet.updater.engine import Updater, Upload
from decnet.updater.releases import ReleaseStore
from tests.support import make_tarball, minimal_release, tree_snapshot
from tests.test_updater_tarscan import END, extended, header, member, pax

SMALL = archive.Limits(max_bytes=1024 * 1024, max_members=50)


def info(name, kind=tarfile.REGTYPE, *, mode=0o644, linkname="", size=0):
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.linkname = linkname
    ti.size = size
    return ti


def release_with(*members) -> bytes:
    return minimal_release(extra=members)


def zeros_bomb() -> bytes:
    """2 MiB of zeros in one member: ~2 KiB compressed, over the 1 MiB cap."""
    return release_with(("payload.bin", b"\0" * (2 * 1024 * 1024)))


def many_members() -> bytes:
    return release_with(*[(f"pkg/m{i}.py", b"") for i in range(60)])


def truncated() -> bytes:
    good = release_with(("pkg/big.py", bytes(range(256)) * 400))
    return good[: len(good) // 2]


HOSTILE = {
    "traversal": lambda: release_with(("../evil.py", b"x")),
    "nested traversal": lambda: release_with(("demo/../../evil.py", b"x")),
    "absolute path": lambda: release_with(("/etc/cron.d/evil", b"x")),
    "backslash": lambda: release_with(("..\\evil.py", b"x")),
    "component longer than NAME_MAX": lambda: release_with(("demo/" + "n" * 256, b"x")),
    "symlink escape": lambda: release_with(
        (info("demo/link", tarfile.SYMTYPE, linkname="/etc"), None)
    ),
    "symlink then write through it": lambda: release_with(
        (info("demo/up", tarfile.SYMTYPE, linkname="../.."), None), ("demo/up/evil.py", b"x")
    ),
    "hardlink escape": lambda: release_with(
        (info("demo/passwd", tarfile.LNKTYPE, linkname="../../../etc/passwd"), None)
    ),
    "hardlink inside": lambda: release_with(
        (info("demo/copy.py", tarfile.LNKTYPE, linkname="demo/__init__.py"), None)
    ),
    "character device": lambda: release_with((info("demo/tty", tarfile.CHRTYPE), None)),
    "block device": lambda: release_with((info("demo/sda", tarfile.BLKTYPE), None)),
    "fifo": lambda: release_with((info("demo/pipe", tarfile.FIFOTYPE), None)),
    "gzip bomb": zeros_bomb,
    "too many members": many_members,
    "duplicate member": lambda: release_with(("demo/__init__.py", b"again")),
    "file inside a file": lambda: release_with(("demo/__init__.py/evil", b"x")),
    "truncated gzip": truncated,
    "not gzip": lambda: b"PK\x03\x04 this is a zip, not a tarball" * 10,
    "plain tar": lambda: make_tarball([("setup.cfg", b"")], gz=False),
    "not a release": lambda: make_tarball([("README", b"hello")]),
}


def too_long_below_the_release_dir() -> bytes:
    """A member path within PATH_MAX on its own (4085 bytes), over it once extracted."""
    return release_with(("demo/" + "/".join(["n" * 200] * 20) + "/" + "m" * 60, b"x"))


@pytest.fixture
def updater(tmp_path):
    """An updater with release A installed; any install would be recorded (none may happen)."""
    from tests.test_updater_engine import FakeAgent, FakeAgentHealth, FakeInstaller

    clock = Clock()
    agent = FakeAgent()
    from decnet.updater.health import HealthProbe

    u = Updater(
        clock=clock,
        store=ReleaseStore(tmp_path / "install"),
        self_store=ReleaseStore(tmp_path / "install" / config.UPDATER_SELF_DIR),
        installer=FakeInstaller(),
        agent=agent,
        probe=HealthProbe(clock, FakeAgentHealth(agent)),
        to_thread=inline_runner,
        limits=SMALL,
        restart_self=lambda d: None,
    )
    defer.ensureDeferred(u.start())
    good = minimal_release()
    d = defer.ensureDeferred(u.update(upload(good), hashlib.sha256(good).hexdigest()))
    assert d.result["result"] == "updated"
    return u


def upload(data):
    return Upload(io.BytesIO(data), hashlib.sha256(data).hexdigest(), len(data))


@pytest.mark.parametrize("name", sorted(HOSTILE))
@pytest.mark.parametrize("route", ["update", "update_self"])
def test_a_hostile_tarball_is_refused_and_nothing_changes(updater, name, route):
    data = HOSTILE[name]()
    before = tree_snapshot(updater.store.root)
    d = defer.ensureDeferred(
        getattr(updater, route)(upload(data), hashlib.sha256(data).hexdigest())
    )
    failure = d.result
    d.addErrback(lambda f: None)
    assert isinstance(failure.value, UnsafeArchive), (name, failure)
    assert failure.value.status == 422
    assert tree_snapshot(updater.store.root) == before
    assert updater.installer.installed == [(updater.store.current(), False)]
    assert updater.busy is None


@pytest.mark.parametrize("route", ["update", "update_self"])
def test_a_path_too_long_to_extract_is_refused_as_unsafe_and_the_install_removed(updater, route):
    store = updater.store if route == "update" else updater.self_store
    current, releases = store.current(), sorted(store.releases_dir.iterdir())
    data = too_long_below_the_release_dir()
    d = defer.ensureDeferred(
        getattr(updater, route)(upload(data), hashlib.sha256(data).hexdigest())
    )
    failure = d.result
    d.addErrback(lambda f: None)
    assert isinstance(failure.value, UnsafeArchive), failure
    assert failure.value.status == 422
    assert "is too long a path to extract" in str(failure.value)
    assert str(updater.store.root) not in str(failure.value)  # no internals echoed
    assert store.current() == current and sorted(store.releases_dir.iterdir()) == releases
    assert store.journal.state == "idle"
    assert updater.installer.installed == [(updater.store.current(), False)]
    assert updater.busy is None


def test_extract_refuses_a_path_too_long_below_its_destination(tmp_path):
    with pytest.raises(UnsafeArchive, match="is too long a path to extract"):
        archive.extract(io.BytesIO(too_long_below_the_release_dir()), tmp_path / "dest", SMALL)


def test_a_wrong_sha256_is_refused_before_parsing(updater):
    data = HOSTILE["traversal"]()
    before = tree_snapshot(updater.store.root)
    d = defer.ensureDeferred(updater.update(upload(data), "0" * 64))
    assert isinstance(d.result.value, DigestMismatch)
    assert "refused before reading it" in str(d.result.value)
    d.addErrback(lambda f: None)
    assert tree_snapshot(updater.store.root) == before


@pytest.mark.parametrize("name", sorted(set(HOSTILE) - {"not a release"}))
def test_extract_refuses_on_its_own_too(tmp_path, name):
    """Defence in depth: the extractor enforces every rule even without the inspect pass."""
    with pytest.raises(UnsafeArchive):
        archive.extract(io.BytesIO(HOSTILE[name]()), tmp_path / "dest", SMALL)
    escaped = [p for p in tmp_path.parent.rglob("evil*")]
    assert escaped == []


def test_setuid_setgid_and_sticky_bits_are_stripped(tmp_path):
    data = release_with(
        (info("demo/tool", mode=0o4755), b"#!/bin/sh\n"),
        (info("demo/grp", mode=0o2711), b"x"),
        (info("demo/plain", mode=0o1666), b"x"),
        (info("demo/sub", tarfile.DIRTYPE, mode=0o7777), None),
    )
    archive.extract(io.BytesIO(data), tmp_path / "dest", SMALL)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "dest" / "demo").iterdir()}
    assert modes["tool"] == 0o755
    assert modes["grp"] == 0o755
    assert modes["plain"] == 0o644
    assert modes["sub"] == 0o755


def test_a_good_tarball_extracts_with_its_build_info(tmp_path):
    data = release_with(
        (config.RELEASE_BUILD_INFO, b'{"git_sha": "abc123", "nested": {"no": 1}}'),
        ("wheelhouse/demo-1.0-py3-none-any.whl", b"PK"),
        (info("./", tarfile.DIRTYPE), None),
    )
    summary = archive.extract(io.BytesIO(data), tmp_path / "dest")
    assert summary.build_info == {"git_sha": "abc123"}
    assert summary.has_wheelhouse and summary.has_project
    assert (tmp_path / "dest" / "demo" / "__init__.py").read_bytes() == b"VERSION = 1\n"


def test_the_bomb_is_refused_without_inflating_it(tmp_path):
    """The cap is checked against each header before its content is read."""
    big = tarfile.TarInfo("huge.bin")
    big.size = 10 * 1024**3  # claims 10 GiB; the stream holds a few bytes
    raw = io.BytesIO()
    raw.write(big.tobuf(format=tarfile.PAX_FORMAT))
    raw.write(b"\0" * 1024)
    with pytest.raises(UnsafeArchive, match="larger than"):
        archive.inspect(io.BytesIO(gzip.compress(raw.getvalue())), SMALL)


def _release_then(raw_tail: bytes) -> bytes:
    """A good release's members, then hand-made raw tar blocks, gzip-compressed."""
    good = gzip.decompress(minimal_release())
    # Drop tarfile's end-of-archive blocks (and record padding) from the good part.
    with tarfile.open(fileobj=io.BytesIO(good), mode="r:") as tar:
        last = tar.getmembers()[-1]
        end = last.offset_data + -(-last.size // 512) * 512
    body = good[:end]
    return gzip.compress(body + raw_tail + END, mtime=0)


HOSTILE_HEADERS = {
    "1 MiB GNU long name": lambda: _release_then(extended(b"L", b"n" * 2**20) + member(b"x")),
    "1 MiB pax path": lambda: _release_then(pax((b"path", b"p" * 2**20)) + member(b"x")),
    "1 MiB pax comment": lambda: _release_then(pax((b"comment", b"c" * 2**20)) + member(b"x")),
    "chained long names": lambda: _release_then(extended(b"L", b"n\0") * 3000 + member(b"x")),
    "chained pax headers": lambda: _release_then(pax((b"path", b"a")) * 3000 + member(b"x")),
    "pax sparse map": lambda: _release_then(pax((b"GNU.sparse.map", b"0,1")) + member(b"x")),
    "old GNU sparse": lambda: _release_then(header(b"holes", b"S", 0)),
    "corrupt header": lambda: _release_then(header(b"x", b"0", 0, chksum_delta=7)),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_HEADERS))
@pytest.mark.parametrize("route", ["update", "update_self"])
def test_a_hostile_tar_header_is_refused_with_400_and_nothing_changes(updater, name, route):
    data = HOSTILE_HEADERS[name]()
    before = tree_snapshot(updater.store.root)
    d = defer.ensureDeferred(
        getattr(updater, route)(upload(data), hashlib.sha256(data).hexdigest())
    )
    failure = d.result
    d.addErrback(lambda f: None)
    assert isinstance(failure.value, MalformedArchive), (name, failure)
    assert failure.value.status == 400
    assert tree_snapshot(updater.store.root) == before
    assert updater.busy is None


def test_a_good_release_followed_by_hand_made_blocks_is_accepted(tmp_path):
    """The helper above builds valid archives: without a hostile header, all is well."""
    data = _release_then(extended(b"L", b"demo/" + b"n" * 200 + b"\0") + member(b"x"))
    summary = archive.extract(io.BytesIO(data), tmp_path / "dest")
    assert summary.files == 4 and (tmp_path / "dest" / "demo" / ("n" * 200)).exists()


RSS_PROBE = """
import json, resource, sys
from decnet.errors import UnsafeArchive
from decnet.updater import archive
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with open(sys.argv[1], "rb") as f:
    try:
        archive.inspect(f)
        outcome = "accepted"
    except UnsafeArchive as exc:
        outcome = "%s %s %s" % (type(exc).__name__, exc.status, exc)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"growth_kib": after - before, "outcome": outcome}))
"""


def _write_name_bomb(path, kind: bytes, size: int) -> None:
    """A .tar.gz whose one extended header carries ``size`` bytes of 'a', written in chunks."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk = b"a" * (1 << 20)
    with open(path, "wb") as out:
        if kind == b"x":
            tail = b" path="
            record = size - 1  # the length prefix plus the tail plus the value plus LF
            prefix = b"%d%s" % (size, tail)
            out.write(deflate.compress(header(b"././@PaxHeader", b"x", size) + prefix))
            left = record - len(prefix)
        else:
            out.write(deflate.compress(header(b"././@LongLink", b"L", size)))
            left = size - 1
        while left > 0:
            out.write(deflate.compress(chunk[: min(left, len(chunk))]))
            left -= min(left, len(chunk))
        pad = -(-size // 512) * 512 - size
        out.write(deflate.compress((b"\n" if kind == b"x" else b"\0") + bytes(pad)))
        out.write(deflate.compress(member(b"x") + END))
        out.write(deflate.flush())


@pytest.mark.parametrize("kind", [b"L", b"x"], ids=["GNU long name", "pax path"])
def test_a_200_mb_name_in_a_small_tarball_grows_peak_memory_by_less_than_32_mib(tmp_path, kind):
    """A 200 MB name compresses to ~200 KB; tarfile would read it whole (572 MiB on main)."""
    path = tmp_path / "bomb.tar.gz"
    _write_name_bomb(path, kind, 200 * 1000 * 1000)
    assert path.stat().st_size < 300 * 1024
    result = subprocess.run(
        [sys.executable, "-c", RSS_PROBE, str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    report = json.loads(result.stdout)
    assert report["outcome"].startswith("MalformedArchive 400"), report
    assert report["growth_kib"] < 32 * 1024, report
