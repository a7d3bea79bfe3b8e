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

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import attrs
import pytest

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

    def setpriv(self) -> list[str]:
        groups = ["--groups", ",".join(map(str, self.groups))] if self.groups else []
        return [
            "setpriv",
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            *(groups or ["--clear-groups"]),
            "--inh-caps=-all",
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
        return Creds(user, uid, gid, tuple(sorted(groups - {gid})), d.get("UMask", ["0022"])[0])

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


def command(creds: Creds, argv, scratch: Path, *, python: bool = False) -> list[str]:
    argv = [*creds.setpriv(), *map(str, argv)]
    detour = _interpreter_detour() if python else None
    if detour is None:
        return argv
    blocked, child = detour
    stash = Path(tempfile.mkdtemp(dir=scratch))
    script = (
        'mount --bind "$1" "$2" && mount -t tmpfs -o mode=0755 tmpfs "$3" && mkdir -p "$1" '
        '&& mount --bind "$2" "$1" && shift 3 && exec "$@"'
    )
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh",
            child, str(stash), blocked, *argv]  # fmt: skip


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
        ["decommission", "gone"],
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
            python=True,
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
    the agent's log through decnet-log, its own state)."""
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
