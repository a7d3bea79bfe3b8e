"""The sandbox's model/view split: decnet/sandbox returns report objects, decnet/cli renders them.

The transcripts below are what ``sandbox up``, ``status`` and ``poke`` printed
before the split (docs/Sandbox.md), rendered now from the report objects alone.
"""

import ast
import io
from pathlib import Path

import attrs
import pytest

from decnet.cli import sandbox_view
from decnet.cli.sandbox_view import SandboxConsole
from decnet.master.registry import Host
from decnet.sandbox import layout, poke
from decnet.sandbox import report as r
from decnet.sandbox.prepare import Prepared, WorkerPlan

REPO = Path(__file__).resolve().parent.parent
SANDBOX = REPO / "decnet" / "sandbox"


def _imported_modules(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


@pytest.mark.parametrize("path", sorted(SANDBOX.glob("*.py")), ids=lambda p: p.name)
def test_the_sandbox_imports_nothing_from_the_cli(path):
    imported = _imported_modules(ast.parse(path.read_text()))
    assert [m for m in imported if m == "decnet.cli" or m.startswith("decnet.cli.")] == []


def test_the_sandbox_commands_run_on_the_clis_one_reactor_runner():
    for path in sorted((REPO / "decnet" / "cli").glob("sandbox*.py")):
        tree = ast.parse(path.read_text())
        calls = [ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)]
        assert not [c for c in calls if c.endswith("react")], path.name
    source = (REPO / "decnet" / "cli" / "sandbox.py").read_text()
    assert "from decnet.cli.runtime import run_async" in source


def shown(*events) -> list[str]:
    out = io.StringIO()
    console = SandboxConsole(out)
    for event in events:
        console.show(event)
    return out.getvalue().splitlines()


def _host(name: str, address: str, revoked: str | None = None) -> Host:
    return Host(
        name=name,
        address=address,
        agent_port=8765,
        updater_port=8766,
        worker_fingerprint="ab" * 32,
        updater_fingerprint="cd" * 32,
        enrolled_at="2026-01-01T00:00:00Z",
        revoked_at=revoked,
    )


def test_sandbox_up_reads_as_it_did(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sb = layout.SandboxLayout.at(tmp_path / "state")
    w1, w2, w3 = (sb.worker(i, 1) for i in (1, 2, 3))
    prepared = Prepared(
        created=True,
        master_home=sb.master.home,
        ca_fingerprint="0cef0fe8f4b56c7f" + "0" * 48,
        identity=None,
        workers=(
            WorkerPlan(w1, _host("w1", w1.address), "enrolled"),
            WorkerPlan(w2, _host("w2", w2.address), "reused"),
            WorkerPlan(w3, _host("w3", w3.address, "2026-02-03T04:05:06Z"), "decommissioned"),
        ),
        others=("w7",),
    )
    spec = w1.spec()
    states = {
        d["name"]: {s["type"]: {"state": "listening"} for s in d["services"]}
        for d in spec["deckies"]
    }
    states["cache-03"]["redis"] = {"state": "failed\x1b[2J"}
    lines = shown(
        r.Preparing(sb.root),
        prepared,
        r.DaemonsStarting(sb.logs_dir),
        r.DaemonStarted("listener", 24202, r.Where("127.0.0.1", 35865)),
        r.DaemonStarted("w1-updater", 24274, r.Where("127.0.1.1", 8766), agent_port=8765),
        r.DaemonStarted("w1-forwarder", 24275, r.Where("127.0.0.1", 35865, forwards=True)),
        r.ReleaseStarting(),
        r.WheelhouseBuilding(),
        r.WheelhouseReady(sb.cache_dir / "wheelhouse-k", 26, "built", 5.04),
        r.WheelhouseReady(sb.cache_dir / "wheelhouse-k", 26, "cached"),
        r.ReleaseBuilt("64384370ad09f39e", 128, 10813524),
        r.AlreadyCurrent("w2", "64384370ad09f39e"),
        r.RolloutProgress("w1", "pushing release 64384370ad09f39e (10813524 bytes)"),
        r.StillInstalling(("w1", "w2"), 10.0),
        r.DeployStarting(),
        r.Deployed("w1", spec, {"deckies": states}),
        r.DeployDone(7, ("w1: redis: address already in use",)),
        r.DeployDone(14, ()),
        r.Ready(30.2, 2, 35865, sb.logs_dir, sb.root),
        r.ChildExited("w1-updater", "exited with code 1", "Couldn't listen", sb.log("w1-updater")),
        r.Stopping(5),
        r.Stopped(0.21, sb.root),
    )
    assert lines == [
        "DECNET sandbox in state",
        "  master   state/master  CA created, fingerprint 0C:EF:0F:E8:F4:B5:6C:7F...",
        "  w1       127.0.1.1    enrolled, bundle state/workers/w1/bundle",
        "  w2       127.0.1.2    reused, bundle state/workers/w2/bundle",
        "  w3       decommissioned at 2026-02-03T04:05:06Z: left out",
        "  (also enrolled, not started: w7)",
        "Starting the daemons (real twistd processes, logs in state/logs/):",
        "  listener       127.0.0.1:35865                pid 24202",
        "  w1-updater     127.0.1.1:8766 (agent :8765)   pid 24274",
        "  w1-forwarder   -> 127.0.0.1:35865             pid 24275",
        "Release of this checkout (the same path as `decnet-admin update --all`):",
        "  building the offline wheelhouse from this environment with pip "
        "(first run only; pip may use its index or cache) ...",
        "  wheelhouse state/cache/wheelhouse-k (26 wheels, built in 5.0s)",
        "  wheelhouse state/cache/wheelhouse-k (26 wheels, cached)",
        "  release 64384370ad09f39e: 128 files, 10.3 MiB",
        "  [w2] release 64384370ad09f39e already installed and current",
        "  [w1] pushing release 64384370ad09f39e (10813524 bytes)",
        "  ... installing on w1, w2 (10.0s; pip, offline)",
        "Deckies (deployed through each agent's mTLS API; every listener bound):",
        "  w1  web-01     127.1.1.1     ssh:2222 http:8080",
        "      files-02   127.1.1.2     ftp:2121 telnet:2323 smtp:2525",
        "      cache-03   127.1.1.3     redis:6379 (failed\\x1b[2J) tcp-banner:3306",
        "  1 of 7 services failed to start:",
        "    w1: redis: address already in use",
        "  all 14 services listening",
        "",
        "Ready in 30.2s: 2 workers, listener on 127.0.0.1:35865, logs in state/logs/",
        "Play the attacker from another terminal:  decnet-admin sandbox poke --dir state",
        "Ctrl-C stops every process this command started.",
        "",
        "!! w1-updater exited with code 1: Couldn't listen",
        "!! (its log: state/logs/w1-updater.log)",
        "",
        "Stopping 5 processes ...",
        "Stopped in 0.2s; everything is kept in state (`sandbox up` starts it again).",
    ]


def test_what_a_child_left_in_its_log_cannot_drive_the_terminal(tmp_path):
    words = "\x1b]0;owned\x07\u202eevil\nsecond line"
    (line, _) = shown(r.ChildExited("w1-agent", "was killed by signal 9", words, tmp_path / "l"))
    assert (
        line == "!! w1-agent was killed by signal 9: \\x1b]0;owned\\x07\\u202eevil\\x0asecond line"
    )


def test_the_live_view_prints_a_table_then_an_event_header_once_per_table():
    row = r.HostRow("w1", "127.0.1.1", "up", "r1", 3, 7, 7, lag=0)
    entry = {"source_worker": "w1", "timestamp": "2026-01-02T03:04:05.250Z", "msgid": "x"}
    lines = shown(
        r.HostTable((row,)),
        r.FeedEvents((entry,)),
        r.FeedEvents((entry,)),
        r.HostTable((row,)),
        r.FeedEvents((entry,)),
    )
    table = [
        "",
        "WORKER  ADDRESS    AGENT  RELEASE  DECKIES  LISTENING  LOG LAG",
        "------  ---------  -----  -------  -------  ---------  -------",
        "w1      127.0.1.1  up     r1       3        7/7        0 B",
        "",
    ]
    header = "TIME (UTC)    WORKER  DECKY       SERVICE     EVENT       SRC              DETAILS"
    event = "03:04:05.250  w1      -           -           x           -"
    assert lines == [*table, header, event, event, *table, header, event]


def test_every_object_the_sandbox_reports_has_a_rendering():
    reported = [
        cls
        for cls in vars(r).values()
        if isinstance(cls, type) and attrs.has(cls) and cls.__module__ == r.__name__
    ]
    data_only = {r.Where, r.HostRow, r.ProcessRow, r.StatusReport, r.DownReport}
    live = {r.HostTable, r.FeedEvents}
    assert set(reported) - data_only - live <= set(sandbox_view.RENDER)
    assert {Prepared, poke.PokeStarted, poke.Outcome} <= set(sandbox_view.RENDER)


def _status(up_running: bool) -> r.StatusReport:
    log = "/s/logs/{}.log"
    return r.StatusReport(
        Path("/s"),
        found=True,
        phase="running",
        listener={"host": "127.0.0.1", "port": 45039},
        release="64384370ad09f39e",
        processes=(
            r.ProcessRow("up", 11017, up_running, log.format("sandbox")),
            r.ProcessRow(
                "listener", 11026, True, log.format("listener"), r.Where("127.0.0.1", 45039)
            ),
            r.ProcessRow(
                "w1-forwarder",
                11054,
                True,
                log.format("w1-forwarder"),
                r.Where("127.0.0.1", 45039, True),
            ),
        ),
        hosts=(r.HostRow("w1", "127.0.1.1", "up", "64384370ad09f39e", 3, 7, 7, lag=0),),
    )


def test_status_reads_as_it_did_and_says_when_up_is_gone():
    assert sandbox_view.status_lines(_status(up_running=False)) == [
        "Sandbox in /s: running",
        "PROCESS       PID    STATE    ADDRESS             LOG\n"
        "------------  -----  -------  ------------------  ------------------------\n"
        "up            11017  GONE                         /s/logs/sandbox.log\n"
        "listener      11026  running  127.0.0.1:45039     /s/logs/listener.log\n"
        "w1-forwarder  11054  running  -> 127.0.0.1:45039  /s/logs/w1-forwarder.log",
        "",
        "WORKER  ADDRESS    AGENT  RELEASE           DECKIES  LISTENING  LOG LAG\n"
        "------  ---------  -----  ----------------  -------  ---------  -------\n"
        "w1      127.0.1.1  up     64384370ad09f39e  3        7/7        0 B",
        "",
        "`sandbox up` is gone but some of its processes still run: `decnet-admin sandbox down`.",
    ]
    assert not _status(up_running=False).healthy
    healthy = _status(up_running=True)
    assert healthy.healthy and not healthy.orphaned
    assert sandbox_view.status_json(healthy)["processes"][2] == {
        "name": "w1-forwarder",
        "pid": 11054,
        "running": True,
        "log": "/s/logs/w1-forwarder.log",
    }
    assert sandbox_view.status_json(r.StatusReport(Path("/s"), found=False)) == {
        "dir": "/s",
        "healthy": False,
        "processes": [],
    }


def test_a_status_with_an_agent_down_is_not_healthy():
    report = attrs.evolve(
        _status(up_running=True), hosts=(r.HostRow("w1", "127.0.1.1", "DOWN", detail="x"),)
    )
    assert not report.healthy


def _poke(wait: float, arrived: bool) -> poke.PokeReport:
    t1 = poke.Target("w1", "web-01", "ssh", "ssh", "127.1.1.1", 2222)
    t2 = poke.Target("w2", "cache-03", "redis", "redis", "127.1.2.3", 6379)
    o1 = poke.Outcome(t1, True, "SSH-2.0-x: password login root / 123456 -> refused", 40001)
    o2 = poke.Outcome(t2, False, "failed: ConnectionRefusedError: refused")
    found = {o1.key(): "w2"} if arrived else {}
    return poke.PokeReport(
        outcomes=(o1, o2),
        found=found,
        seconds=1.2,
        seconds_to_master=0.114 if arrived else None,
        wait=wait,
        missing=() if arrived or not wait else (o1,),
        misattributed=((o1, "w2"),) if arrived else (),
    )


def test_poke_reads_as_it_did():
    report = _poke(3, arrived=False)
    assert shown(poke.started([o.target for o in report.outcomes]), *report.outcomes) == [
        "Poking 2 services on 2 deckies of 2 workers (w1, w2) ...",
        "  w1   web-01    ssh        127.1.1.1:2222   "
        "SSH-2.0-x: password login root / 123456 -> refused",
        "  w2   cache-03  redis      127.1.2.3:6379   "
        "FAILED failed: ConnectionRefusedError: refused",
    ]
    assert sandbox_view.poke_lines(report) == [
        "1 of 2 conversations done in 1.2s.",
        "  not at the master after 3s: w1 web-01 ssh (src port 40001)",
    ]
    assert not report.ok
    wrong = _poke(10, arrived=True)
    assert sandbox_view.poke_lines(wrong)[1:] == ["  WRONG WORKER: w1 web-01 ssh arrived as w2"]
    doc = sandbox_view.poke_json(wrong)
    assert doc["seconds_to_master"] == 0.114 and doc["misattributed"] == [["w1 web-01 ssh", "w2"]]
    assert doc["conversations"][0]["arrived_as"] == "w2" and doc["missing"] == []
    unchecked = _poke(0, arrived=False)
    assert sandbox_view.poke_json(unchecked)["missing"] == []
    assert sandbox_view.poke_lines(unchecked) == ["1 of 2 conversations done in 1.2s."]


def test_a_poke_that_all_arrived_says_so():
    report = attrs.evolve(
        _poke(10, arrived=True),
        outcomes=(_poke(10, arrived=True).outcomes[0],),
        found={("127.1.1.1", 2222, 40001): "w1"},
        misattributed=(),
    )
    assert report.ok
    assert sandbox_view.poke_lines(report)[1] == (
        "All 1 reached the master 0.11s after the last one ended, each recorded under the "
        "worker it was sent to (source_worker, from its certificate)."
    )


def test_down_reads_as_it_did():
    assert shown(
        r.UpAsked(4242),
        r.UpKilled(4242, 45.0),
        r.LeftoversStopping(("listener", "w1-updater")),
        r.LeftoverKilled("w1-updater", 4343),
    ) == [
        "Asked `sandbox up` (pid 4242) to stop its processes; waiting ...",
        "`sandbox up` (pid 4242) did not stop in 45s; killing it",
        "Stopping 2 leftover processes: listener, w1-updater",
        "  w1-updater (pid 4343) ignored SIGTERM; killed",
    ]
    assert sandbox_view.down_lines(r.DownReport(Path("/s"), found=True, still_running=("up",))) == [
        "Still running: up"
    ]
