"""decnet-admin listeners add|remove|list and enroll --listener, through the console script."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess

import attrs
import pytest

from decnet import config, pki
from decnet.cli.main import main
from decnet.master import enrollment
from decnet.master.listeners import read_listeners
from tests.listeners_support import own_master_home
from tests.support import BIN

ADMIN = str(BIN / "decnet-admin")


@attrs.frozen
class Result:
    returncode: int
    stdout: str
    stderr: str


def admin(home, *args, check=None) -> Result:
    """``decnet-admin --home HOME ARGS`` in this process (the console script's own ``main``);
    the race test below runs the real script in parallel processes."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(["--home", str(home), *args])
        except SystemExit as exc:
            code = int(exc.code or 0)
    result = Result(code, out.getvalue(), err.getvalue())
    if check is not None:
        assert result.returncode == check, result
    return result


@pytest.fixture
def paths(master_home, tmp_path) -> config.MasterPaths:
    """A master home of its own (the session's CA and identities, copied: no keygen)."""
    return own_master_home(master_home, tmp_path)


def test_add_remove_and_list_keep_an_ordered_list_in_the_master_state(paths):
    home = paths.home
    assert json.loads(admin(home, "listeners", "list", "--json", check=0).stdout) == {
        "listeners": []
    }
    admin(home, "listeners", "add", "10.0.0.5:6514", check=0)
    admin(home, "listeners", "add", "Log-B.Example:6514", check=0)
    added = admin(home, "listeners", "add", "[2001:db8::5]:7000", "--position", "0", "--json")
    assert json.loads(added.stdout) == {
        "changed": True,
        "listeners": ["[2001:db8::5]:7000", "10.0.0.5:6514", "log-b.example:6514"],
    }
    again = admin(home, "listeners", "add", "10.0.0.5:6514", "--json", check=0)
    assert json.loads(again.stdout)["changed"] is False
    admin(home, "listeners", "remove", "10.0.0.5:6514", check=0)
    listed = admin(home, "listeners", "list", check=0).stdout
    assert "[2001:db8::5]:7000" in listed and "log-b.example:6514" in listed
    assert "10.0.0.5" not in listed
    assert read_listeners(paths) == ["[2001:db8::5]:7000", "log-b.example:6514"]


@pytest.mark.parametrize(
    "typo", ["10.0.0.5", "10.0.0.5:99999", "10.0.0.5:", "2001:db8::5:6514", "log b:6514"]
)
def test_a_typo_in_host_port_is_a_usage_error_and_changes_nothing(paths, typo):
    result = admin(paths.home, "listeners", "add", typo)
    assert result.returncode == 2
    assert "HOST:PORT" in result.stderr and "usage:" in result.stderr
    assert not paths.listeners.exists()


def test_removing_a_listener_that_is_not_listed_says_what_is(paths):
    admin(paths.home, "listeners", "add", "10.0.0.5:6514", check=0)
    result = admin(paths.home, "listeners", "remove", "10.0.0.6:6514", "--json")
    assert result.returncode == 1
    assert "not in the list (listed: 10.0.0.5:6514)" in result.stderr
    assert json.loads(result.stdout)["problems"]


def test_two_operators_adding_at_once_both_keep_their_edit(paths):
    procs = [
        subprocess.Popen(
            [ADMIN, "--home", str(paths.home), "listeners", "add", f"10.0.0.{i}:6514"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for i in range(1, 11)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0] * 10
    for p in procs:
        p.stderr.close()
    assert sorted(read_listeners(paths)) == sorted(f"10.0.0.{i}:6514" for i in range(1, 11))


def test_a_corrupt_listener_file_is_reported_not_overwritten(paths):
    paths.listeners.write_text('{"listeners": ["10.0.0.5:6514", "10.0.0.5:6514"]}')
    result = admin(paths.home, "listeners", "add", "10.0.0.6:6514")
    assert result.returncode == 1 and "listed twice" in result.stderr
    assert "10.0.0.6" not in paths.listeners.read_text()


def test_enroll_listener_writes_an_ordered_list_into_the_bundle(paths, tmp_path):
    out = tmp_path / "w1"
    args = ["enroll", "w1", "--address", "10.0.1.1", "--out", str(out)]
    result = admin(
        paths.home, *args, "--listener", "10.0.0.6:6514", "--listener", "10.0.0.5:6514", check=0
    )
    assert "10.0.0.6:6514, 10.0.0.5:6514" in result.stdout
    settings = json.loads((out / config.BUNDLE_CONFIG).read_text())
    assert settings["listeners"] == ["10.0.0.6:6514", "10.0.0.5:6514"]
    assert pki.WorkerBundle.load(out).listeners == [("10.0.0.6", 6514), ("10.0.0.5", 6514)]


def test_enroll_without_listener_takes_the_master_list_else_the_master_alone(paths, tmp_path):
    master = enrollment.load_master(paths)
    plain = enrollment.enroll(master, "w2", "10.0.1.2", tmp_path / "w2").bundle_dir
    assert "listeners" not in json.loads((plain / config.BUNDLE_CONFIG).read_text())
    assert pki.WorkerBundle.load(plain).listeners == [(master.master_host, config.syslog_port())]
    admin(paths.home, "listeners", "add", "10.0.0.7:6514", check=0)
    listed = enrollment.enroll(master, "w3", "10.0.1.3", tmp_path / "w3").bundle_dir
    assert pki.WorkerBundle.load(listed).listeners == [("10.0.0.7", 6514)]


def test_enroll_with_a_duplicate_listener_is_refused_and_writes_nothing(paths, tmp_path):
    out = tmp_path / "w4"
    args = ["enroll", "w4", "--address", "10.0.1.4", "--out", str(out)]
    result = admin(paths.home, *args, "--listener", "10.0.0.5:6514", "--listener", "10.0.0.5:6514")
    assert result.returncode == 1 and "listed twice" in result.stderr
    assert not out.exists()
    assert "w4" not in admin(paths.home, "hosts", check=0).stdout


@pytest.mark.parametrize("action", ["add", "remove", "list"])
def test_every_listeners_action_has_help_with_examples(action):
    result = subprocess.run(
        [ADMIN, "listeners", action, "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert "examples:" in result.stdout and "decnet-admin listeners" in result.stdout


def _forwarder_options(bundle, *argv, env=None):
    from decnet.forwarder import tap

    options = tap.Options()
    with pytest.MonkeyPatch.context() as mp:
        for name in (config.ENV_MASTER_HOST, config.ENV_SYSLOG_PORT):
            mp.delenv(name, raising=False)
        for name, value in (env or {}).items():
            mp.setenv(name, value)
        options.parseOptions(["--bundle", str(bundle), *argv])
    return options


def test_the_forwarder_ships_to_the_bundle_list_unless_given_one_master(paths, tmp_path):
    master = enrollment.load_master(paths)
    listed = ["10.0.0.6:6514", "10.0.0.5:6514"]
    out = enrollment.enroll(master, "fw1", "10.0.1.1", tmp_path / "b", listeners=listed)
    bundle = out.bundle_dir
    options = _forwarder_options(bundle)
    assert options["listeners"] == [("10.0.0.6", 6514), ("10.0.0.5", 6514)]
    assert options["bundle-dir"] == bundle  # followed for `bundle refresh`
    options = _forwarder_options(bundle, "--master-host", "10.9.9.9", "--master-port", "7000")
    assert options["listeners"] == [("10.9.9.9", 7000)]
    assert "bundle-dir" not in options
    options = _forwarder_options(bundle, env={config.ENV_MASTER_HOST: "10.8.8.8"})
    assert options["listeners"] == [("10.8.8.8", config.syslog_port())]


def test_an_old_bundle_ships_to_its_master_as_before(paths, tmp_path):
    master = enrollment.load_master(paths)
    bundle = enrollment.enroll(master, "fw2", "10.0.1.2", tmp_path / "b").bundle_dir
    options = _forwarder_options(bundle)
    assert options["listeners"] == [(master.master_host, config.syslog_port())]


def test_a_full_disk_leaves_the_old_list_and_says_so(paths, monkeypatch):
    import errno

    from decnet.master import listeners

    admin(paths.home, "listeners", "add", "10.0.0.5:6514", check=0)

    def full(path, data, mode=0o644):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(listeners, "atomic_write", full)
    result = admin(paths.home, "listeners", "add", "10.0.0.6:6514", "--json")
    assert result.returncode == 1
    assert "No space left on device" in result.stderr and "unchanged" in result.stderr
    assert json.loads(result.stdout)["problems"]
    assert read_listeners(paths) == ["10.0.0.5:6514"]
