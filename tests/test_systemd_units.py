"""The production units in contrib/systemd: systemd accepts them, and they say what we mean."""

import importlib
import json
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNITS = sorted((REPO / "contrib" / "systemd").glob("decnet-*.*"))
SERVICES = [u for u in UNITS if u.suffix == ".service"]
SYSUSERS = REPO / "contrib" / "sysusers.d" / "decnet.conf"
POLKIT_RULE = REPO / "contrib" / "polkit" / "50-decnet-updater.rules"
# systemd-analyze security exposure goals (issue 9, F): lower is better, 10 is unprotected.
EXPOSURE_GOALS = {
    "decnet-agent.service": 4.0,
    "decnet-forwarder.service": 2.5,
    "decnet-listener.service": 2.5,
    "decnet-updater.service": 2.5,
    "decnet-enroll.service": 2.5,
    "decnet-sink.service": 2.5,
}
TAPS = {
    "decnet-agent": "decnet.agent.tap",
    "decnet-updater": "decnet.updater.tap",
    "decnet-forwarder": "decnet.forwarder.tap",
    "decnet-listener": "decnet.listener.tap",
    "decnet-enroll": "decnet.master.enroll_tap",
    "decnet-sink": "decnet.sink.tap",
}
# Units that run as another daemon's user, and why: decnet-enroll signs with the CA key and
# writes the registry, which is exactly what decnet-admin (the CA's owner) does.
RUNS_AS = {"decnet-enroll": "decnet-admin"}


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
    # One system user per daemon (contrib/sysusers.d/decnet.conf): no two units share one.
    assert d["User"] == [RUNS_AS.get(unit.stem, unit.stem)]
    for key in ("ProtectProc", "ProcSubset"):
        assert d[key] == [{"ProtectProc": "invisible", "ProcSubset": "pid"}[key]], key
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


def test_no_two_units_share_a_user_and_every_user_and_group_they_name_is_declared():
    declared = sysusers_entries()
    users = [directives(u)["User"][0] for u in SERVICES]
    assert len(set(users)) == len(users) == 6
    for unit in SERVICES:
        d = directives(unit)
        assert d["User"][0] in declared["u"], unit.name
        for group in [*d.get("Group", []), *" ".join(d.get("SupplementaryGroups", [])).split()]:
            # systemd-journal is the system's own group (the updater reads the agent's journal).
            assert group in declared["u"] | declared["g"] | {"systemd-journal"}, (unit, group)


def sysusers_entries() -> dict[str, set[str]]:
    kinds: dict[str, set[str]] = {"u": set(), "g": set(), "m": set()}
    for line in SYSUSERS.read_text().splitlines():
        fields = shlex.split(line, comments=True)
        if fields:
            kinds[fields[0]].add(fields[1] if fields[0] != "m" else f"{fields[1]}:{fields[2]}")
    return kinds


def test_the_agent_log_is_shared_through_a_group_the_agent_writes_and_the_forwarder_reads():
    agent = directives(REPO / "contrib/systemd/decnet-agent.service")
    forwarder = directives(REPO / "contrib/systemd/decnet-forwarder.service")
    (log_group,) = agent["Group"]
    assert agent["LogsDirectory"] == ["decnet"] and agent["LogsDirectoryMode"] == ["0750"]
    assert agent["UMask"] == ["0027"]  # the log is created 0640: group-readable, no more
    assert log_group in forwarder["SupplementaryGroups"][0].split()
    assert "-/var/log/decnet" in forwarder["ReadOnlyPaths"][0].split()  # made by the agent
    assert f"decnet-forwarder:{log_group}" in sysusers_entries()["m"]


def test_only_the_updater_unit_can_write_the_install_directory():
    for unit in SERVICES:
        d = directives(unit)
        writable = " ".join(d.get("ReadWritePaths", [])).split()
        assert d["ProtectSystem"] == ["strict"]
        assert ("/opt/decnet" in writable) == (unit.stem == "decnet-updater"), unit.name


def test_the_agent_has_a_generous_file_descriptor_limit_for_its_decoy_connection_budget():
    (limit,) = directives(REPO / "contrib/systemd/decnet-agent.service")["LimitNOFILE"]
    assert int(limit) >= 65536


def test_the_listener_unit_writes_only_ingest_and_cannot_see_the_ca_or_the_master_key():
    d = directives(REPO / "contrib/systemd/decnet-listener.service")
    assert d["StateDirectory"] == ["decnet-master/ingest"]
    hidden = d["InaccessiblePaths"][0].split()
    assert {"-/var/lib/decnet-master/ca", "-/var/lib/decnet-master/master"} <= set(hidden)


def test_systemd_analyze_security_rates_every_unit_within_its_goal(root):
    """Prints the scores (run with -s); the same figures are in docs/Operations.md."""
    scores = {}
    for unit in SERVICES:
        installed = root / "etc/systemd/system" / unit.name
        result = subprocess.run(
            ["systemd-analyze", "security", "--offline=true", "--no-pager", str(installed)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
        assert found, result.stdout + result.stderr
        scores[unit.name] = float(found.group(1))
    version = subprocess.run(
        ["systemd-analyze", "--version"], capture_output=True, text=True
    ).stdout.split("\n")[0]
    report = "\n".join(
        f"  {name:<26} {score:>4.1f}   goal <= {EXPOSURE_GOALS[name]}"
        for name, score in sorted(scores.items())
    )
    print(f"\nsystemd-analyze security --offline=true ({version}):\n{report}")
    assert set(scores) == set(EXPOSURE_GOALS)
    over = {n: s for n, s in scores.items() if s > EXPOSURE_GOALS[n]}
    assert not over, report


MDWE_PROBE = textwrap.dedent(
    """
    import ctypes, sys
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        sys.exit(77)  # kernel older than 6.3: no MDWE prctl to try it with
    from OpenSSL import SSL
    ctx = SSL.Context(SSL.TLS_METHOD)
    try:
        ctx.set_verify(SSL.VERIFY_PEER, lambda *args: True)
    except MemoryError as exc:
        print("MemoryError:", exc)
        sys.exit(3)
    print("set_verify works without writable+executable memory")
    """
)


def test_memory_deny_write_execute_would_break_the_tls_verify_callback_so_no_unit_sets_it():
    """What MemoryDenyWriteExecute= enforces (no W+X mapping), applied with the kernel's MDWE
    prctl: pyOpenSSL's set_verify (a cffi callback) then fails, and every daemon uses it.
    Should this ever pass, the units can gain MemoryDenyWriteExecute=yes."""
    result = subprocess.run(
        [sys.executable, "-c", MDWE_PROBE], capture_output=True, text=True, timeout=60
    )
    if result.returncode == 77:
        pytest.skip("this kernel has no PR_SET_MDWE")
    assert result.returncode == 3, result.stdout + result.stderr
    for unit in SERVICES:
        assert "MemoryDenyWriteExecute" not in directives(unit), unit.name


POLKIT_HARNESS = textwrap.dedent(
    """
    const fs = require("fs");
    const rules = [];
    const polkit = {Result: {YES: "yes", NO: "no"}, addRule: (f) => rules.push(f)};
    eval(fs.readFileSync(process.argv[1], "utf8"));
    const cases = JSON.parse(process.argv[2]);
    const out = cases.map(([id, user, unit, verb]) => {
        const details = {unit: unit, verb: verb};
        const action = {id: id, lookup: (k) => details[k]};
        for (const rule of rules) {
            const r = rule(action, {user: user});
            if (r !== undefined) return r;
        }
        return "unhandled";
    });
    console.log(JSON.stringify(out));
    """
)


def test_the_polkit_rule_lets_only_the_updater_manage_the_agent_and_start_or_stop_the_forwarder():
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("node is needed to evaluate the polkit rule (JavaScript)")
    manage = "org.freedesktop.systemd1.manage-units"
    updater_user = directives(REPO / "contrib/systemd/decnet-updater.service")["User"][0]
    agent_unit = "decnet-agent.service"
    cases = {
        (manage, updater_user, agent_unit, "restart"): "yes",
        (manage, updater_user, agent_unit, "start"): "yes",
        (manage, updater_user, agent_unit, "stop"): "yes",
        (manage, updater_user, agent_unit, "reload-or-restart"): "unhandled",
        (manage, updater_user, "decnet-updater.service", "restart"): "unhandled",
        (manage, updater_user, "decnet-forwarder.service", "start"): "yes",
        (manage, updater_user, "decnet-forwarder.service", "stop"): "yes",
        (manage, updater_user, "decnet-forwarder.service", "restart"): "unhandled",
        (manage, "decnet-agent", "decnet-forwarder.service", "start"): "unhandled",
        (manage, "decnet-agent", "decnet-forwarder.service", "stop"): "unhandled",
        (manage, updater_user, "sshd.service", "stop"): "unhandled",
        (manage, "decnet-agent", agent_unit, "restart"): "unhandled",
        (manage, "decnet", agent_unit, "restart"): "unhandled",
        ("org.freedesktop.systemd1.manage-unit-files", updater_user, agent_unit, "restart"): (
            "unhandled"
        ),
    }
    result = subprocess.run(
        [node, "-e", POLKIT_HARNESS, "--", str(POLKIT_RULE), json.dumps(list(cases))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert dict(zip(cases, json.loads(result.stdout), strict=True)) == cases


def _path_entries(d: dict[str, list[str]], key: str) -> list[str]:
    return [p for value in d.get(key, []) for p in value.split()]


# Worker units that run the agent's release (the updater installs the first one).
WORKER_RELEASE_UNITS = ("decnet-agent", "decnet-forwarder")


def test_worker_units_start_in_any_order_before_the_first_release_without_failing():
    """The documented order (docs/Operations.md): updater and forwarder enabled before any
    release exists, the agent's log directory made only at the agent's first start."""
    units = {u.stem: directives(u) for u in SERVICES}
    made_by: dict[str, str] = {}
    for name, d in units.items():
        for key, base in (("LogsDirectory", "/var/log"), ("StateDirectory", "/var/lib")):
            for rel in d.get(key, []):
                made_by[f"{base}/{rel.split(':')[0]}"] = name
    for name, d in units.items():
        # A path another unit creates at its first start is optional ('-') here.
        for key in ("ReadOnlyPaths", "ReadWritePaths", "InaccessiblePaths"):
            for entry in _path_entries(d, key):
                path = entry.lstrip("-+")
                other = made_by.get(path)
                if other is not None and other != name:
                    assert entry.startswith("-"), f"{name}: {key}={entry} is made by {other}"
        # Code under /opt/decnet/current: skipped cleanly until the first release exists.
        program = shlex.split(d["ExecStart"][0])[0]
        if name in WORKER_RELEASE_UNITS:
            assert program.startswith("/opt/decnet/current/"), name
            assert d["ConditionPathExists"] == [program], name
        # Restarting never runs into the start limit and leaves the daemon dead.
        interval = d.get("StartLimitIntervalSec", ["10s"])[0]
        burst = int(d.get("StartLimitBurst", ["5"])[0])
        restart_sec = float(d["RestartSec"][0].rstrip("s"))
        assert interval == "0" or restart_sec * burst > float(interval.rstrip("s")), name
