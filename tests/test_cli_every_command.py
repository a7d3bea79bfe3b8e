"""What every ``decnet-admin`` command does the same way, checked on every command.

The commands are enumerated from the argparse tree, so a command added later is
covered (or fails here until it gives the sample arguments below):

* ``--json``: stdout is valid JSON (NDJSON for a streaming command), an error is
  JSON on stderr and a non-zero exit;
* a reader that went away (``| head``) ends the command quietly;
* a ``--home`` that ``init`` never made is refused, by every command but ``init``;
* ``--help`` has examples, and every option says what it does.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from decnet.cli.arguments import EXAMPLES
from decnet.cli.main import build_parser
from tests.support import BIN, free_port

ADMIN = str(BIN / "decnet-admin")

# Commands that do not read the master's --home (init makes it; the sandbox uses --dir).
NO_HOME = {"init", "sandbox up", "sandbox status", "sandbox down", "sandbox poke"}
# Commands that follow the fleet until Ctrl-C: their --json and their end are
# tested on their own (tests/test_cli_health.py); here only the --home check.
FOLLOWS = {"top"}


def leaf_commands(
    parser: argparse.ArgumentParser | None = None, prefix: tuple[str, ...] = ()
) -> dict[str, argparse.ArgumentParser]:
    """Every runnable command of the parser tree, by its words (``"sandbox up"``)."""
    parser = parser or build_parser()
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found.update(leaf_commands(child, (*prefix, name)))
    if not found and prefix:
        found[" ".join(prefix)] = parser
    return found


def sample_arguments(tmp: Path, spec: Path) -> dict[str, list[str]]:
    """A command line for each command against the fixture's fleet (one unreachable host)."""
    sandbox_dir = ["--dir", str(tmp / "no-sandbox")]
    return {
        "init": [],
        "enroll": ["w-new", "--address", "127.0.0.1", "--out", str(tmp / "w-new")],
        "hosts": [],
        "decommission": ["w-old"],
        "status": ["--timeout", "10"],
        "check": ["--timeout", "10"],
        "deploy": ["w1", "--spec", str(spec), "--timeout", "10"],
        "teardown": ["w1", "--timeout", "10"],
        "update": ["--all", "--timeout", "10"],
        "rollback": ["w1", "--timeout", "10"],
        "releases": ["w1", "--timeout", "10"],
        "sandbox up": ["--workers", "0", *sandbox_dir],  # a usage error: JSON too
        "sandbox status": sandbox_dir,
        "sandbox down": sandbox_dir,
        "sandbox poke": [*sandbox_dir, "--wait", "0"],
        "top": ["--timeout", "10"],
        "listeners add": ["127.0.0.1:6514"],
        "listeners remove": ["127.0.0.1:6514"],
        "listeners list": [],
        "bundle refresh": ["w1", "--timeout", "10"],
        "renew": ["w1", "--timeout", "10"],
        "events": ["--limit", "5"],
    }


def run(*argv: str, stdout: int | None = subprocess.PIPE) -> subprocess.CompletedProcess:
    return subprocess.run(
        [ADMIN, *argv], stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """A master home with hosts w1 (updater) and w-old, whose ports nothing listens on."""
    tmp = tmp_path_factory.mktemp("every")
    home = tmp / "home"
    closed = str(free_port())
    assert run("--home", str(home), "init").returncode == 0
    for name in ("w1", "w-old"):
        enrolled = run(
            "--home", str(home), "enroll", name, "--address", "127.0.0.1", "--updater",
            "--agent-port", closed, "--updater-port", closed, "--out", str(tmp / name),
        )  # fmt: skip
        assert enrolled.returncode == 0, enrolled.stderr
    spec = tmp / "spec.json"
    spec.write_text((Path(__file__).parent.parent / "docs" / "example-spec.json").read_text())
    return home, sample_arguments(tmp, spec)


def command_lines(fleet) -> list[tuple[str, list[str]]]:
    """Every command that ends by itself, with its sample arguments."""
    home, samples = fleet
    commands = leaf_commands()
    missing = sorted(set(commands) - set(samples))
    assert not missing, f"give sample arguments for the new command(s) {missing} above"
    return [
        (name, ["--home", str(home), *name.split(), *samples[name]])
        for name in commands
        if name not in FOLLOWS
    ]


def parse_json_stdout(name: str, out: str, streams: bool) -> None:
    if streams:
        records = [json.loads(record) for record in out.splitlines()]
        assert records, f"{name}: no NDJSON record"
    else:
        json.loads(out)


def test_json_output_of_every_command_is_json_and_errors_are_json_on_stderr(fleet):
    lines = command_lines(fleet)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda item: run(*item[1], "--json"), lines))
    commands = leaf_commands()
    for (name, _argv), result in zip(lines, results, strict=True):
        streams = commands[name].get_default("streams")
        try:
            parse_json_stdout(name, result.stdout, streams)
        except ValueError as exc:
            pytest.fail(f"{name} --json: stdout is not JSON ({exc}): {result.stdout!r}")
        for line in result.stderr.splitlines():
            assert "error" in json.loads(line), (name, result.stderr)
        if result.returncode != 0:
            assert result.stdout.strip(), name
    codes = {name: r.returncode for (name, _), r in zip(lines, results, strict=True)}
    # The fixture's hosts are unreachable: what contacts one fails (status and check
    # say "unreachable" with 2), the rest succeeds.
    assert codes["status"] == codes["check"] == 2
    assert codes["update"] == codes["rollback"] == 1
    assert codes["sandbox up"] == 2 and codes["init"] == codes["hosts"] == 0


def test_a_json_error_names_the_problem_on_stderr_as_json():
    result = run("--home", "/nonexistent/decnet", "hosts", "--json")
    assert result.returncode == 1
    error = json.loads(result.stderr)
    assert "/nonexistent/decnet" in error["error"] and error["problems"] == [error["error"]]
    assert json.loads(result.stdout) == {"problems": [error["error"]]}


def test_a_usage_error_under_json_is_json_with_exit_2():
    result = run("status", "--json", "--no-such-option")
    assert result.returncode == 2
    assert "--no-such-option" in json.loads(result.stderr)["error"]
    json.loads(result.stdout)


def test_every_command_exits_quietly_when_its_reader_goes_away(fleet):
    """``decnet-admin status | head``: stdout is a pipe whose reader is gone."""

    def closed_pipe_run(argv: list[str]) -> subprocess.CompletedProcess:
        read, write = os.pipe()
        os.close(read)  # the reader went away before the command wrote anything
        try:
            return run(*argv, stdout=write)
        finally:
            os.close(write)

    lines = command_lines(fleet)
    argvs = [argv for _, argv in lines] + [[*argv, "--json"] for _, argv in lines]
    argvs += [["status", "--help"], ["--help"]]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(closed_pipe_run, argvs))
    for argv, result in zip(argvs, results, strict=True):
        assert "Traceback" not in result.stderr, (argv, result.stderr)
        assert "BrokenPipeError" not in result.stderr, (argv, result.stderr)
        assert "Exception ignored" not in result.stderr, (argv, result.stderr)


def test_every_command_but_init_refuses_a_home_that_init_never_made(tmp_path, fleet):
    _home, samples = fleet
    empty = tmp_path / "empty"
    empty.mkdir()
    needing = [n for n in leaf_commands() if n not in NO_HOME]
    for home in (tmp_path / "typo", empty):
        with ThreadPoolExecutor(4) as pool:
            results = list(
                pool.map(lambda n, h=home: run("--home", str(h), *n.split(), *samples[n]), needing)
            )
        for name, result in zip(needing, results, strict=True):
            assert result.returncode == 1, (name, result.stdout, result.stderr)
            assert result.stderr.count("\n") == 1, (name, result.stderr)
            assert f"decnet-admin --home {home} init" in result.stderr, (name, result.stderr)
            assert "No hosts" not in result.stdout
    assert not (tmp_path / "typo").exists()  # refused before anything was written


def test_every_command_has_examples_json_and_help_for_every_option():
    for name, parser in leaf_commands().items():
        assert parser.epilog and parser.epilog.startswith(EXAMPLES), name
        examples = parser.epilog.splitlines()[1:]
        assert any(f"decnet-admin {name}" in e for e in examples), name
        assert EXAMPLES in parser.format_help(), name
        options = {o for a in parser._actions for o in a.option_strings}
        assert "--json" in options, f"{name} has no --json"
        for action in parser._actions:
            what = f"{name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and action.help != argparse.SUPPRESS, f"{what}: no help"
            shown = action.default not in (None, False, [], argparse.SUPPRESS)
            if shown and action.option_strings and action.dest != "help":
                assert "default" in action.help, f"{what}: default not shown"
