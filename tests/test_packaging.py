"""The wheel ships our plugin file without shadowing Twisted, and twistd finds every daemon."""

import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DAEMONS = ["decnet-agent", "decnet-updater", "decnet-forwarder", "decnet-listener", "decnet-enroll"]

pytestmark = pytest.mark.slow


def project_copy(dest: Path) -> Path:
    """Copy the project's files (tracked or new, never ignored ones) to ``dest``."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for raw in filter(None, files):
        rel = raw.decode()
        if not (REPO / rel).is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest / rel)
    return dest


def pip(*args, cwd=None):
    subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
        check=True,
        cwd=cwd,
        capture_output=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = project_copy(tmp_path_factory.mktemp("src"))
    out = tmp_path_factory.mktemp("dist")
    pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(src))
    (built,) = out.glob("*.whl")
    return built


def test_the_wheel_ships_the_plugin_but_never_a_twisted_package(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "twisted/plugins/decnet_plugins.py" in names
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names
    assert not [n for n in names if n.startswith("twisted/") and n.endswith("__init__.py")]
    assert "decnet/__init__.py" in names and "decnet/tls.py" in names
    assert not [n for n in names if n.endswith((".key", ".pem", ".sqlite", "dropin.cache"))]
    assert not [n for n in names if n.startswith("tests/")]
    # Every module of every package of the checkout is in the wheel (setup.cfg lists packages).
    modules = {str(p.relative_to(REPO)) for p in (REPO / "decnet").rglob("*.py")}
    assert not sorted(modules - names), "add the package to setup.cfg's packages"


def test_the_repository_has_no_twisted_package_files():
    assert not (REPO / "twisted" / "__init__.py").exists()
    assert not (REPO / "twisted" / "plugins" / "__init__.py").exists()


def fresh_venv(path: Path) -> Path:
    """A new venv that sees this test run's dependencies but not its decnet install.

    Sharing dependencies through a .pth line keeps the test fast and offline;
    .pth files inside that shared directory (such as an editable decnet
    install) are not processed, so decnet is only visible if installed here.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "_decnet_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def twistd_help(python: Path, cwd: Path, *plugin: str) -> str:
    result = subprocess.run(
        [str(python), "-c", "from twisted.scripts.twistd import run; run()", *plugin, "--help"],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def assert_daemons_available(python: Path, cwd: Path) -> None:
    """twistd lists all four daemons, and each one whose tap exists loads its options."""
    listed = twistd_help(python, cwd)
    for daemon in DAEMONS:
        assert daemon in listed
        if (REPO / "decnet" / daemon.split("-")[1] / "tap.py").exists():
            assert "Usage:" in twistd_help(python, cwd, daemon)


def test_twistd_lists_every_daemon_after_pip_install(wheel, tmp_path):
    python = fresh_venv(tmp_path / "venv")
    assert "decnet-agent" not in twistd_help(python, tmp_path)  # not installed yet
    pip("--python", str(python), "install", "--no-deps", str(wheel))
    assert_daemons_available(python, tmp_path)


def test_twistd_lists_every_daemon_after_an_editable_install(tmp_path):
    src = project_copy(tmp_path / "src")
    python = fresh_venv(tmp_path / "venv")
    pip("--python", str(python), "install", "--no-deps", "--no-build-isolation", "-e", str(src))
    assert_daemons_available(python, tmp_path)
    # Twisted itself is still Twisted's, not our plugin directory.
    where = subprocess.run(
        [str(python), "-c", "import twisted, twisted.plugins as p; print(twisted.__file__)"],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    ).stdout
    assert str(src) not in where


def test_make_dist_builds_a_wheel_and_an_sdist_that_ship_the_plugin_and_the_license(tmp_path):
    """Hosts install from the wheel (Operations.md): pip would build a checkout in place,
    which the installing user (decnet-updater) cannot write."""
    src = project_copy(tmp_path / "src")
    bin_dir = Path(sys.executable).parent
    subprocess.run(
        ["make", "-C", str(src), "-o", ".venv/.installed", f"BIN={bin_dir}", "dist"],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = (src / "dist").glob("decnet_swarm-*.whl")
    (sdist,) = (src / "dist").glob("decnet_swarm-*.tar.gz")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "twisted/plugins/decnet_plugins.py" in names and "twisted/__init__.py" not in names
    assert any(".dist-info/" in n and n.endswith("/LICENSE") for n in names), sorted(names)
    with tarfile.open(sdist) as tar:
        members = {m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name}
        tar.extractall(tmp_path / "unpacked", filter="data")
    assert {"LICENSE", "setup.cfg", "twisted/plugins/decnet_plugins.py"} <= members
    (unpacked,) = (tmp_path / "unpacked").iterdir()
    rebuilt = tmp_path / "rebuilt"
    pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(rebuilt), str(unpacked))
    (again,) = rebuilt.glob("*.whl")
    assert "twisted/plugins/decnet_plugins.py" in zipfile.ZipFile(again).namelist()
