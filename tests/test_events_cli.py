"""``decnet-admin events``: table and NDJSON output, escaping, usage errors, a closed pipe."""

import json
import subprocess

import pytest

from decnet.cli.main import main
from decnet.events.index import index_path
from tests.events_support import event_line, feed_entries, ingest_with
from tests.support import BIN

NASTY = "\x1b[2J\x1b]0;owned\x07\u202eevil\u0085\x9b31m\x7f"
UNSAFE = ["\x1b", "\x07", "\u202e", "\u0085", "\x9b", "\x7f"]


@pytest.fixture
def ingest(tmp_path):
    lines = [
        event_line(0, src="203.0.113.9", user="root"),
        event_line(1, src="198.51.100.4", user=NASTY, extra=(("password", "x' OR 1=1 --"),)),
        event_line(2, src="203.0.113.10", user="B" * 50_000, when="2026-05-01T13:00:00Z"),
    ]
    ingest_with(
        tmp_path / "ingest", {"w1": lines, "w2": [event_line(3, kind="connect", src="192.0.2.1")]}
    )
    return tmp_path / "ingest"


def run(capsys, *args):
    code = main(["events", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_table_has_the_event_columns_and_one_line_per_event(ingest, capsys):
    code, out, err = run(capsys, "--ingest", str(ingest), "--src-ip", "203.0.113.0/24")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == [
        "TIME",
        "(UTC)",
        "WORKER",
        "DECKY",
        "SERVICE",
        "EVENT",
        "SRC",
        "DETAILS",
    ]
    assert lines[1].split()[:7] == [
        "2026-05-01",
        "12:00:00.000",
        "w1",
        "web-01",
        "ssh",
        "login",
        "203.0.113.9",
    ]
    assert lines[2].split()[6] == "203.0.113.10" and len(lines) == 3


def test_json_is_ndjson_of_the_feed_entries_unchanged(ingest, capsys):
    code, out, _err = run(capsys, "--ingest", str(ingest), "--worker", "w1", "--json")
    assert code == 0
    printed = [json.loads(line) for line in out.splitlines()]
    assert printed == feed_entries(ingest, "w1")
    assert out.isascii() and not any(c in out for c in UNSAFE)


def test_attacker_text_never_reaches_the_terminal_raw(ingest, capsys):
    for args in ([], ["--json"], ["--user", NASTY]):
        code, out, _err = run(capsys, "--ingest", str(ingest), *args)
        assert code == 0 and not any(c in out for c in UNSAFE), args
    _code, out, _err = run(capsys, "--ingest", str(ingest), "--user", NASTY)
    assert "\\x1b[2J" in out and "\\u202e" in out and "\\x85" in out
    assert len(out.splitlines()) == 2


def test_a_huge_value_is_cut_in_the_table_and_whole_in_json(ingest, capsys):
    _code, table, _err = run(capsys, "--ingest", str(ingest), "--src-ip", "203.0.113.10")
    assert "B" * 37 + "..." in table and max(map(len, table.splitlines())) <= 150
    _code, out, _err = run(capsys, "--ingest", str(ingest), "--src-ip", "203.0.113.10", "--json")
    assert ["user", "B" * 50_000] in json.loads(out)["structured_data"][0]["params"]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--src-ip", "203.0.113.0/33"], "not an IP address or a CIDR"),
        (["--since", "1y"], "neither a duration"),
        (["--until", "tomorrow"], "not a time"),
    ],
)
def test_a_mistyped_filter_is_a_usage_error_with_exit_2(ingest, capsys, args, says):
    code, out, err = run(capsys, "--ingest", str(ingest), *args)
    assert code == 2 and out == "" and says in err and "--help" in err
    code, out, err = run(capsys, "--ingest", str(ingest), "--json", *args)
    assert code == 2 and json.loads(out) == {"problems": [json.loads(err)["error"]]}
    assert json.loads(err)["usage"] is True and says in json.loads(err)["error"]


def test_a_bad_limit_is_a_usage_error(ingest, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["events", "--ingest", str(ingest), "--limit", "-1"])
    assert exit.value.code == 2 and "not a row count" in capsys.readouterr().err


def test_a_missing_index_is_an_error_that_says_what_builds_it(tmp_path, capsys):
    code, out, err = run(capsys, "--ingest", str(tmp_path), "--json")
    assert code == 1 and "feed process builds it" in json.loads(err)["error"]
    assert json.loads(out) == {"problems": [json.loads(err)["error"]]}
    code, _out, err = run(capsys, "--ingest", str(tmp_path))
    assert code == 1 and err.startswith("decnet-admin: error: no event index")


def test_the_ingest_directory_defaults_to_the_master_home(tmp_path, capsys):
    assert main(["--home", str(tmp_path / "home"), "init"]) == 0
    capsys.readouterr()
    ingest_with(tmp_path / "home" / "ingest", {"w9": [event_line(0)]})
    code = main(["--home", str(tmp_path / "home"), "events", "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["source_worker"] == "w9"


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit):
        main(["events", "--help"])
    out = capsys.readouterr().out
    assert "examples:" in out and "--src-ip 203.0.113.0/24 --since 1h" in out


def test_a_reader_that_goes_away_stops_the_command_quietly(tmp_path):
    ingest_with(tmp_path, {"w1": [event_line(i) for i in range(20_000)]})
    assert index_path(tmp_path).exists()
    proc = subprocess.Popen(
        [str(BIN / "decnet-admin"), "events", "--ingest", str(tmp_path), "--limit", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout.readline().startswith(b"TIME")
    proc.stdout.close()  # as `| head -1` does
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 141 and err == b""  # as a command killed by SIGPIPE
