"""The output layer of ``decnet-admin``: one escaping function, tables, lines and JSON (pure)."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from decnet import replies
from decnet.cli import output
from decnet.errors import UnknownHost, ValidationError

REPO = Path(__file__).resolve().parent.parent

# Everything the output layer must never let through raw.
MUST_ESCAPE = [
    *map(chr, range(0x00, 0x20)),
    "\x7f",
    *map(chr, range(0x80, 0xA0)),
    "\u061c",
    "\u200e",
    "\u200f",
    *map(chr, range(0x202A, 0x202F)),
    *map(chr, range(0x2066, 0x206A)),
    "\u2028",  # line separator
    "\ud800",  # an unpaired surrogate (valid in JSON, unprintable, unencodable)
]


@pytest.mark.parametrize("ch", MUST_ESCAPE, ids=lambda c: f"U+{ord(c):04X}")
def test_every_control_and_bidi_character_is_escaped(ch):
    shown = output.printable(f"a{ch}b")
    assert ch not in shown
    assert shown == "a" + (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}") + "b"


def test_the_title_and_clear_screen_sequence_of_the_issue_is_inert():
    assert output.printable("\x1b]0;PWNED\x07\x1b[2J") == "\\x1b]0;PWNED\\x07\\x1b[2J"


def test_ordinary_text_is_unchanged():
    text = "web-01 listening 127.0.0.1:22 — Ünïcödé 日本 ✓"
    assert output.printable(text) == text


def test_a_cut_never_splits_an_escape():
    assert output.printable("ab\x1bcdef", 6) == "ab..."
    assert output.printable("abcdefgh", 8) == "abcdefgh"
    assert output.printable("abcdefghi", 8) == "abcde..."


@settings(max_examples=300, deadline=None)
@given(st.text(), st.integers(min_value=4, max_value=80))
def test_printable_output_is_safe_and_within_its_limit(text, limit):
    shown = output.printable(text, limit)
    assert len(shown) <= limit
    assert not any(ord(c) in output.UNSAFE or not c.isprintable() for c in shown)
    whole = output.printable(text)
    assert shown == whole or shown.endswith("...")


def test_table_cells_are_escaped_and_cut_so_no_value_forges_a_line():
    text = output.table(("A", "B"), [("x\ny", "\x1b[2J"), ("z" * 500, None)])
    lines = text.split("\n")
    assert len(lines) == 4
    assert lines[2].split() == ["x\\x0ay", "\\x1b[2J"]
    assert len(lines[3]) == output.CELL_MAX


def test_a_stream_table_prints_its_header_at_once_and_each_row_as_it_comes():
    said = []
    t = output.StreamTable(("NAME", "HEALTH", "DETAIL"), (6, 4), write=said.append)
    assert said == ["NAME    HEALTH  DETAIL", "------  ------  ------"]
    t.row(("w1", "up", "ok"))
    t.row(("much-longer-name", "DOWN", "\x1b]0;x\x07"))
    assert said[2] == "w1      up      ok"
    assert said[3] == "much-longer-name  DOWN    \\x1b]0;x\\x07"


def test_line_escapes_a_newline_and_text_keeps_only_its_own(capsys):
    output.line("one\ntwo\r")
    output.text("a\nb\x1b")
    assert capsys.readouterr().out == "one\\x0atwo\\x0d\na\nb\\x1b\n"


def test_errors_are_escaped_on_stderr(capsys):
    output.error("bad \x9b31m reply")
    assert capsys.readouterr().err == "decnet-admin: error: bad \\x9b31m reply\n"


def test_json_is_ascii_only_and_round_trips(capsys):
    doc = {"release": "\x1b]0;PWNED\x07\u202e", "n": [1, None]}
    output.print_json(doc)
    out = capsys.readouterr().out
    assert out.isascii() and "\x1b" not in out and "\x07" not in out
    assert json.loads(out) == doc


def test_the_sandbox_view_uses_the_same_function():
    from decnet.cli import sandbox_live

    assert not hasattr(sandbox_live, "printable")
    source = (REPO / "decnet" / "cli" / "sandbox_live.py").read_text()
    assert "output.printable(" in source


def _writes_to_a_terminal(tree: ast.AST) -> list[int]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id == "print":
                found.append(node.lineno)
            if isinstance(f, ast.Attribute) and f.attr == "write":
                target = ast.unparse(f.value)
                if target in ("sys.stdout", "sys.stderr"):
                    found.append(node.lineno)
    return found


@pytest.mark.parametrize(
    "path",
    sorted(
        [
            *(REPO / "decnet" / "cli").glob("*.py"),
            *(REPO / "decnet" / "sandbox").glob("*.py"),
        ]
    ),
    ids=lambda p: p.name,
)
def test_every_line_decnet_admin_prints_goes_through_the_output_layer(path):
    if path.name == "output.py":
        return
    assert _writes_to_a_terminal(ast.parse(path.read_text())) == []


# -- the reply schemas (pure) -----------------------------------------------------------


def test_a_schema_reports_every_problem_with_its_place_up_to_a_cap():
    doc = {"deckies": {"web-01": {"services": {"ssh": {"port": True}}}}, "summary": []}
    found = replies.problems_of(replies.AGENT_STATUS, doc)
    assert found == [
        "deckies.web-01.services.ssh.type: is required",
        "deckies.web-01.services.ssh.bind: is required",
        "deckies.web-01.services.ssh.port: must be an integer from 0 to 65535",
        "deckies.web-01.services.ssh.state: is required",
        "deckies.web-01.services.ssh.connections: is required",
    ]
    assert len(found) == replies.MAX_PROBLEMS


def test_unknown_fields_are_allowed_and_known_ones_checked():
    assert replies.problems_of(replies.AGENT_HEALTH, {"status": "ok", "new": [1]}) == []
    assert replies.problems_of(replies.AGENT_HEALTH, {"status": "ok", "uptime": 1e309}) == [
        "uptime: must be a finite number"
    ]


def test_free_form_objects_may_not_nest_without_end():
    deep: dict = {}
    cur = deep
    for _ in range(replies.MAX_DEPTH + 2):
        cur["x"] = {}
        cur = cur["x"]
    found = replies.problems_of(replies.Obj(required={"spec": replies.Free()}), {"spec": deep})
    assert found == [f"spec: nested deeper than {replies.MAX_DEPTH} levels"]


def test_a_hostile_key_is_quoted_as_ascii_in_a_problem():
    found = replies.problems_of(replies.MapOf(replies.TEXT, replies.DECKY), {"\x1b[2J\u202e": "x"})
    assert found == ['"\\u001b[2J\\u202e" (key): must be a decky name']


def test_replies_of_the_documented_shapes_pass():
    """The examples in docs/Agent.md are valid replies (the real daemons are checked by
    test_agent_client.py and test_updater_http.py, whose calls all go through the schemas)."""
    doc = (REPO / "docs" / "Agent.md").read_text()
    status = json.loads(
        doc.split("### `GET /status`\n\n```json\n")[1]
        .split("```")[0]
        .replace("{ …canonical spec, every default filled in… }", "{}")
    )
    assert replies.problems_of(replies.AGENT_STATUS, status) == []
    health = json.loads(doc.split("### `GET /health`\n\n```json\n")[1].split("```")[0])
    assert replies.problems_of(replies.AGENT_HEALTH, health) == []


# -- a command's --timeout counts from its start ------------------------------------------


def test_a_commands_budget_counts_down_from_its_start_on_the_monotonic_clock():
    from decnet import cli
    from decnet.cli import runtime

    assert runtime.budget(10, now=cli.STARTED) == 10
    assert runtime.budget(10, now=cli.STARTED + 3) == 7
    assert runtime.budget(3, now=cli.STARTED + 5) == runtime.MIN_BUDGET
    assert runtime.budget(0) == runtime.MIN_BUDGET


def test_the_budget_never_asks_proc_how_old_the_process_is(monkeypatch, tmp_path):
    """The start is read once on the monotonic clock; what /proc says (here: that the machine
    has been up for thirty years) does not shorten a command's --timeout."""
    import time

    from decnet import cli
    from decnet.cli import runtime
    from decnet.sandbox import state

    (tmp_path / "uptime").write_text("1000000000.00 0.00\n")
    monkeypatch.setattr(state, "PROC", tmp_path)
    monkeypatch.setattr(cli, "STARTED", time.monotonic())
    assert runtime.budget(60) > 50


# -- the one runner ----------------------------------------------------------------------------


def test_the_runner_reraises_a_commands_error_once_the_reactor_has_stopped():
    """In a subprocess: ``task.react`` runs the global reactor once per process."""
    code = """if True:
        from twisted.internet import reactor
        from decnet.cli.runtime import run_async
        from decnet.errors import UnknownHost

        async def fails(reactor):
            raise UnknownHost("no host named 'w9'")

        try:
            run_async(fails)
        except UnknownHost as exc:
            print("raised once the reactor stopped:", not reactor.running, exc)
    """
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert run.stdout == "raised once the reactor stopped: True no host named 'w9'\n"


def test_a_command_stopped_by_a_signal_exits_130_not_0():
    """Ctrl-C during ``update`` must never look like a finished update to a script."""
    code = """if True:
        import os, signal, sys
        from twisted.internet import defer
        from decnet.cli.runtime import run_async

        async def waits(reactor):
            reactor.callLater(0, os.kill, os.getpid(), signal.SIGINT)
            await defer.Deferred()

        sys.exit(run_async(waits))
    """
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert run.returncode == 130, run.stderr


def test_every_expected_failure_is_reported_the_one_way(capsys):
    from decnet.cli.runtime import report_failure

    output.begin(as_json=True)  # what decnet-admin does for a command given --json
    assert report_failure(ValidationError(["a: bad", "b: \x1b[2Jbad"]), as_json=True) == 1
    out, err = capsys.readouterr()
    assert json.loads(out) == {"problems": ["a: bad", "b: \x1b[2Jbad"]}
    assert "\x1b" not in err and err.count("\n") == 1  # one JSON object on stderr
    assert json.loads(err) == {"error": "a: bad", "problems": ["a: bad", "b: \x1b[2Jbad"]}
    output.begin(as_json=False)
    assert report_failure(UnknownHost("no host named 'w9'")) == 1
    out, err = capsys.readouterr()
    assert out == "" and "no host named 'w9'" in err
