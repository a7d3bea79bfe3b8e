"""Unpacking wheels instead of running pip: the plan (pure), the refusals, and the same
installed files as pip, byte for byte, for a real wheel of the release's dependency set."""

import base64
import csv
import hashlib
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor

from decnet.errors import InstallFailed, WheelRefused, WheelUnsupported
from decnet.threads import pool_runner
from decnet.updater import wheelinstall as wi
from decnet.updater.installer import Installer, create_venv, site_packages

WHEEL = "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
INFO = "demo-1.0.dist-info"


def names(*extra: str) -> list[str]:
    return [f"{INFO}/WHEEL", f"{INFO}/METADATA", f"{INFO}/RECORD", *extra]


def test_the_plan_puts_members_and_purelib_data_into_site_packages():
    plan = wi.plan_wheel(
        names("demo/__init__.py", "demo/sub/", "demo-1.0.data/platlib/_demo.so"),
        WHEEL,
        "[console_scripts]\ndemo = demo.cli:main\n",
    )
    assert plan.dist_info == INFO
    assert ("demo/__init__.py", "demo/__init__.py") in plan.files
    assert ("demo-1.0.data/platlib/_demo.so", "_demo.so") in plan.files
    assert not any(name.endswith("/") for name, _ in plan.files)  # directory entries
    assert plan.scripts == (wi.ConsoleScript("demo", "demo.cli", "main"),)


@pytest.mark.parametrize(
    "member",
    ["../evil.py", "/etc/passwd", "demo/../../x.py", "demo\\..\\x.py", "demo//x.py", "./x.py"],
)
def test_an_unsafe_member_name_is_refused(member):
    with pytest.raises(WheelRefused, match="wheel member"):
        wi.plan_wheel(names(member), WHEEL, None)


def test_a_member_listed_twice_or_two_members_with_one_target_are_refused():
    with pytest.raises(WheelRefused, match="appears twice"):
        wi.plan_wheel(names("demo/a.py", "demo/a.py"), WHEEL, None)
    with pytest.raises(WheelRefused, match="install as"):
        wi.plan_wheel(names("demo/a.py", "demo-1.0.data/purelib/demo/a.py"), WHEEL, None)


def test_what_only_pip_installs_is_left_to_pip():
    with pytest.raises(WheelUnsupported, match="scripts"):
        wi.plan_wheel(names("demo-1.0.data/scripts/run.sh"), WHEEL, None)
    with pytest.raises(WheelUnsupported, match="headers"):
        wi.plan_wheel(names("demo-1.0.data/headers/demo.h"), WHEEL, None)
    with pytest.raises(WheelUnsupported, match="Wheel-Version"):
        wi.plan_wheel(names(), WHEEL.replace("1.0", "2.0"), None)
    assert issubclass(WheelUnsupported, InstallFailed) and issubclass(WheelRefused, InstallFailed)


def test_a_wheel_needs_exactly_one_dist_info():
    with pytest.raises(WheelRefused, match="exactly one"):
        wi.plan_wheel(["demo/__init__.py"], WHEEL, None)
    with pytest.raises(WheelRefused, match="exactly one"):
        wi.plan_wheel([*names(), "other-2.dist-info/WHEEL"], WHEEL, None)


@pytest.mark.parametrize(
    "entry",
    [
        "evil = os;system('id'):main",
        "../../bin/sh = demo:main",
        "demo = demo:main()",
        "demo = demo:",
    ],
)
def test_an_unsafe_console_script_is_refused(entry):
    with pytest.raises(WheelRefused, match="entry point"):
        wi.console_scripts(f"[console_scripts]\n{entry}\n")


def test_console_scripts_are_written_as_pip_writes_them():
    script = wi.ConsoleScript("twistd", "twisted.scripts.twistd", "run")
    assert wi.script_bytes(b"/opt/v/bin/python", script) == (
        b"#!/opt/v/bin/python\n"
        b"import sys\n"
        b"from twisted.scripts.twistd import run\n"
        b"if __name__ == '__main__':\n"
        b"    sys.argv[0] = sys.argv[0].removesuffix('.exe')\n"
        b"    sys.exit(run())\n"
    )
    dotted = wi.ConsoleScript("x", "pkg.mod", "Cls.main")
    assert "from pkg.mod import Cls\n" in dotted.text() and "sys.exit(Cls.main())" in dotted.text()


def record_of(files: dict[str, bytes]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        writer.writerow((name, f"sha256={digest}", len(data)))
    writer.writerow((f"{INFO}/RECORD", "", ""))
    return out.getvalue()


def make_wheel(path: Path, files: dict[str, bytes], *, record: dict[str, bytes] | None = None):
    files = {
        **files,
        f"{INFO}/WHEEL": WHEEL.encode(),
        f"{INFO}/METADATA": b"Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n",
        f"{INFO}/entry_points.txt": b"[console_scripts]\ndemo-hello = demo:hello\n",
    }
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(f"{INFO}/RECORD", record_of(record or files))
    return path


def test_an_unpacked_wheel_runs_its_console_script_and_records_what_was_installed(tmp_path):
    venv = tmp_path / "venv"
    create_venv(venv)
    wheel = make_wheel(
        tmp_path / "demo-1.0-py3-none-any.whl",
        {"demo/__init__.py": b"def hello():\n    print('hello from demo')\n"},
    )
    wi.unpack_wheel(wheel, site_packages(venv), venv / "bin", venv / "bin" / "python")
    run = subprocess.run([str(venv / "bin" / "demo-hello")], capture_output=True, text=True)
    assert run.stdout == "hello from demo\n", run.stderr
    site = site_packages(venv)
    record = (site / INFO / "RECORD").read_text()
    assert "../../../bin/demo-hello,sha256=" in record and f"{INFO}/INSTALLER,sha256=" in record
    assert (site / INFO / "INSTALLER").read_text() == f"{wi.INSTALLER_NAME}\n"


def test_a_member_that_does_not_match_its_record_hash_is_refused(tmp_path):
    site, bin_dir = tmp_path / "site", tmp_path / "bin"
    site.mkdir(), bin_dir.mkdir()
    wheel = make_wheel(
        tmp_path / "demo-1.0-py3-none-any.whl",
        {"demo/__init__.py": b"import os; os.system('id')\n"},
        record={"demo/__init__.py": b"harmless = True\n"},
    )
    with pytest.raises(WheelRefused, match="does not match its RECORD hash"):
        wi.unpack_wheel(wheel, site, bin_dir, bin_dir / "python")
    assert not list(bin_dir.iterdir())  # no console script of a refused wheel


def test_a_file_another_wheel_already_installed_leaves_the_set_to_pip(tmp_path):
    site, bin_dir = tmp_path / "site", tmp_path / "bin"
    site.mkdir(), bin_dir.mkdir()
    (site / "demo").mkdir()
    (site / "demo" / "__init__.py").write_text("# someone else's\n")
    wheel = make_wheel(tmp_path / "demo-1.0-py3-none-any.whl", {"demo/__init__.py": b"x = 1\n"})
    with pytest.raises(WheelUnsupported, match="exists already"):
        wi.unpack_wheel(wheel, site, bin_dir, bin_dir / "python")
    assert (site / "demo" / "__init__.py").read_text() == "# someone else's\n"


def test_a_symlinked_directory_in_site_packages_is_never_followed(tmp_path):
    site, bin_dir, elsewhere = tmp_path / "site", tmp_path / "bin", tmp_path / "elsewhere"
    for d in (site, bin_dir, elsewhere):
        d.mkdir()
    (site / "demo").symlink_to(elsewhere)
    wheel = make_wheel(tmp_path / "demo-1.0-py3-none-any.whl", {"demo/__init__.py": b"x = 1\n"})
    with pytest.raises(WheelRefused, match="not a directory"):
        wi.unpack_wheel(wheel, site, bin_dir, bin_dir / "python")
    assert not list(elsewhere.iterdir())


PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
OFFLINE = ["--no-index", "--no-deps", "--no-compile"]


def scripts(venv: Path) -> dict[str, bytes]:
    """The console scripts in ``venv/bin`` (not the venv's own activate scripts)."""
    found = {}
    for path in (venv / "bin").iterdir():
        if path.is_file() and not path.is_symlink() and not path.name.startswith("activate"):
            found[path.name] = path.read_bytes()
    return found


def installed_files(site: Path) -> dict[str, bytes]:
    skipped = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}
    found = {}
    for path in site.rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts and path.name not in skipped:
            found[path.relative_to(site).as_posix()] = path.read_bytes()
    return found


@pytest.mark.slow
def test_unpacking_installs_the_same_files_as_pip_for_a_real_wheel(tmp_path, wheelhouse):
    """twisted: ~1000 files, console scripts, namespace-like plugin directory."""
    wheel = next(Path(wheelhouse).glob("twisted-*.whl"))
    ours, pips = tmp_path / "ours", tmp_path / "pips"
    create_venv(ours)
    create_venv(pips)
    wi.unpack_wheel(wheel, site_packages(ours), ours / "bin", ours / "bin" / "python")
    subprocess.run(
        [*PIP, "--python", str(pips / "bin" / "python"), "install", *OFFLINE, str(wheel)],
        check=True,
        capture_output=True,
        env={**os.environ, "PIP_NO_INPUT": "1"},
    )
    assert installed_files(site_packages(ours)) == installed_files(site_packages(pips))
    ours_bin, pips_bin = scripts(ours), scripts(pips)
    assert set(ours_bin) == set(pips_bin) and "twistd" in ours_bin
    for name, body in pips_bin.items():
        assert ours_bin[name] == body.replace(str(pips).encode(), str(ours).encode()), name


@pytest_twisted.ensureDeferred
async def test_a_dependency_environment_is_unpacked_and_byte_compiled_without_pip(tmp_path):
    files = {"demo/__init__.py": b"x = 1\n", "demo/tests/test_demo.py": b"y = 2\n"}
    wheel = make_wheel(tmp_path / "demo-1.0-py3-none-any.whl", files)
    env = tmp_path / "tests" / "env"  # a "tests" directory above site-packages is no test suite
    env.mkdir(parents=True)
    installer = Installer(reactor, compile_bytecode=False, to_thread=pool_runner(reactor))
    output = await installer.build_deps(env, [wheel])
    assert "unpacked 1 wheel(s)" in output and " pip " not in output
    site = site_packages(env)
    assert list((site / "demo" / "__pycache__").glob("__init__.*.pyc"))  # always compiled
    assert (site / "demo" / "tests" / "test_demo.py").exists()
    assert not (site / "demo" / "tests" / "__pycache__").exists()  # its test suite is not
    assert (env / "bin" / "demo-hello").read_bytes().startswith(f"#!{env}/bin/python\n".encode())


@pytest_twisted.ensureDeferred
async def test_a_wheel_only_pip_installs_makes_pip_build_the_whole_environment(tmp_path):
    plain = make_wheel(tmp_path / "demo-1.0-py3-none-any.whl", {"demo/__init__.py": b"x = 1\n"})
    info = "other-2.0.dist-info"
    other = tmp_path / "other-2.0-py3-none-any.whl"
    files = {
        "other/__init__.py": b"",
        "other-2.0.data/scripts/other-run": b"#!python\nprint('run')\n",
        f"{info}/WHEEL": WHEEL.encode(),
        f"{info}/METADATA": b"Metadata-Version: 2.1\nName: other\nVersion: 2.0\n",
    }
    with zipfile.ZipFile(other, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(f"{info}/RECORD", record_of(files).replace(INFO, info))
    env = tmp_path / "env"
    env.mkdir()
    installer = Installer(reactor, to_thread=pool_runner(reactor))
    output = await installer.build_deps(env, [plain, other])
    assert " -m pip --python " in output and "unpacked" not in output
    assert (env / "bin" / "other-run").read_text().startswith(f"#!{env}/bin/python")
    assert (env / "bin" / "demo-hello").exists()  # pip installed both, from an empty env


def test_only_test_suites_below_site_packages_are_left_uncompiled():
    import re

    site = "/srv/tests/install/deps/x/lib/python3.11/site-packages"
    skip = re.compile(wi.suite_dirs_pattern(site))
    assert skip.search(f"{site}/twisted/test/test_tcp.py")
    assert skip.search(f"{site}/twisted/internet/test/test_tcp.py")
    assert skip.search(f"{site}/nacl/tests/a.py")
    assert not skip.search(f"{site}/twisted/internet/tcp.py")
    assert not skip.search(f"{site}/attestation/tests_helper.py")
    assert not skip.search(f"{site}/twisted/trial/runner.py")


@pytest_twisted.ensureDeferred
async def test_an_updater_release_gets_pip_unpacked_from_the_bundled_wheels(tmp_path):
    """update-self: the new updater's venv needs pip; ensurepip's own wheels, unpacked."""
    from decnet.updater.installer import bundled_wheels

    if not bundled_wheels():
        pytest.skip("this Python ships no bundled pip wheel")
    deps = tmp_path / "deps"
    create_venv(deps)
    release = tmp_path / "release"
    release.mkdir()
    wheel = make_wheel(tmp_path / "demo-1.0-py3-none-any.whl", {"demo/__init__.py": b"x = 1\n"})
    installer = Installer(reactor, compile_bytecode=False, to_thread=pool_runner(reactor))
    output = await installer.install_wheel(
        release, site_packages(deps), deps / "bin", wheel, with_pip=True
    )
    assert "unpacked 3 wheel(s)" in output and " -m pip " not in output
    python = release / "venv" / "bin" / "python"
    version = subprocess.run([str(python), "-m", "pip", "--version"], capture_output=True)
    assert version.returncode == 0 and str(release / "venv") in version.stdout.decode()
    assert (release / "venv" / "bin" / "pip").exists()
