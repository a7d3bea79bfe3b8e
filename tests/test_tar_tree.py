"""tar_tree: an allow-listed, reproducible release tarball."""

import os
import subprocess
import tarfile

import pytest

from decnet import config
from decnet.errors import ConfigError
from decnet.master import tar_tree
from decnet.updater import archive


def make_tree(root):
    files = {
        "setup.cfg": "[metadata]\nname = decnet\n",
        "pyproject.toml": "[build-system]\n",
        "README.md": "# hi\n",
        "LICENSE": "MIT\n",
        "decnet/__init__.py": "__version__ = '9'\n",
        "decnet/agent/tap.py": "# agent\n",
        "twisted/plugins/decnet_plugins.py": "# plugins\n",
        # Everything below must stay out.
        ".env": "SECRET=1\n",
        "decnet/.env.local": "SECRET=1\n",
        "decnet/worker.key": "key material\n",
        "decnet/ca.crt": "cert\n",
        "decnet/state.sqlite": "db",
        "decnet/registry.db": "db",
        "decnet/debug.log": "log",
        "decnet/__pycache__/x.cpython-311.pyc": "pyc",
        "decnet/old.pyc": "pyc",
        "decnet/.git/config": "vcs",
        "decnet/.pytest_cache/v": "cache",
        "decnet/bundle.json": "{}",
        "decnet/notes.py~": "backup",
        "twisted/plugins/dropin.cache": "pickle",
        "tests/test_x.py": "# not shipped\n",
        "home/ca/ca.key": "CA KEY\n",
        ".venv/bin/python": "",
        ".git/HEAD": "ref\n",
    }
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (root / "decnet" / "agent" / "tap.py").chmod(0o755)
    os.symlink("/etc/passwd", root / "decnet" / "passwd.py")
    os.symlink("/etc", root / "decnet" / "etc")
    return root


def members(path):
    with tarfile.open(path) as tar:
        return {m.name: m for m in tar.getmembers()}


def test_only_the_allow_list_ships(tmp_path):
    built = tar_tree.build_release(make_tree(tmp_path / "src"), tmp_path / "out", git=False)
    names = set(members(built.path))
    files = {n for n, m in members(built.path).items() if m.isfile()}
    assert files == {
        "setup.cfg",
        "pyproject.toml",
        "README.md",
        "LICENSE",
        "decnet/__init__.py",
        "decnet/agent/tap.py",
        "twisted/plugins/decnet_plugins.py",
        config.RELEASE_BUILD_INFO,
    }
    assert names - files == {"decnet", "decnet/agent", "twisted", "twisted/plugins"}
    skipped = {s.path for s in built.skipped}
    for leaked in ("decnet/worker.key", "decnet/state.sqlite", "decnet/passwd.py", "decnet/etc/"):
        assert leaked in skipped
    assert built.files == tuple(sorted(built.files))


def test_members_are_normalised(tmp_path):
    built = tar_tree.build_release(make_tree(tmp_path / "src"), tmp_path / "out", git=False)
    for m in members(built.path).values():
        assert (m.uid, m.gid, m.uname, m.gname, m.mtime) == (0, 0, "", "", tar_tree.FIXED_MTIME)
        assert m.mode in (0o644, 0o755)
        assert m.isfile() or m.isdir()
    assert members(built.path)["decnet/agent/tap.py"].mode == 0o755
    assert members(built.path)["setup.cfg"].mode == 0o644


def test_the_same_tree_gives_the_same_sha256(tmp_path):
    src = make_tree(tmp_path / "src")
    first = tar_tree.build_release(src, tmp_path / "a", git=False)
    # Touch everything: new mtimes, other permissions; content unchanged.
    for path in src.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.utime(path, (1, 1_600_000_000))
    (src / "README.md").chmod(0o600)
    second = tar_tree.build_release(src, tmp_path / "b", git=False)
    assert first.sha256 == second.sha256
    assert first.release_id == second.release_id == first.sha256[:16]
    (src / "decnet" / "__init__.py").write_text("__version__ = '10'\n")
    assert tar_tree.build_release(src, tmp_path / "c", git=False).sha256 != first.sha256


def test_the_git_commit_is_recorded(tmp_path):
    import shutil

    src = make_tree(tmp_path / "src")
    shutil.rmtree(src / ".git")  # the fake one
    git = ["git", "-C", str(src), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "setup.cfg", "decnet/__init__.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    sha = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    built = tar_tree.build_release(src, tmp_path / "out")
    assert built.git_sha == sha.strip() and built.git_dirty is False
    with open(built.path, "rb") as fh:
        info = archive.inspect(fh).build_info
    assert info["git_sha"] == built.git_sha
    (src / "setup.cfg").write_text("changed\n")
    assert tar_tree.build_release(src, tmp_path / "out2").git_dirty is True


def test_a_wheelhouse_ships_only_its_wheels(tmp_path):
    src = make_tree(tmp_path / "src")
    wh = tmp_path / "wh"
    wh.mkdir()
    (wh / "attrs-1-py3-none-any.whl").write_bytes(b"PK")
    (wh / "index.html").write_text("no")
    built = tar_tree.build_release(src, tmp_path / "out", wheelhouse=wh, git=False)
    assert "wheelhouse/attrs-1-py3-none-any.whl" in built.files
    assert not any("index.html" in f for f in built.files)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"no \.whl"):
        tar_tree.build_release(src, tmp_path / "o2", wheelhouse=empty, git=False)


def test_a_tree_that_is_not_decnet_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="not a DECNET source tree"):
        tar_tree.build_release(tmp_path, tmp_path / "out", git=False)


def test_the_repository_itself_passes_the_updaters_checks(tmp_path):
    from tests.support import REPO_ROOT

    built = tar_tree.build_release(REPO_ROOT, tmp_path)
    with open(built.path, "rb") as fh:
        summary = archive.inspect(fh)
    assert summary.has_project and not summary.has_wheelhouse
    assert "decnet/updater/engine.py" in built.files
    assert "twisted/plugins/decnet_plugins.py" in built.files
    assert not any(f.startswith(("tests/", ".")) or f.endswith(".key") for f in built.files)


def test_what_is_left_out_is_listed_with_its_reason_but_compiled_files_are_not(tmp_path):
    root = tmp_path / "src"
    for name in ("decnet/sub/x.py", "decnet/sub/__pycache__/x.pyc", "decnet/a.pyc", "setup.cfg"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("x")
    (root / "decnet" / "build").mkdir()
    (root / "LICENSE").mkdir()
    os.mkfifo(root / "decnet" / "fifo.py")
    (root / "twisted").mkdir()
    os.symlink("/etc", root / "twisted" / "plugins")
    wheelhouse = tmp_path / "wh"
    wheelhouse.mkdir()
    (wheelhouse / "a-1-py3-none-any.whl").write_text("PK")
    (wheelhouse / "notes.txt").write_text("")
    os.symlink("/etc/passwd", wheelhouse / "b-1-py3-none-any.whl")

    files, skipped = tar_tree.collect(root, wheelhouse)
    assert [name for name, _ in files] == [
        "decnet/sub/x.py",
        "setup.cfg",
        "wheelhouse/a-1-py3-none-any.whl",
    ]
    link = "symbolic link (never followed)"
    assert [(s.path, s.reason) for s in skipped] == [
        ("LICENSE", "not a regular file"),
        ("decnet/build/", "excluded name (build)"),
        ("decnet/fifo.py", "not a regular file"),
        ("twisted/plugins", link),
        ("wheelhouse/b-1-py3-none-any.whl", link),
    ]
