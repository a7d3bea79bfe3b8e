"""The acceptance scenario (issue #6), end to end on one machine.

Real ``twistd`` processes, real certificates, real clients, nothing mocked:

``sandbox up --workers 2`` (a subprocess of this test) → deckies deployed →
``sandbox poke`` → every event at the master under the right ``source_worker``
and nothing else → ``update --all`` with a good release → both agents report
it → a bad release → rolled back, healthy on the previous one → ``renew --all``
while ``sandbox poke`` attacks the decoys: every certificate replaced and no log
line lost (issue #13) → ``decommission
w2`` → its forwarder is refused by the listener and the master refuses to talk
to its agent → ``sandbox down`` leaves no process behind → a second ``up``
reuses everything and stops cleanly on SIGINT.

The sandbox runs on its own loopback network (``--net``), so it does not meet a
sandbox a developer may be running on the default one.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from decnet import config, pki
from decnet.listener.feed import read_feed
from decnet.listener.workers import read_state, state_path
from decnet.master.registry import Registry
from decnet.sandbox.feeds import event_params
from tests.support import BIN, admin, wait_for

pytestmark = pytest.mark.slow

WORKERS = ("w1", "w2")


def _free_net() -> int:
    """A ``--net`` whose agent and updater ports are free on both workers.

    Several checkouts may run this test at once: each starts its search at a
    place of its own (its pid), so two runs rarely even try the same net.
    """
    start = os.getpid()
    for step in range(200):
        net = 20 + (start + step) % 200
        try:
            for index in range(1, len(WORKERS) + 1):
                for port in (8765, 8766):
                    with socket.socket() as probe:
                        probe.bind((f"127.0.{net}.{index}", port))
        except OSError:
            continue
        return net
    raise AssertionError("no free sandbox network on 127.0.20-219.x")


# worker i: 127.0.NET.i, its deckies 127.NET.i.j (DECNET_E2E_NET pins it)
NET = int(os.environ.get("DECNET_E2E_NET") or _free_net())


def sandbox(directory: Path, action: str, *args: str, timeout: float = 120):
    return subprocess.run(
        [str(BIN / "decnet-admin"), "sandbox", action, "--dir", str(directory), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line mentions ``text`` (verification in a test, never daemon code)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if text.encode() in cmdline:
            found.append(int(entry.name))
    return found


class Up:
    """``decnet-admin sandbox up`` as a child of the test, its output in a file."""

    def __init__(self, directory: Path, out: Path, *args: str):
        self.directory = directory
        self.out = out
        with open(out, "ab") as fh:
            self.process = subprocess.Popen(
                [
                    str(BIN / "decnet-admin"),
                    "sandbox",
                    "up",
                    "--dir",
                    str(directory),
                    "--net",
                    str(NET),
                    *args,
                ],
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def state(self) -> dict:
        try:
            return json.loads((self.directory / config.SANDBOX_STATE_FILE).read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def wait_running(self, timeout: float) -> dict:
        def running():
            if self.process.poll() is not None:
                raise AssertionError(
                    f"sandbox up exited with {self.process.returncode}:\n{self.output()}"
                )
            doc = self.state()
            return doc if doc.get("phase") == "running" else None

        return wait_for(running, timeout, 0.2, what="the sandbox to be running")


@pytest.fixture
def sandbox_dir(tmp_path):
    directory = tmp_path / "sbx"
    yield directory
    sandbox(directory, "down")
    for pid in processes_mentioning(str(directory)):  # whatever a failed test left behind
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def master_of(directory: Path) -> config.MasterPaths:
    return config.MasterPaths(directory / "master")


def feed(directory: Path, worker: str) -> list[dict]:
    path = directory / "master" / "ingest" / worker / "decnet.jsonl"
    return read_feed(path) if path.exists() else []


def decoy_log(directory: Path, worker: str) -> bytes:
    return (directory / "workers" / worker / "decnet.log").read_bytes()


def mirror(directory: Path, worker: str) -> bytes:
    path = directory / "master" / "ingest" / worker / "decnet.log"
    return path.read_bytes() if path.exists() else b""


def health(directory: Path) -> dict:
    result = admin(master_of(directory), "check", "--json")
    return {row["name"]: row for row in json.loads(result.stdout)}


def release_of(result) -> str:
    first = result.stdout.splitlines()[0]
    assert first.startswith("Release "), result.stdout + result.stderr
    return first.split()[1].rstrip(":")


def listener_refusals(directory: Path, worker: str) -> int:
    text = (directory / "logs" / "listener.log").read_text(errors="replace")
    return text.count(f"certificate of '{worker}' is revoked")


def listener_cuts(directory: Path) -> int:
    """How many connections the listener dropped because a certificate was revoked."""
    text = (directory / "logs" / "listener.log").read_text(errors="replace")
    return text.count("its certificate was revoked")


def test_the_whole_product_on_one_machine(sandbox_dir, tmp_path, wheelhouse, release_trees):
    d = sandbox_dir
    paths = master_of(d)

    # -- sandbox up: CA, enrollment, daemons, first release (offline), deckies --------
    up = Up(d, tmp_path / "up-1.out", "--workers", "2", "--wheelhouse", str(wheelhouse))
    doc = up.wait_running(240)
    assert sorted(doc["workers"]) == list(WORKERS)
    out = up.output()
    assert "CA created" in out and out.count("enrolled, bundle") == 2, out
    assert "all 14 services listening" in out, out
    first_release = doc["release"]
    for name in ("listener", "w1-updater", "w1-forwarder", "w2-updater", "w2-forwarder"):
        assert name in doc["processes"], doc["processes"]

    status = sandbox(d, "status", "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    report = json.loads(status.stdout)
    assert report["healthy"]
    assert {p["name"] for p in report["processes"]} >= {"up", "w1-agent", "w2-agent"}
    for host in report["hosts"]:
        assert host["agent"] == "up" and host["release"] == first_release
        assert (host["deckies"], host["services"], host["listening"]) == (3, 7, 7)

    # -- poke: every conversation reaches the master under the worker it went to ------
    poked = sandbox(d, "poke", "--json")
    assert poked.returncode == 0, poked.stdout + poked.stderr
    conversations = json.loads(poked.stdout)["conversations"]
    assert len(conversations) == 14
    assert {c["type"] for c in conversations} == {
        "ssh",
        "http",
        "telnet",
        "ftp",
        "smtp",
        "redis",
        "tcp-banner",
    }
    assert all(c["ok"] and c["arrived_as"] == c["worker"] for c in conversations), conversations

    # Independently of poke's own check: each worker's mirror is its decoy log byte for
    # byte, every feed entry carries that worker's certificate name and concerns only
    # that worker's deckies, and nothing arrived under any other name.
    for worker in WORKERS:
        wait_for(
            lambda w=worker: mirror(d, w) == decoy_log(d, w),
            20,
            what=f"{worker}'s log at the master",
        )
    ingest = d / "master" / "ingest"  # (and the event index, events.sqlite)
    assert sorted(p.name for p in ingest.iterdir() if p.is_dir()) == list(WORKERS)
    # ... and the listener's per-worker state (workers.json) knows exactly these workers.
    assert sorted(read_state(state_path(ingest))["workers"]) == list(WORKERS)
    for i, worker in enumerate(WORKERS, start=1):
        entries = wait_for(
            lambda w=worker: (
                feed(d, w) if len(feed(d, w)) == decoy_log(d, w).count(b"\n") else None
            ),
            20,
            what=f"{worker}'s feed",
        )
        assert {e["source_worker"] for e in entries} == {worker}
        assert all(event_params(e)["dst_ip"].startswith(f"127.{NET}.{i}.") for e in entries)
        keys = {
            (
                event_params(e)["dst_ip"],
                int(event_params(e)["dst_port"]),
                int(event_params(e)["src_port"]),
            )
            for e in entries
            if e["msgid"] == "disconnect"
        }
        mine = {
            (c["address"], c["port"], c["src_port"]) for c in conversations if c["worker"] == worker
        }
        assert mine <= keys, (mine - keys, worker)
        logins = [e for e in entries if e["msgid"] == "login"]
        assert {e["app_name"] for e in logins} >= {"ssh", "http", "telnet", "ftp", "smtp", "redis"}

    # ... and the live view printed them, one line each, with the worker they came from.
    def live_events():
        rows = [line.split() for line in up.output().splitlines() if line[:2].isdigit()]
        return {(r[1], r[3], r[4]) for r in rows if len(r) >= 5}

    wanted = {(w, "ssh", "login") for w in WORKERS} | {(w, "redis", "command") for w in WORKERS}
    wait_for(lambda: wanted <= live_events(), 10, what="the events in up's live view")

    # -- update --all with a good release: both agents report it -------------------------
    good = admin(
        paths,
        "update",
        "--all",
        "--root",
        str(release_trees["good2"]),
        "--wheelhouse",
        str(wheelhouse),
    )
    assert good.returncode == 0, good.stdout + good.stderr
    good_id = release_of(good)
    assert good_id != first_release
    rows = health(d)
    assert {w: rows[w]["health"]["release"] for w in WORKERS} == dict.fromkeys(WORKERS, good_id)

    # -- a bad release (its agent dies at start): rolled back, healthy on the good one ---
    bad = admin(
        paths,
        "update",
        "--all",
        "--root",
        str(release_trees["crash"]),
        "--wheelhouse",
        str(wheelhouse),
    )
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert bad.stdout.count("rolled_back") >= 2, bad.stdout
    rows = health(d)
    for worker in WORKERS:
        assert rows[worker]["ok"] and rows[worker]["health"]["release"] == good_id, rows

    # The deckies came back with each restarted agent and still ship to the master.
    again = sandbox(d, "poke", "--json")
    assert again.returncode == 0, again.stdout + again.stderr

    # -- renew --all while the decoys are attacked: no log line lost (issue #13) ---------
    before = {h.name: h for h in Registry(paths.registry).list()}
    attack = subprocess.Popen(
        ["sh", "-c", f'for i in 1 2 3; do "{BIN}/decnet-admin" sandbox poke --dir "{d}"; done'],
        stdout=subprocess.DEVNULL,
    )
    try:
        renewed = admin(paths, "renew", "--all", "--before", "400d", "--json")
    finally:
        attack.wait(120)
    assert renewed.returncode == 0, renewed.stdout + renewed.stderr
    assert [h["result"] for h in json.loads(renewed.stdout)["hosts"]] == ["renewed", "renewed"]
    poked = sandbox(d, "poke", "--json")  # after the switch: only the new certificates work
    assert poked.returncode == 0, poked.stdout + poked.stderr
    for worker in WORKERS:
        wait_for(
            lambda w=worker: mirror(d, w) == decoy_log(d, w),
            30,
            what=f"{worker}'s whole log at the master after the renewal",
        )
        host = Registry(paths.registry).get(worker)
        assert host.worker_fingerprint != before[worker].worker_fingerprint
        bundle = pki.WorkerBundle.load(d / "workers" / worker / "bundle")
        assert pki.fingerprint(pki.load_cert(bundle.cert_path("worker"))) == host.worker_fingerprint

    # -- decommission w2: refused by the listener and by the master's AgentClient ------
    refusals = listener_refusals(d, "w2")
    cuts = listener_cuts(d)  # the renewal's revocation of the old certificates cut some
    # --no-teardown: w2's deckies stay up, so a new event there shows the log is cut.
    result = admin(paths, "decommission", "w2", "--yes", "--no-teardown")
    assert result.returncode == 0, result.stderr
    wait_for(
        lambda: listener_cuts(d) > cuts or listener_refusals(d, "w2") > refusals,
        30,
        what="the listener to drop w2",
    )
    before_mirror = mirror(d, "w2")
    before_feed = len(feed(d, "w2"))
    before_log = len(decoy_log(d, "w2"))
    refusals = listener_refusals(d, "w2")
    # A new decoy event on w2 ...
    lost = sandbox(d, "poke", "--worker", "w2", "--wait", "3")
    assert lost.returncode == 1 and "not at the master" in lost.stdout, lost.stdout
    assert len(decoy_log(d, "w2")) > before_log
    # ... the forwarder keeps trying and is refused in the handshake every time ...
    wait_for(
        lambda: listener_refusals(d, "w2") > refusals,
        30,
        what="the listener to refuse w2's forwarder again",
    )
    # ... and nothing of it ever reaches the master.
    assert mirror(d, "w2") == before_mirror
    assert len(feed(d, "w2")) == before_feed
    status_w2 = admin(paths, "status", "w2")
    assert status_w2.returncode == 2  # not contacted: as an unreachable host
    said = status_w2.stdout + status_w2.stderr
    assert "'w2' was decommissioned" in said and "refusing to contact it" in said, said
    # w1 is untouched.
    assert sandbox(d, "poke", "--worker", "w1").returncode == 0

    # -- sandbox down: nothing left ----------------------------------------------------
    down = sandbox(d, "down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert up.process.wait(30) == 0, up.output()
    assert processes_mentioning(str(d)) == []
    assert sandbox(d, "down").returncode == 0  # idempotent
    assert sandbox(d, "status").returncode == 1

    # -- a second up reuses the CA, the registry, the bundles and the installs ----------
    releases_before = sorted(
        p.name for p in (d / "workers" / "w1" / "install" / "releases").iterdir()
    )
    up2 = Up(d, tmp_path / "up-2.out", "--workers", "2", "--wheelhouse", str(wheelhouse))
    doc = up2.wait_running(120)
    out = up2.output()
    assert "CA reused" in out and re.search(rf"w1 +127\.0\.{NET}\.1 +reused", out), out
    assert "w2       decommissioned" in out and "enrolled, bundle" not in out, out
    assert sorted(doc["workers"]) == ["w1"]
    releases_after = sorted(
        p.name for p in (d / "workers" / "w1" / "install" / "releases").iterdir()
    )
    assert releases_after == releases_before  # re-activated, not reinstalled
    up2.process.send_signal(signal.SIGINT)  # Ctrl-C
    assert up2.process.wait(60) == 0, up2.output()
    assert "Stopping" in up2.output()
    assert processes_mentioning(str(d)) == []
    assert json.loads((d / config.SANDBOX_STATE_FILE).read_text())["processes"] == {}
