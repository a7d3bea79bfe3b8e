"""Every ``tap.py`` in one shape: identity loaded in ``postOptions``, keys spelled alike,
``--port-file`` wherever a daemon listens."""

import re
import shutil
import subprocess

import pytest
from twisted.python import usage

from decnet import config
from decnet.agent import tap as agent_tap
from decnet.forwarder import tap as forwarder_tap
from decnet.listener import tap as listener_tap
from decnet.master import enrollment
from decnet.updater import tap as updater_tap
from tests.support import BIN

WORKER_TAPS = {
    "agent": (agent_tap, config.ROLE_WORKER),
    "forwarder": (forwarder_tap, config.ROLE_WORKER),
    "updater": (updater_tap, config.ROLE_UPDATER),
}


@pytest.fixture(scope="module")
def bundles(master_home, tmp_path_factory):
    base = tmp_path_factory.mktemp("taps")
    master = enrollment.load_master(master_home)
    for name in ("taps-a", "taps-b"):
        enrollment.enroll(master, name, "127.0.0.1", base / name, updater=True)
    return base


def parse(tap, *argv) -> usage.Options:
    options = tap.Options()
    options.parseOptions(list(argv))
    return options


def spoiled(bundles, tmp_path, role, how) -> str:
    """A copy of taps-a's bundle with its ``role`` identity spoiled ``how``."""
    bundle = tmp_path / "spoiled"
    shutil.copytree(bundles / "taps-a", bundle)
    if how == "garbage key":
        key = bundle / f"{role}.key"
        key.write_bytes(key.read_bytes()[:60] + b"\nnot a key\n")  # the minted key, spoiled
    elif how == "another host's certificate":
        shutil.copy(bundles / "taps-b" / f"{role}.crt", bundle / f"{role}.crt")
        shutil.copy(bundles / "taps-b" / f"{role}.key", bundle / f"{role}.key")
    elif how == "the other role's certificate":
        other = config.ROLE_WORKER if role == config.ROLE_UPDATER else config.ROLE_UPDATER
        shutil.copy(bundle / f"{other}.crt", bundle / f"{role}.crt")
        shutil.copy(bundle / f"{other}.key", bundle / f"{role}.key")
    return str(bundle)


@pytest.mark.parametrize("daemon", sorted(WORKER_TAPS))
@pytest.mark.parametrize(
    "how, why",
    [
        ("garbage key", "unusable bundle: .*key"),
        ("another host's certificate", "is not the (worker|updater) certificate of 'taps-a'"),
        ("the other role's certificate", "is not the (worker|updater) certificate of 'taps-a'"),
    ],
)
def test_a_bundle_whose_identity_cannot_be_used_is_a_usage_error_of_every_worker_daemon(
    bundles, tmp_path, daemon, how, why
):
    tap, role = WORKER_TAPS[daemon]
    with pytest.raises(usage.UsageError, match=why):
        parse(tap, "--bundle", spoiled(bundles, tmp_path, role, how))


@pytest.mark.parametrize("daemon", ["forwarder", "updater"])
def test_a_bad_bundle_stops_twistd_with_one_line_and_no_traceback(bundles, tmp_path, daemon):
    _tap, role = WORKER_TAPS[daemon]
    result = subprocess.run(
        [
            *(str(BIN / "twistd"), "--nodaemon", "--pidfile=", f"decnet-{daemon}"),
            *("--bundle", spoiled(bundles, tmp_path, role, "garbage key")),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "unusable bundle" in output and "Traceback" not in output, output


def test_a_corrupt_revocation_list_is_a_usage_error_of_the_listener(master_home, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(master_home.home, home)
    config.MasterPaths.resolve(home).revocations.write_text("{not json")
    with pytest.raises(usage.UsageError, match="revoked"):
        parse(listener_tap, "--home", str(home))


def _argv(daemon, bundles, master_home) -> list[str]:
    if daemon == "listener":
        return ["--home", str(master_home.home)]
    extra = ["--master-host", "127.0.0.1"] if daemon == "forwarder" else []
    return ["--bundle", str(bundles / "taps-a"), *extra]


TAPS = {"listener": listener_tap, **{name: tap for name, (tap, _role) in WORKER_TAPS.items()}}


@pytest.mark.parametrize("daemon", sorted(TAPS))
def test_every_tap_names_what_it_derives_the_way_its_options_are_spelled(
    bundles, master_home, daemon
):
    options = parse(TAPS[daemon], *_argv(daemon, bundles, master_home))
    assert [key for key in options if not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", key)] == []
    assert options["identity"].identity.role in config.ROLES


@pytest.mark.parametrize("daemon", ["agent", "listener", "updater"])
def test_every_daemon_that_listens_takes_the_same_port_file_option(
    bundles, master_home, daemon, tmp_path, monkeypatch
):
    """The forwarder only connects out: it has no port to tell."""
    monkeypatch.chdir(tmp_path)
    argv = [*_argv(daemon, bundles, master_home), "--port-file", "run/port"]
    assert parse(TAPS[daemon], *argv)["port-file"] == tmp_path / "run" / "port"


def test_the_updater_writes_the_port_it_bound_to_its_port_file(bundles, tmp_path):
    port_file = tmp_path / "updater.port"
    options = parse(
        updater_tap,
        "--bundle",
        str(bundles / "taps-a"),
        "--install-dir",
        str(tmp_path / "install"),
        "--listen",
        "tcp:0:interface=127.0.0.1",
        "--port-file",
        str(port_file),
    )
    service = updater_tap.makeService(options)
    service.port_service.privilegedStartService()
    try:
        assert int(port_file.read_text()) == service.port.getHost().port != 0
    finally:
        service.port_service.stopService()


@pytest.mark.parametrize("daemon", sorted(TAPS))
def test_every_tap_builds_its_service_from_what_postoptions_left(
    bundles, master_home, daemon, tmp_path
):
    from twisted.application.service import IService

    places = {
        "agent": ["--state-dir", str(tmp_path / "s"), "--log-file", str(tmp_path / "d.log")],
        "forwarder": ["--state", str(tmp_path / "f.sqlite"), "--log-file", str(tmp_path / "d.log")],
        "listener": ["--ingest-dir", str(tmp_path / "ingest"), "--no-feed"],
        "updater": ["--install-dir", str(tmp_path / "install")],
    }
    argv = [*_argv(daemon, bundles, master_home), *places[daemon]]
    assert IService.providedBy(TAPS[daemon].makeService(parse(TAPS[daemon], *argv)))
