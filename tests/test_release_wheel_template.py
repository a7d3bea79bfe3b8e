"""The master builds DECNET's wheel with setuptools once per metadata, then in milliseconds.

setuptools decides the wheel's name, ``.dist-info`` and member list; that template is
cached by what it depends on, and every wheel is assembled from it and the checkout's
current files, so the same tree gives the same bytes, cached or not."""

import zipfile

import pytest

from decnet.master import wheel_release
from tests.support import copy_release_tree

pytestmark = pytest.mark.slow


def test_a_code_change_reuses_the_template_and_a_metadata_change_rebuilds(tmp_path, monkeypatch):
    tree = copy_release_tree(tmp_path / "tree")
    cache = tmp_path / "cache"
    for directory in ("cache", "w0", "w1", "w2", "w3", "w4"):
        (tmp_path / directory).mkdir()
    first = wheel_release.wheel_from_checkout(tree, tmp_path / "w1", cache)
    uncached = wheel_release.wheel_from_checkout(tree, tmp_path / "w0")
    assert first.read_bytes() == uncached.read_bytes()  # the same tree, the same wheel
    assert len(list(cache.glob("wheel-template-*"))) == 1

    real = wheel_release._setuptools_wheel
    runs = []

    def counted(*args):
        runs.append(args)
        return real(*args)

    monkeypatch.setattr(wheel_release, "_setuptools_wheel", counted)
    with open(tree / "decnet" / "updater" / "deps.py", "a") as fh:
        fh.write("# a new release\n")
    second = wheel_release.wheel_from_checkout(tree, tmp_path / "w2", cache)
    assert runs == []  # the template was reused
    assert second.name == first.name and second.read_bytes() != first.read_bytes()
    with zipfile.ZipFile(second) as zf:
        assert zf.read("decnet/updater/deps.py").endswith(b"# a new release\n")
        record = zf.read(f"{first.name.split('-py3')[0]}.dist-info/RECORD").decode()
    assert "decnet/updater/deps.py,sha256=" in record

    init = tree / "decnet" / "__init__.py"
    original = init.read_text()
    init.write_text(original.replace("__version__ = ", "__version__ = '9.9.9' or "))
    assert wheel_release.template_key(tree, []) is None  # not a literal: no template
    init.write_text(original.replace(wheel_release.declared_version(original), "9.9.9"))
    third = wheel_release.wheel_from_checkout(tree, tmp_path / "w3", cache)
    assert len(runs) == 1 and "9.9.9" in third.name  # a new version: setuptools again
    (tree / "decnet" / "brand_new.py").write_text("x = 1\n")
    fourth = wheel_release.wheel_from_checkout(tree, tmp_path / "w4", cache)
    assert len(runs) == 2  # a new file: setuptools decides whether it ships
    assert "decnet/brand_new.py" in zipfile.ZipFile(fourth).namelist()


def test_the_version_is_read_only_from_a_literal():
    assert wheel_release.declared_version('"""doc"""\n__version__ = "1.2"\n') == "1.2"
    assert wheel_release.declared_version("__version__ = get()\n") is None
    assert wheel_release.declared_version("__version__ = '1'\n__version__ = '2'\n") is None
    assert wheel_release.declared_version("def (:\n") is None
