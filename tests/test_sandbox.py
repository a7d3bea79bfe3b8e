"""The sandbox's pure parts: layout and addresses, sandbox.json and PID identity, what the
live view prints, feed tailing, the wheelhouse recipe, matching poke's conversations."""

import json
import os
from pathlib import Path

import pytest

from decnet import config
from decnet.agent.spec import parse_spec
from decnet.cli import sandbox_live
from decnet.errors import ConfigError, ValidationError
from decnet.master import wheelhouse
from decnet.sandbox import feeds, layout, poke, report, state
from decnet.sandbox.control import process_order

# -- layout ------------------------------------------------------------------------


def test_each_worker_gets_its_own_loopback_addresses():
    assert layout.worker_address(1, 2) == "127.0.1.2"
    assert layout.decky_address(1, 2, 3) == "127.1.2.3"
    w = layout.SandboxLayout.at("/tmp/x").worker(3, 9)
    assert (w.name, w.address, w.agent_port, w.updater_port) == ("w3", "127.0.9.3", 8765, 8766)


def test_the_default_spec_is_valid_and_covers_every_service_type_on_unprivileged_ports():
    spec = layout.default_spec(1, 2)
    parsed = parse_spec(spec)  # the agent's own validation: no conflict, no unknown key
    assert len(parsed.deckies) == 3
    targets = layout.spec_targets(spec)
    assert {t["type"] for t in targets} == {
        "ssh",
        "telnet",
        "http",
        "ftp",
        "smtp",
        "redis",
        "tcp-banner",
    }
    assert all(t["port"] >= 1024 for t in targets)
    assert {t["address"] for t in targets} == {"127.1.2.1", "127.1.2.2", "127.1.2.3"}


def test_two_workers_never_share_an_address():
    one = {(t["address"], t["port"]) for t in layout.spec_targets(layout.default_spec(1, 1))}
    two = {(t["address"], t["port"]) for t in layout.spec_targets(layout.default_spec(1, 2))}
    assert not one & two


@pytest.mark.parametrize(("workers", "net"), [(0, 1), (config.SANDBOX_MAX_WORKERS + 1, 1), (2, 0)])
def test_out_of_range_sizes_are_refused(workers, net):
    with pytest.raises(ValidationError):
        layout.validate(workers, net)


def test_paths_of_a_sandbox_directory(tmp_path):
    sb = layout.SandboxLayout.at(tmp_path)
    assert sb.master.home == tmp_path / "master"
    assert sb.feed("w1") == tmp_path / "master" / "ingest" / "w1" / "decnet.jsonl"
    assert sb.mirror("w1") == tmp_path / "master" / "ingest" / "w1" / "decnet.log"
    assert sb.log("w1-agent") == tmp_path / "logs" / "w1-agent.log"
    assert sb.state_file == tmp_path / "sandbox.json"


# -- sandbox.json and process identity --------------------------------------------------

STAT = "4242 (twistd (x) y) S 1 4242 4242 0 -1 4194560 0 0 0 0 7 3 0 0 20 0 3 0 {start} 1 2 3\n"


def fake_proc(root: Path, pid: int, start: int, state_letter: str = "S") -> None:
    (root / str(pid)).mkdir(parents=True, exist_ok=True)
    text = STAT.format(start=start).replace(") S ", f") {state_letter} ")
    (root / str(pid) / "stat").write_text(text)
    (root / "self").mkdir(exist_ok=True)
    (root / "self" / "stat").write_text(text)


def test_the_start_time_is_read_after_the_last_parenthesis():
    assert state.parse_stat(STAT.format(start=987654)) == ("S", 987654)


def test_a_recorded_pid_counts_only_while_its_start_time_matches(tmp_path):
    fake_proc(tmp_path, 4242, 1000)
    assert state.is_running(state.ProcessRecord(4242, 1000), tmp_path)
    assert not state.is_running(state.ProcessRecord(4242, 999), tmp_path)  # PID reused
    assert not state.is_running(state.ProcessRecord(4343, 1000), tmp_path)  # gone
    fake_proc(tmp_path, 4444, 5, "Z")
    assert not state.is_running(state.ProcessRecord(4444, 5), tmp_path)  # zombie


def test_this_process_is_running_by_its_real_start_time():
    me = os.getpid()
    assert state.is_running(state.ProcessRecord(me, state.start_time(me)))
    assert not state.is_running(state.ProcessRecord(me, state.start_time(me) + 1))


def test_a_process_whose_pid_was_reused_is_never_signalled(tmp_path):
    fake_proc(tmp_path, os.getpid(), 1)  # "our" pid, but started at another time
    assert not state.signal_if_running(state.ProcessRecord(os.getpid(), 2), proc=tmp_path)


def test_the_state_file_round_trips_and_refuses_other_files(tmp_path):
    path = tmp_path / "sandbox.json"
    assert state.load(path) is None
    doc = state.empty_state(3)
    doc["processes"] = {"listener": state.ProcessRecord(10, 20, ("twistd",), "l.log").as_dict()}
    state.save(path, doc)
    assert path.stat().st_mode & 0o777 == 0o600
    loaded = state.load(path)
    assert state.processes(loaded) == {
        "listener": state.ProcessRecord(10, 20, ("twistd",), "l.log")
    }
    path.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ConfigError):
        state.load(path)


def test_status_lists_the_listener_then_each_worker_in_order():
    names = ["w10-forwarder", "w2-agent", "listener", "w2-updater", "w10-updater", "w2-forwarder"]
    assert sorted(names, key=process_order) == [
        "listener",
        "w2-updater",
        "w2-agent",
        "w2-forwarder",
        "w10-updater",
        "w10-forwarder",
    ]


# -- what the live view prints ------------------------------------------------------------


def entry(msgid, *params, worker="w1", host="web-01", app="ssh", **extra):
    base = [
        ["session", "abc"],
        ["src_ip", "203.0.113.7"],
        ["src_port", "51514"],
        ["dst_ip", "127.1.1.1"],
        ["dst_port", "2222"],
    ]
    return {
        "source_worker": worker,
        "parsed": True,
        "timestamp": "2026-01-02T03:04:05.250000Z",
        "hostname": host,
        "app_name": app,
        "msgid": msgid,
        "structured_data": [{"id": "decnet@32473", "params": base + [list(p) for p in params]}],
        **extra,
    }


def test_a_login_event_is_one_line_with_worker_decky_service_and_credentials():
    line = sandbox_live.event_line(
        entry(
            "login",
            ("method", "password"),
            ("user", "root"),
            ("password", "hunter 2"),
            ("result", "refused"),
        )
    )
    assert line.split()[:5] == ["03:04:05.250", "w1", "web-01", "ssh", "login"]
    assert line.endswith('password: user=root password="hunter 2" -> refused')


def test_event_details_per_type():
    assert sandbox_live.event_details(entry("connect")) == "src_port=51514"
    assert sandbox_live.event_details(
        entry("command", ("command", "CONFIG"), ("args", "SET dir /x"))
    ) == ('command=CONFIG args="SET dir /x"')
    unknown = sandbox_live.event_details(entry("weird", ("what", "ever")))
    assert unknown == "what=ever"


def test_attacker_text_cannot_drive_the_terminal():
    nasty = "\x1b[2J\x1b]0;owned\x07\u202eevil\u0085"
    line = sandbox_live.event_line(entry("login", ("user", nasty), ("password", "x")))
    assert "\x1b" not in line and "\u202e" not in line and "\x07" not in line
    assert "\\x1b[2J" in line and "\\u202e" in line
    raw = sandbox_live.event_line({"source_worker": "w2", "parsed": False, "raw": "\x1b[31mred"})
    assert "\x1b" not in raw and "unparsed" in raw


def test_long_values_are_cut():
    line = sandbox_live.event_line(entry("login", ("user", "A" * 500)))
    assert "A" * 37 + "..." in line and "A" * 41 not in line
    assert len(line) <= 132
    many = sandbox_live.event_line(
        entry("kex", ("client_version", "SSH-2.0-" + "x" * 30), ("hassh", "f" * 32))
    )
    assert len(many) <= 132 and many.endswith("...")


def test_the_host_table_shows_health_release_deckies_and_lag():
    rows = [
        report.row_from_status(
            "w1",
            "127.0.1.1",
            {"status": "ok", "release": "abc"},
            {"summary": {"deckies": 3, "services": 7, "listening": 6}},
            2048,
        ),
        report.row_from_status("w2", "127.0.1.2", None, None, 0, "cannot reach worker w2"),
        report.HostRow("w3", "127.0.1.3", "decommissioned", lag=10),
    ]
    lines = sandbox_live.host_table(rows).splitlines()
    assert lines[0].split() == [
        "WORKER",
        "ADDRESS",
        "AGENT",
        "RELEASE",
        "DECKIES",
        "LISTENING",
        "LOG",
        "LAG",
    ]
    assert lines[2].split() == ["w1", "127.0.1.1", "up", "abc", "3", "6/7", "2.0", "KiB"]
    assert lines[3].startswith("w2") and "DOWN (cannot reach worker w2)" in lines[3]
    assert lines[4].split()[:3] == ["w3", "127.0.1.3", "decommissioned"]


def test_log_lag_is_what_the_mirror_lacks():
    assert report.log_lag(100, 60) == 40
    assert report.log_lag(100, None) == 100
    assert report.log_lag(None, None) == 0
    assert report.log_lag(50, 60) == 0


def test_the_table_is_reprinted_on_change_or_when_events_scrolled_it_away():
    from decnet.sandbox.live import LiveView

    live = LiveView.__new__(LiveView)
    live.last_keys, live.last_lags, live.last_table_at, live.events_since_table = None, (), -1e9, 0
    live.last_event_at = -1e9
    up = [report.HostRow("w1", "a", "up", "r1", 3, 7, 7, lag=0)]
    assert live.table_due(up, 0.0)
    assert not live.table_due(up, 1.0)
    assert not live.table_due(up, 100.0)  # nothing happened: stay quiet
    live.events_since_table = 5
    live.last_table_at = 100.0
    assert not live.table_due(up, 101.0)  # events, but the table was printed just now
    live.last_event_at = 114.0
    assert not live.table_due(up, 115.0)  # a burst is still arriving: do not cut into it
    assert live.table_due(up, 114.0 + config.SANDBOX_TABLE_QUIET)
    down = [report.HostRow("w1", "a", "DOWN", lag=0)]
    assert live.table_due(down, 116.0)  # a change: at once


# -- feeds -----------------------------------------------------------------------------


def test_the_feed_tail_returns_whole_new_lines_only(tmp_path):
    path = tmp_path / "w1.jsonl"
    path.write_bytes(b'{"n": 1}\n')
    tail = feeds.FeedTail({"w1": path, "w2": tmp_path / "missing.jsonl"})
    tail.skip_to_end()
    assert tail.read_new() == []
    with open(path, "ab") as fh:
        fh.write(b'{"n": 2}\n{"n": 3')
    assert tail.read_new() == [{"n": 2}]
    with open(path, "ab") as fh:
        fh.write(b"}\nnot json\n")
    assert tail.read_new() == [{"n": 3}, {"parsed": False, "raw": "not json"}]
    path.write_bytes(b'{"n": 9}\n')  # rebuilt from the start
    assert tail.read_new() == [{"n": 9}]


# -- the wheelhouse recipe ----------------------------------------------------------------


def test_requirements_come_from_setup_cfg(tmp_path):
    (tmp_path / "setup.cfg").write_text(
        "[options]\ninstall_requires =\n    # a comment\n    twisted[tls]>=1  # why\n    attrs\n"
    )
    assert wheelhouse.install_requires(tmp_path) == ["twisted[tls]>=1", "attrs"]
    with pytest.raises(ConfigError):
        wheelhouse.install_requires(tmp_path / "nowhere")


def test_the_wheelhouse_is_pinned_to_this_environment_and_keyed_by_it(tmp_path):
    pins = wheelhouse.installed_pins()
    assert any(p.lower().startswith("twisted==") for p in pins)
    assert not any(p.lower().startswith("decnet-swarm==") for p in pins)
    key = wheelhouse.cache_key(["attrs"], pins)
    assert key == wheelhouse.cache_key(["attrs"], pins)
    assert key != wheelhouse.cache_key(["attrs"], [*pins, "extra==1"])
    argv = wheelhouse.wheel_command(tmp_path / "w", ["attrs"], tmp_path / "c.txt")
    assert argv[1:4] == ["-m", "pip", "wheel"] and "--constraint" in argv and argv[-1] == "attrs"


# -- poke bookkeeping ----------------------------------------------------------------------


def test_targets_come_from_the_recorded_specs():
    doc = {
        "workers": {
            "w1": {"spec": layout.default_spec(1, 1)},
            "w2": {"spec": layout.default_spec(1, 2)},
        }
    }
    targets = poke.targets_from_state(doc)
    assert len(targets) == 14
    assert {t.worker for t in poke.targets_from_state(doc, ["w2"])} == {"w2"}
    banner = next(t for t in targets if t.type == "tcp-banner")
    assert banner.banner and banner.port == 3306


def test_conversations_are_matched_to_their_disconnect_event_and_worker():
    t1 = poke.Target("w1", "web-01", "ssh", "ssh", "127.1.1.1", 2222)
    t2 = poke.Target("w2", "web-01", "ssh", "ssh", "127.1.2.1", 2222)
    o1, o2 = poke.Outcome(t1, True, "x", 40001), poke.Outcome(t2, True, "x", 40002)

    def disconnect(worker, dst, src):
        e = entry("disconnect", worker=worker)
        params = e["structured_data"][0]["params"]
        params[2], params[3] = ["src_port", str(src)], ["dst_ip", dst]
        return e

    found: dict = {}
    arrival = poke.match_feed([o1, o2], [entry("login", worker="w1")], found)
    assert arrival.missing == (o1, o2)
    arrival = poke.match_feed([o1, o2], [disconnect("w1", "127.1.1.1", 40001)], found)
    assert arrival.missing == (o2,)
    arrival = poke.match_feed([o1, o2], [disconnect("w1", "127.1.2.1", 40002)], found)
    assert arrival.missing == ()
    assert arrival.misattributed([o1, o2]) == [(o2, "w1")]


# -- the daemons' command lines ------------------------------------------------------------


def test_every_daemon_is_the_real_twistd_plugin_with_explicit_addresses(tmp_path):
    from decnet.sandbox import daemons

    sb = layout.SandboxLayout.at(tmp_path)
    w = sb.worker(2, 1)
    listener = daemons.listener_argv(sb)
    assert listener[0].endswith("/twistd") and listener[1:5] == [
        "--nodaemon",
        "--pidfile=",
        "--logfile",
        str(tmp_path / "logs" / "listener.log"),
    ]
    assert listener[5] == "decnet-listener" and "tcp:0:interface=127.0.0.1" in listener
    updater = daemons.updater_argv(sb, w)
    assert updater[5] == "decnet-updater"
    for pair in (
        ("--listen", "tcp:8766:interface=127.0.1.2"),
        ("--agent-url", "https://127.0.1.2:8765"),
        ("--agent-control", "spawn"),
        ("--agent-twistd-log", str(tmp_path / "logs" / "w2-agent.log")),
        ("--agent-log-file", str(w.decoy_log)),
    ):
        assert updater[updater.index(pair[0]) + 1] == pair[1]
    forwarder = daemons.forwarder_argv(sb, w, 40123)
    assert forwarder[5] == "decnet-forwarder"
    for pair in (
        ("--master-host", "127.0.0.1"),
        ("--master-port", "40123"),
        ("--log-file", str(w.decoy_log)),
        ("--mode", "ack"),
    ):
        assert forwarder[forwarder.index(pair[0]) + 1] == pair[1]
