"""The production units in contrib/systemd: systemd accepts them, and they say what we mean."""

import importlib
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNITS = sorted((REPO / "contrib" / "systemd").glob("decnet-*.*"))
SERVICES = [u for u in UNITS if u.suffix == ".service"]
TAPS = {
    "decnet-agent": "decnet.agent.tap",
    "decnet-updater": "decnet.updater.tap",
    "decnet-forwarder": "decnet.forwarder.tap",
    "decnet-listener": "decnet.listener.tap",
}


def directives(unit: Path) -> dict[str, list[str]]:
    """``key -> [values]`` with continuation lines joined; comments dropped."""
    out: dict[str, list[str]] = {}
    logical = ""
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith(("#", ";", "["))):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        key, _, value = logical.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
        logical = ""
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A filesystem root holding systemd's own units, our units and stand-in executables."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is required (Debian package systemd; .ci/run installs it)"
    root = tmp_path_factory.mktemp("root")
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    target = root / "etc/systemd/system"
    target.mkdir(parents=True)
    for unit in UNITS:
        shutil.copy(unit, target / unit.name)
        for key in ("ExecStart", "ExecReload"):
            for command in directives(unit).get(key, []):
                program = Path(shlex.split(command.lstrip("-@:+!"))[0])
                stand_in = root / program.relative_to("/")
                stand_in.parent.mkdir(parents=True, exist_ok=True)
                stand_in.write_text("#!/bin/sh\n")
                stand_in.chmod(0o755)
    return root


def test_every_daemon_has_a_unit():
    assert {u.stem for u in SERVICES} == set(TAPS)


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_systemd_analyze_verify_accepts_the_unit_without_a_single_warning(root, unit):
    installed = root / "etc/systemd/system" / unit.name
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"--root={root}", str(installed)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        result.stdout + result.stderr
    )


@pytest.mark.parametrize("unit", SERVICES, ids=lambda u: u.name)
def test_units_are_notify_watchdogged_hardened_and_run_twistd_in_the_foreground(unit):
    d = directives(unit)
    assert d["Type"] == ["notify"] and d["NotifyAccess"] == ["main"]
    assert d["WatchdogSec"] and d["Restart"][0] in ("on-failure", "always")
    assert d["User"] == ["decnet"]
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectHome"):
        assert d[key] == ["yes"], key
    assert d["ProtectSystem"] == ["strict"]
    argv = shlex.split(d["ExecStart"][0])
    assert Path(argv[0]).name == "twistd"
    assert argv[1:3] == ["--nodaemon", "--pidfile="]
    assert unit.stem in argv
    capabilities = d["CapabilityBoundingSet"]
    if unit.stem == "decnet-agent":
        assert capabilities == ["CAP_NET_BIND_SERVICE"]
        assert d["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    else:
        assert capabilities == [""]


@pytest.mark.parametrize("unit", SERVICES, ids=lambda u: u.name)
def test_the_unit_passes_only_options_its_daemon_knows(unit, monkeypatch):
    argv = shlex.split(directives(unit)["ExecStart"][0])
    plugin = argv.index(unit.stem)
    options_class = importlib.import_module(TAPS[unit.stem]).Options
    # The files named (bundle, home) do not exist here; the option names must.
    monkeypatch.setattr(options_class, "postOptions", lambda self: None)
    options_class().parseOptions(argv[plugin + 1 :])


def test_the_agent_and_the_forwarder_agree_on_the_log_file():
    def option(unit, name):
        argv = shlex.split(directives(REPO / "contrib/systemd" / unit)["ExecStart"][0])
        return argv[argv.index(name) + 1]

    assert option("decnet-agent.service", "--log-file") == option(
        "decnet-forwarder.service", "--log-file"
    )
