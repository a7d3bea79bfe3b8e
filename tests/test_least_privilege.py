"""Each daemon as its own user on the documented layout: real uids, real kernel checks.

Root only: the checks switch to the daemons' uids with ``setpriv``.  Nothing is created on
this machine's user database: ``systemd-sysusers --root`` makes the users of
contrib/sysusers.d/decnet.conf in a scratch root, and only their numbers are used.  Each
daemon's credentials (user, primary group, supplementary groups, umask) come from its unit in
contrib/systemd/, and the layout (owner, group, mode of every path) from the table in
docs/Operations.md, so the three cannot drift apart.

Python runs as another uid inside a private mount namespace that makes the interpreter's
directory searchable (here it lives under /root, 0700); nothing outside the namespace changes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor

from tests.support import REPO_ROOT, wait_for
from tests.test_systemd_units import SYSUSERS, directives

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="switching to the daemons' uids needs root"),
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("setpriv", "unshare", "systemd-sysusers")),
        reason="needs setpriv, unshare (util-linux) and systemd-sysusers",
    ),
]

UNITS = REPO_ROOT / "contrib" / "systemd"
SECCOMP_EXEC = Path(__file__).with_name("seccomp_exec.py")
OPERATIONS = REPO_ROOT / "docs" / "Operations.md"
BIN = Path(sys.executable).parent
HOME = "/var/lib/decnet-master"


# -- who is who -----------------------------------------------------------------------


@attrs.frozen
class Creds:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    umask: str
    caps: tuple[str, ...] = ()  # the unit's AmbientCapabilities=, e.g. net_bind_service

    def setpriv(self) -> list[str]:
        groups = ["--groups", ",".join(map(str, self.groups))] if self.groups else []
        caps = "".join(f",+{c}" for c in self.caps)
        ambient = [f"--ambient-caps={caps[1:]}"] if caps else []
        return [
            "setpriv",
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            *(groups or ["--clear-groups"]),
            f"--inh-caps=-all{caps}",
            *ambient,
            f"--bounding-set=-all{caps}",
            "--",
            "sh",
            "-c",
            f'umask {self.umask} && cd / && exec "$@"',
            "sh",
        ]


@attrs.frozen
class Accounts:
    users: dict[str, tuple[int, int]]  # name -> (uid, primary gid)
    groups: dict[str, int]
    members: dict[str, set[str]]  # group -> users

    def gid(self, name: str) -> int:
        return 0 if name == "root" else self.groups[name]

    def uid(self, name: str) -> int:
        return 0 if name == "root" else self.users[name][0]

    def unit(self, unit: str) -> Creds:
        """The credentials systemd gives ``unit``'s processes."""
        d = directives(UNITS / unit)
        user = d["User"][0]
        uid, primary = self.users[user]
        gid = self.groups[d["Group"][0]] if "Group" in d else primary
        extra = " ".join(d.get("SupplementaryGroups", [])).split()
        groups = {self.groups[g] for g in extra if g in self.groups}
        groups |= {self.groups[g] for g, who in self.members.items() if user in who}
        caps = tuple(
            c.lower().removeprefix("cap_")
            for c in " ".join(d.get("AmbientCapabilities", [])).split()
        )
        umask = d.get("UMask", ["0022"])[0]
        return Creds(user, uid, gid, tuple(sorted(groups - {gid})), umask, caps)

    def admin(self) -> Creds:
        """decnet-admin as the documented wrapper runs it (umask 027)."""
        uid, gid = self.users["decnet-admin"]
        return Creds("decnet-admin", uid, gid, (), "027")


@pytest.fixture(scope="module")
def scratch():
    path = Path(tempfile.mkdtemp(prefix="decnet-lp-", dir="/tmp"))
    path.chmod(0o755)  # the daemons' uids must reach their trees below it
    yield path
    shutil.rmtree(path)


@pytest.fixture(scope="module")
def accounts(scratch) -> Accounts:
    sysroot = scratch / "sysroot"
    (sysroot / "etc").mkdir(parents=True)
    subprocess.run(
        ["systemd-sysusers", f"--root={sysroot}", "-"],
        stdin=SYSUSERS.open("rb"),
        check=True,
        capture_output=True,
        timeout=60,
    )
    users, groups, members = {}, {}, {}
    for line in (sysroot / "etc/passwd").read_text().splitlines():
        name, _, uid, gid, *_ = line.split(":")
        users[name] = (int(uid), int(gid))
    for line in (sysroot / "etc/group").read_text().splitlines():
        name, _, gid, who = line.split(":")
        groups[name] = int(gid)
        members[name] = set(filter(None, who.split(",")))
    return Accounts(users, groups, members)


# -- running things as them -----------------------------------------------------------


def _interpreter_detour() -> tuple[str, str] | None:
    """``(blocked dir, its child towards the interpreter)`` if others cannot reach Python."""
    real = Path(os.path.realpath(sys.executable))
    for parent in reversed(real.parents):
        if not os.stat(parent).st_mode & 0o001:
            child = real.relative_to(parent).parts[0]
            return str(parent), str(parent / child)
    return None


def command(
    creds: Creds,
    argv,
    scratch: Path,
    *,
    python: bool = False,
    unit: str | None = None,
    mounts: list[str] = (),  # type: ignore[assignment]
) -> list[str]:
    """``argv`` as ``creds``; with ``unit``, also under that unit's system-call filter and
    with /proc mounted as its ``ProtectProc=`` / ``ProcSubset=`` say; ``mounts``: more
    shell steps run as root in the private mount namespace first (:func:`unit_path_mounts`)."""
    argv = list(map(str, argv))
    steps = list(mounts)
    detour = _interpreter_detour() if python or unit else None
    blocked, child, stash = "-", "-", "-"
    if detour is not None:
        blocked, child = detour
        stash = tempfile.mkdtemp(dir=scratch)
        steps += ['mount --bind "$1" "$2"', 'mount -t tmpfs -o mode=0755 tmpfs "$3"',
                  'mkdir -p "$1"', 'mount --bind "$2" "$1"']  # fmt: skip
    if unit is not None:
        d = directives(UNITS / unit)
        hidepid, subset = d["ProtectProc"][0], d["ProcSubset"][0]
        steps.append(f"mount -t proc -o hidepid={hidepid},subset={subset} proc /proc")
        allowed = Path(tempfile.mkstemp(dir=scratch, suffix=".syscalls")[1])
        allowed.write_text("\n".join(sorted(unit_syscalls(unit))) + "\n")
        allowed.chmod(0o644)
        argv = [sys.executable, str(SECCOMP_EXEC), str(allowed), "--", *argv]
    argv = [*creds.setpriv(), *argv]
    if not steps:
        return argv
    script = " && ".join([*steps, 'shift 3 && exec "$@"'])
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh",
            child, stash, blocked, *argv]  # fmt: skip


def unit_path_mounts(unit: str, root: Path, scratch: Path) -> list[str]:
    """The unit's file-system view of ``root``'s ``/etc``, as mount steps: ``ProtectSystem=
    strict`` (read-only), then ``ReadOnlyPaths=``, ``ReadWritePaths=`` and ``InaccessiblePaths=``
    on the paths that exist, parents first, as systemd orders them."""
    d = directives(UNITS / unit)
    assert d["ProtectSystem"] == ["strict"], unit
    entries = [(("ReadOnlyPaths", "/etc"))]
    for key in ("ReadOnlyPaths", "ReadWritePaths", "InaccessiblePaths"):
        entries += [(key, p.lstrip("-+")) for v in d.get(key, []) for p in v.split()]
    hidden = {True: scratch / "inaccessible-dir", False: scratch / "inaccessible-file"}
    if not hidden[True].exists():
        hidden[True].mkdir(mode=0)
        hidden[False].touch(mode=0)
    steps = []
    for key, path in sorted(entries, key=lambda e: Path(e[1]).parts):
        target = place(root, path)
        if not path.startswith("/etc") or not target.exists():
            continue
        where = shlex_quote(target)
        if key == "InaccessiblePaths":
            steps.append(f"mount --bind {shlex_quote(hidden[target.is_dir()])} {where}")
        else:
            how = "ro" if key == "ReadOnlyPaths" else "rw"
            steps += [f"mount --bind {where} {where}", f"mount -o remount,bind,{how} {where}"]
    return steps


def shlex_quote(path: Path) -> str:
    import shlex

    return shlex.quote(str(path))


def syscall_sets() -> dict[str, set[str]]:
    """``systemd-analyze syscall-filter``: every @set, expanded to system-call names."""
    listing = subprocess.run(
        ["systemd-analyze", "syscall-filter", "--no-pager"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    raw: dict[str, list[str]] = {}
    current = None
    for line in listing.splitlines():
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        if not line[0].isspace():
            current = raw.setdefault(item, [])
        elif current is not None:
            current.append(item)

    def expand(name: str) -> set[str]:
        if not name.startswith("@"):
            return {name}
        return set().union(*(expand(m) for m in raw[name]))

    return {name: expand(name) for name in raw}


def unit_syscalls(unit: str) -> set[str]:
    """The allow list a unit's ``SystemCallFilter=`` lines build, in order."""
    sets = syscall_sets()
    allowed: set[str] = set()
    for value in directives(UNITS / unit)["SystemCallFilter"]:
        names = value.removeprefix("~").split()
        chosen = set().union(*(sets.get(n, {n}) for n in names))
        allowed = allowed - chosen if value.startswith("~") else allowed | chosen
    return allowed


ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/nonexistent", "LANG": "C.UTF-8"}


def run_as(creds: Creds, argv, scratch: Path, *, python: bool = False, check: bool = False):
    result = subprocess.run(
        command(creds, argv, scratch, python=python),
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    if check:
        assert result.returncode == 0, (creds.name, argv, result.stdout, result.stderr)
    return result


def can(creds: Creds, scratch: Path, what: str, path: Path) -> bool:
    """Whether ``creds`` may read / append to / create in / list / traverse ``path``."""
    script = {
        "read": 'cat -- "$0" >/dev/null',
        "append": ': >> "$0"',
        "create": 't="$0/.probe-$$" && : > "$t" && rm -f -- "$t"',
        "list": 'ls -- "$0" >/dev/null',
        "enter": 'cd -- "$0"',
    }[what]
    return run_as(creds, ["sh", "-c", script, path], scratch).returncode == 0


# -- the documented layout ------------------------------------------------------------


@attrs.frozen
class Row:
    path: str  # absolute, "/" at the end for a directory
    host: str
    owner: str
    group: str
    mode: int
    created: str


def documented_layout() -> list[Row]:
    """The rows of the file-mode table in docs/Operations.md."""
    text = OPERATIONS.read_text()
    section = text.split("## Users, groups and file modes", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 6 or not cells[0].startswith("`/"):
            continue
        found = re.fullmatch(r"`([^`]+)`(?: \((worker|master)\))?", cells[0])
        assert found, cells[0]
        path, host = found.groups()
        host = host or ("master" if path.startswith(HOME) else "worker")
        rows.append(Row(path, host, cells[1], cells[2], int(cells[3], 8), cells[4]))
    assert rows, "no file-mode table in docs/Operations.md"
    return rows


def systemd_directories() -> dict[str, tuple[str, str, int]]:
    """What systemd creates for the units' State/Logs/CacheDirectory=, as it would."""
    bases = {
        "StateDirectory": "/var/lib",
        "LogsDirectory": "/var/log",
        "CacheDirectory": "/var/cache",
    }
    made = {}
    for unit in sorted(UNITS.glob("*.service")):
        d = directives(unit)
        user = d["User"][0]
        group = d.get("Group", [user])[0]
        for key, base in bases.items():
            for name in " ".join(d.get(key, [])).split():
                mode = int(d.get(f"{key}Mode", ["0755"])[0], 8)
                made[f"{base}/{name}/"] = (user, group, mode)
    return made


def place(root: Path, row_path: str) -> Path:
    return root / row_path.lstrip("/").replace("<id>", "r1")


def make(accounts: Accounts, target: Path, owner: str, group: str, mode: int, data=None):
    target.parent.mkdir(parents=True, exist_ok=True)
    if data is None:
        target.mkdir(exist_ok=True)
    else:
        target.write_bytes(data)
    os.chown(target, accounts.uid(owner), accounts.gid(group))
    os.chmod(target, mode)


def actual(accounts: Accounts, path: Path) -> tuple[str, str, int]:
    st = os.stat(path)
    names = {uid: name for name, (uid, _) in accounts.users.items()} | {0: "root"}
    groups = {gid: name for name, gid in accounts.groups.items()} | {0: "root"}
    return (
        names.get(st.st_uid, str(st.st_uid)),
        groups.get(st.st_gid, str(st.st_gid)),
        (st.st_mode & 0o7777),
    )


def assert_matches_the_table(accounts, root: Path, rows: list[Row]) -> None:
    wrong = {}
    for row in rows:
        got = actual(accounts, place(root, row.path))
        if got != (row.owner, row.group, row.mode):
            wrong[row.path] = (
                f"documented {row.owner}:{row.group} {row.mode:o}, is {got[0]}:{got[1]} {got[2]:o}"
            )
    assert not wrong, wrong


# -- the master, then the worker ------------------------------------------------------


@pytest.fixture(scope="module")
def master(scratch, accounts):
    """The master tree: install steps, then the real `decnet-admin` as decnet-admin."""
    root = scratch / "master"
    rows = [r for r in documented_layout() if r.host == "master"]
    for row in rows:
        if row.created == "install":
            make(accounts, place(root, row.path), row.owner, row.group, row.mode)
    home = place(root, HOME)
    admin = accounts.admin()
    out = scratch / "out"
    make(accounts, out, "decnet-admin", "decnet-admin", 0o700)
    for args in (
        ["init", "--master-host", "127.0.0.1"],
        ["enroll", "w1", "--address", "127.0.0.1", "--updater", "--out", out / "w1"],
        ["enroll", "gone", "--address", "127.0.0.1", "--out", out / "gone"],
        ["decommission", "gone", "--yes", "--no-teardown"],
    ):
        argv = [BIN / "decnet-admin", "--home", home, *args]
        run_as(admin, argv, scratch, python=True, check=True)
    for path, (user, group, mode) in systemd_directories().items():
        if path.startswith(HOME):
            make(accounts, place(root, path), user, group, mode)
    return root, rows


BUNDLE_FILES = ("ca.crt", "worker.crt", "updater.crt", "bundle.json", "worker.key", "updater.key")


@pytest.fixture(scope="module")
def worker(scratch, accounts, master):
    """The worker tree: install steps (with w1's real bundle), systemd's directories, then
    the agent's log and a release written by those daemons' users."""
    root = scratch / "worker"
    rows = [r for r in documented_layout() if r.host == "worker"]
    for row in sorted(rows, key=lambda r: r.path):
        if row.created == "install":
            name = row.path.rsplit("/", 1)[1]
            data = (scratch / "out/w1" / name).read_bytes() if name in BUNDLE_FILES else None
            make(accounts, place(root, row.path), row.owner, row.group, row.mode, data)
    for path, (user, group, mode) in systemd_directories().items():
        if not path.startswith(HOME):
            make(accounts, place(root, path), user, group, mode)
    agent, updater = accounts.unit("decnet-agent.service"), accounts.unit("decnet-updater.service")
    log = place(root, "/var/log/decnet/decnet.log")
    lines = "".join(
        f"<133>1 2026-01-02T03:04:05Z w1 decnet - login - line {i}\n" for i in range(50)
    )
    run_as(agent, ["sh", "-c", 'printf %s "$1" >> "$0"', log, lines], scratch, check=True)
    release = place(root, "/opt/decnet/releases/<id>/")
    run_as(updater, ["mkdir", "-p", release], scratch, check=True)
    return root, rows


def test_the_master_tree_is_what_the_operations_table_says_after_the_install_steps(
    accounts, master
):
    root, rows = master
    assert_matches_the_table(accounts, root, rows)


def test_the_worker_tree_is_what_the_operations_table_says(accounts, worker):
    root, rows = worker
    assert_matches_the_table(accounts, root, rows)


def test_the_listener_user_reads_its_own_directory_and_nothing_of_the_ca_or_the_master(
    scratch, accounts, master
):
    root, _ = master
    home = place(root, HOME)
    listener = accounts.unit("decnet-listener.service")
    for name in ("ca.crt", "listener.crt", "listener.key", "revoked.json"):
        assert can(listener, scratch, "read", home / "listener" / name), name
    assert can(listener, scratch, "create", home / "ingest")
    for secret in ("ca/ca.key", "master/master.key", "registry.sqlite", "master.json"):
        assert not can(listener, scratch, "read", home / secret), secret
    assert not can(listener, scratch, "list", home)
    assert not can(listener, scratch, "create", home / "listener")
    # The owner still can: the checks above are the modes, not a broken tree.
    assert can(accounts.admin(), scratch, "read", home / "ca/ca.key")


def test_code_running_as_the_agent_cannot_write_the_releases_or_read_the_updaters_key(
    scratch, accounts, worker
):
    root, _ = worker
    agent = accounts.unit("decnet-agent.service")
    for directory in ("/opt/decnet/", "/opt/decnet/releases/<id>/", "/opt/decnet/updater/"):
        assert not can(agent, scratch, "create", place(root, directory)), directory
    assert not can(agent, scratch, "read", place(root, "/etc/decnet/bundle/updater.key"))
    assert not can(agent, scratch, "enter", place(root, "/var/lib/decnet/forwarder/"))
    assert can(agent, scratch, "read", place(root, "/etc/decnet/bundle/worker.key"))
    assert can(agent, scratch, "append", place(root, "/var/log/decnet/decnet.log"))
    assert can(agent, scratch, "create", place(root, "/var/lib/decnet/agent/"))
    updater = accounts.unit("decnet-updater.service")
    assert can(updater, scratch, "create", place(root, "/opt/decnet/releases/<id>/"))
    assert can(updater, scratch, "read", place(root, "/etc/decnet/bundle/updater.key"))
    assert not can(updater, scratch, "read", place(root, "/etc/decnet/bundle/worker.key"))
    assert not can(updater, scratch, "read", place(root, "/var/log/decnet/decnet.log"))


def test_the_forwarder_reads_the_agents_log_through_the_group_and_cannot_change_it(
    scratch, accounts, worker
):
    root, _ = worker
    forwarder = accounts.unit("decnet-forwarder.service")
    log = place(root, "/var/log/decnet/decnet.log")
    assert can(forwarder, scratch, "read", log)
    assert not can(forwarder, scratch, "append", log)
    assert not can(forwarder, scratch, "create", log.parent)
    assert can(forwarder, scratch, "read", place(root, "/etc/decnet/bundle/worker.key"))
    assert not can(forwarder, scratch, "read", place(root, "/etc/decnet/bundle/updater.key"))
    assert not can(forwarder, scratch, "create", place(root, "/opt/decnet/"))


def test_the_agent_cannot_reach_into_the_updaters_process_through_proc(scratch, accounts):
    """/proc/<pid>/root of a process is its view of the file system (where the updater can
    write /opt/decnet); the kernel lets only the same uid (or CAP_SYS_PTRACE) through."""
    updater = accounts.unit("decnet-updater.service")
    agent = accounts.unit("decnet-agent.service")
    proc = subprocess.Popen(command(updater, ["sleep", "60"], scratch), env=ENV)
    try:
        wait_for(lambda: Path(f"/proc/{proc.pid}/comm").read_text().strip() == "sleep")
        for probe in ("root/", "cwd/", "environ"):
            target = f"/proc/{proc.pid}/{probe}"
            assert not can(agent, scratch, "list" if probe.endswith("/") else "read", target)
        assert can(updater, scratch, "list", f"/proc/{proc.pid}/root/")  # the same uid may
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def start_as(creds, scratch, plugin, args, log: Path):
    return subprocess.Popen(
        command(
            creds,
            [BIN / "twistd", "--nodaemon", "--pidfile=", "-l", log, plugin, *args],
            scratch,
            unit=f"{plugin}.service",
        ),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def test_the_listener_and_the_forwarder_ship_the_agents_log_each_as_its_own_user(
    scratch, accounts, master, worker
):
    """The real twistd daemons on the documented layout: the listener as decnet-listener
    (its identity, revocations and ingest), the forwarder as decnet-forwarder (the bundle,
    the agent's log through decnet-log, its own state), each under its unit's system-call
    filter and /proc options."""
    mroot, _ = master
    wroot, _ = worker
    listener, forwarder = (
        accounts.unit("decnet-listener.service"),
        accounts.unit("decnet-forwarder.service"),
    )
    run = {}
    for who in (listener, forwarder):
        run[who.name] = scratch / f"run-{who.name}"
        make(accounts, run[who.name], who.name, who.name, 0o700)
    home = place(mroot, HOME)
    port_file = run[listener.name] / "port"
    lproc = start_as(
        listener,
        scratch,
        "decnet-listener",
        ["--home", home, "--listen", "tcp:0:interface=127.0.0.1", "--port-file", port_file],
        run[listener.name] / "listener.log",
    )
    fproc = None
    try:

        def bound():
            if lproc.poll() is not None:
                raise AssertionError(lproc.stderr.read().decode()[-3000:])
            return port_file.exists() and port_file.read_text().strip()

        port = wait_for(bound, timeout=60, what="the listener to bind")
        log = place(wroot, "/var/log/decnet/decnet.log")
        fproc = start_as(
            forwarder,
            scratch,
            "decnet-forwarder",
            [
                "--bundle", place(wroot, "/etc/decnet/bundle"), "--log-file", log,
                "--state", place(wroot, "/var/lib/decnet/forwarder/offsets.sqlite"),
                "--master-host", "127.0.0.1", "--master-port", port,
                "--poll-interval", "0.2", "--max-retry-delay", "1",
            ],
            run[forwarder.name] / "forwarder.log",
        )  # fmt: skip
        mirror = home / "ingest" / "w1" / "decnet.log"
        expected = log.read_bytes()
        wait_for(
            lambda: mirror.exists() and mirror.read_bytes() == expected,
            timeout=60,
            what="the agent's log in the master's mirror",
        )
        assert actual(accounts, mirror)[0] == "decnet-listener"
    finally:
        for proc in (fproc, lproc):
            if proc is not None:
                proc.terminate()
                proc.wait(20)


def test_a_listener_key_its_user_cannot_read_stops_it_with_one_line_naming_the_file(
    scratch, accounts, master
):
    """What a wrong group or mode on listener/ (docs/Operations.md troubleshooting) looks like."""
    mroot, _ = master
    home = place(mroot, HOME)
    key = home / "listener" / "listener.key"
    listener = accounts.unit("decnet-listener.service")
    os.chmod(key, 0o600)
    try:
        result = run_as(
            listener,
            [BIN / "twistd", "--nodaemon", "--pidfile=", "decnet-listener", "--home", home,
             "--listen", "tcp:0:interface=127.0.0.1"],
            scratch,
            python=True,
        )  # fmt: skip
    finally:
        os.chmod(key, 0o640)
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"cannot read the private key {key}: permission denied for uid {listener.uid}" in out
    assert "Traceback" not in out


def test_the_harness_really_applies_each_units_system_call_filter_and_proc_options(
    scratch, accounts
):
    """So that the daemon tests above and below are not vacuous: under the forwarder's
    filter, lowering one's priority fails (``~@resources``), under the listener's it works
    (it allows ``setpriority`` for its feed process, and ``sched_setscheduler`` for its index
    process to run SCHED_IDLE), and /proc shows neither other users' processes
    (``ProtectProc=invisible``) nor system files (``ProcSubset=pid``)."""
    forwarder = accounts.unit("decnet-forwarder.service")
    listener = accounts.unit("decnet-listener.service")

    def run(creds, unit, argv):
        return subprocess.run(
            command(creds, argv, scratch, unit=unit), capture_output=True, text=True, env=ENV
        )

    niced = run(forwarder, "decnet-forwarder.service", ["nice", "-n", "1", "true"])
    assert "Operation not permitted" in niced.stderr
    niced = run(listener, "decnet-listener.service", ["nice", "-n", "1", "true"])
    assert niced.returncode == 0 and not niced.stderr
    idle = run(forwarder, "decnet-forwarder.service", ["chrt", "--idle", "0", "true"])
    assert "Operation not permitted" in idle.stderr
    idle = run(listener, "decnet-listener.service", ["chrt", "--idle", "0", "true"])
    assert idle.returncode == 0 and not idle.stderr
    proc = run(forwarder, "decnet-forwarder.service", ["ls", "/proc/1", "/proc/meminfo"])
    assert proc.returncode != 0 and proc.stderr.count("No such file or directory") == 2
    assert run(forwarder, "decnet-forwarder.service", ["ls", "/proc/self/fd"]).returncode == 0


def free_low_port() -> int:
    for port in range(1023, 900, -1):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port below 1024 on 127.0.0.1")


@pytest_twisted.ensureDeferred
async def test_the_agent_runs_its_deckies_as_its_own_user_with_one_capability(
    scratch, accounts, master, worker
):
    """The real agent as decnet-agent, under its unit's filter and /proc options, with only
    CAP_NET_BIND_SERVICE: the master deploys a telnet decky on a port below 1024 and an SSH
    decky (host key in its state), a connection becomes a line in the shared log, and the
    log stays readable by the forwarder."""
    from decnet import config
    from decnet.master.agent_client import AgentClient
    from decnet.master.registry import Registry
    from decnet.tls import TLSIdentity

    mroot, _ = master
    wroot, _ = worker
    agent = accounts.unit("decnet-agent.service")
    assert agent.caps == ("net_bind_service",)
    run = scratch / "run-agent"
    make(accounts, run, "decnet-agent", "decnet-agent", 0o700)
    log = place(wroot, "/var/log/decnet/decnet.log")
    state = place(wroot, "/var/lib/decnet/agent/")
    proc = start_as(
        agent,
        scratch,
        "decnet-agent",
        ["--bundle", place(wroot, "/etc/decnet/bundle"), "--listen", "tcp:0:interface=127.0.0.1",
         "--state-dir", state, "--log-file", log, "--port-file", run / "port"],
        run / "agent.log",
    )  # fmt: skip
    try:

        def bound():
            if proc.poll() is not None:
                raise AssertionError((run / "agent.log").read_text()[-3000:])
            return (run / "port").exists() and (run / "port").read_text().strip()

        api_port = int(wait_for(bound, timeout=60, what="the agent's API"))
        home = config.MasterPaths.resolve(place(mroot, HOME))
        host = attrs.evolve(Registry(home.registry).get("w1"), agent_port=api_port)
        low = free_low_port()
        spec = {
            "deckies": [
                {
                    "name": "box-1",
                    "services": [
                        {"type": "telnet", "bind": "127.0.0.1", "port": low},
                        {"type": "ssh", "bind": "127.0.0.1", "port": 0},
                    ],
                }
            ]
        }
        client = AgentClient(reactor, TLSIdentity.master(home), host)
        result = await client.deploy(spec)
        assert result["ok"], result
        with socket.create_connection(("127.0.0.1", low), timeout=5) as conn:
            conn.recv(1)
        wait_for(
            lambda: b" box-1 telnet - disconnect " in log.read_bytes(),
            timeout=30,
            what="the telnet decky's line in the log",
        )
        assert actual(accounts, log) == ("decnet-agent", "decnet-log", 0o640)
        assert can(accounts.unit("decnet-forwarder.service"), scratch, "read", log)
        assert any(p.is_file() for p in (state / "ssh").rglob("*")), "no SSH host key"
    finally:
        proc.terminate()
        proc.wait(20)


def test_the_updaters_install_commands_work_as_its_user_under_its_sandbox(
    scratch, accounts, worker, wheelhouse
):
    """venv, pip and the plugin-cache step, exactly as the Installer runs them, as
    decnet-updater under the updater unit's filter and /proc options, into a release in
    /opt/decnet that the agent can then read but not change."""
    from decnet import config
    from decnet.updater import archive
    from decnet.updater.installer import Installer
    from tests.test_updater_install import tiny_release

    wroot, _ = worker
    updater = accounts.unit("decnet-updater.service")
    release = place(wroot, "/opt/decnet/releases/<id>/") / "tiny"
    run_as(updater, ["mkdir", release], scratch, check=True)
    source = scratch / "tiny.tar.gz"
    source.write_bytes(tiny_release(wheelhouse))
    with source.open("rb") as fh:
        archive.extract(fh, release / config.RELEASE_SRC_DIR)
    for path in [release / config.RELEASE_SRC_DIR, *(release / config.RELEASE_SRC_DIR).rglob("*")]:
        os.chown(path, updater.uid, updater.gid)
    installer = Installer(reactor, compile_bytecode=False, use_own_pip=False)
    for step, argv in installer.commands(release):
        result = subprocess.run(
            command(updater, argv, scratch, unit="decnet-updater.service"),
            capture_output=True,
            text=True,
            env={**ENV, "PIP_NO_INPUT": "1", "PIP_NO_CACHE_DIR": "1"},
            timeout=600,
            cwd="/",
        )
        assert result.returncode == 0, (step, result.stdout[-2000:], result.stderr[-2000:])
    tool = release / config.RELEASE_VENV_DIR / "bin" / "tinyrelease"
    assert actual(accounts, tool)[0] == "decnet-updater"
    agent = accounts.unit("decnet-agent.service")
    assert run_as(agent, [tool], scratch, python=True).stdout.strip() == "tiny release says hi"
    assert not can(agent, scratch, "append", tool)
    assert not can(agent, scratch, "create", tool.parent)


RENEW_CSRS = """
import json, sys
from decnet import pki
from decnet.updater import renewal
print(json.dumps(renewal.request_csrs(pki.WorkerBundle.load(sys.argv[1]))))
"""
RENEW_INSTALL = """
import json, sys
from decnet import pki
from decnet.updater import renewal
certs = json.loads(open(sys.argv[2]).read())
print(json.dumps(renewal.install(pki.WorkerBundle.load(sys.argv[1]), certs)))
"""
REFRESH = """
import sys
from decnet import pki
print(pki.replace_bundle_listeners(sys.argv[1], ["127.0.0.9:6514", "127.0.0.10:6514"]))
"""


def etc_copy(scratch: Path, worker_root: Path, name: str) -> tuple[Path, Path]:
    """A copy of the worker tree's /etc (owners and modes kept): its root and its bundle."""
    root = scratch / name
    root.mkdir()
    subprocess.run(["cp", "-a", place(worker_root, "/etc"), root / "etc"], check=True)
    return root, place(root, "/etc/decnet/bundle")


def as_the_updater_unit(accounts, scratch: Path, root: Path, code: str, *args):
    """``python -c code args`` as decnet-updater, with ``root``'s /etc mounted as its unit
    says (:func:`unit_path_mounts`)."""
    unit = "decnet-updater.service"
    argv = [sys.executable, "-c", code, *args]
    mounts = unit_path_mounts(unit, root, scratch)
    return subprocess.run(
        command(accounts.unit(unit), argv, scratch, python=True, mounts=mounts),
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )


def test_renew_and_bundle_refresh_work_as_the_updater_under_its_unit_with_no_drop_in(
    scratch, accounts, master, worker
):
    """The renewal's two worker steps and a listener-list refresh, exactly as the updater
    runs them (``decnet.updater.renewal``, ``pki.replace_bundle_listeners``), as
    decnet-updater, with /etc mounted as its unit says, on the documented layout: they
    work, and afterwards each key is readable by exactly the daemons that were reading it."""
    from decnet import config, pki
    from decnet.master import enrollment
    from decnet.master.registry import Registry
    from decnet.master.renewal import sign

    mroot, _ = master
    root, bundle_dir = etc_copy(scratch, worker[0], "renew-root")
    updater = accounts.unit("decnet-updater.service")
    mounts = unit_path_mounts("decnet-updater.service", root, scratch)

    def as_updater(code: str, *args) -> str:
        result = as_the_updater_unit(accounts, scratch, root, code, bundle_dir, *args)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    # The mounts are in force: /etc/decnet itself is read-only to the updater.
    touch = command(updater, ["touch", place(root, "/etc/decnet/probe")], scratch, mounts=mounts)
    denied = subprocess.run(touch, capture_output=True, text=True, env=ENV, timeout=60)
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr
    etc_before = sorted(p.name for p in place(root, "/etc/decnet").iterdir())

    csrs = json.loads(as_updater(RENEW_CSRS))
    paths = config.MasterPaths.resolve(place(mroot, HOME))
    host = Registry(paths.registry).get("w1")
    certs, _ = sign(enrollment.load_master(paths), host, {"csrs": csrs})
    pushed = scratch / "pushed.json"
    pushed.write_text(json.dumps(certs))
    pushed.chmod(0o644)
    installed = json.loads(as_updater(RENEW_INSTALL, pushed))
    as_updater(REFRESH)

    bundle = pki.WorkerBundle.load(bundle_dir)
    for role in ("worker", "updater"):
        assert pki.fingerprint(pki.load_cert(bundle.cert_path(role))) == installed[role]
        key = pki.load_key(bundle.key_path(role))
        assert pki.spki(key.public_key()) == pki.spki(
            pki.load_cert(bundle.cert_path(role)).public_key()
        )
    assert bundle.settings["listeners"] == ["127.0.0.9:6514", "127.0.0.10:6514"]
    assert not (bundle_dir / ".renew").exists()
    assert sorted(p.name for p in place(root, "/etc/decnet").iterdir()) == etc_before
    assert actual(accounts, bundle.key_path("worker"))[1:] == ("decnet-worker", 0o640)
    assert actual(accounts, bundle.key_path("updater"))[1:] == ("decnet-updater", 0o640)
    agent, forwarder = (
        accounts.unit("decnet-agent.service"),
        accounts.unit("decnet-forwarder.service"),
    )
    for reader in (agent, forwarder):
        assert can(reader, scratch, "read", bundle.key_path("worker")), reader.name
        assert not can(reader, scratch, "read", bundle.key_path("updater")), reader.name
        assert not can(reader, scratch, "create", bundle_dir), reader.name
    assert can(updater, scratch, "read", bundle.key_path("updater"))


def test_a_bundle_directory_laid_out_the_old_way_is_refused_before_anything_changes(
    scratch, accounts, worker
):
    """``root:root 0755``, as installs before this layout made it: the first renewal step says
    what to change and leaves the bundle as it was."""
    root, bundle_dir = etc_copy(scratch, worker[0], "old-root")
    os.chown(bundle_dir, 0, 0)
    bundle_dir.chmod(0o755)
    before = {p.name: p.read_bytes() for p in bundle_dir.iterdir()}
    result = as_the_updater_unit(accounts, scratch, root, RENEW_CSRS, bundle_dir)
    assert result.returncode != 0
    assert "a new worker.key could not keep the group" in result.stderr
    assert {p.name: p.read_bytes() for p in bundle_dir.iterdir()} == before
