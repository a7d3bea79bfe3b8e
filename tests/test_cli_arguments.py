"""decnet.cli.arguments: how decnet-admin sub-commands and their shared options are declared."""

import argparse

import pytest

from decnet.cli.arguments import JSON_HELP, command, flag, json_flag, timeout_option


def run(args: argparse.Namespace) -> int:
    return 0


def parser_with(declare) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """``decnet-admin`` with one command, ``probe``: both parsers."""
    top = argparse.ArgumentParser(prog="decnet-admin")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home")
    sub = top.add_subparsers(dest="command", required=True)
    probe = command(
        sub, [common], "probe", run, summary="probe a host", description="Probe.", examples=["x"]
    )
    declare(probe)
    return top, probe


def test_a_command_is_bound_to_its_function_and_takes_the_common_options():
    def declare(p):
        json_flag(p)
        timeout_option(p, 7.0, "seconds (default: %(default)s)")

    top, probe = parser_with(declare)
    args = top.parse_args(["probe", "--home", "h", "--json", "--timeout", "2.5"])
    assert (args.func, args.home, args.json, args.timeout) == (run, "h", True, 2.5)
    defaults = top.parse_args(["probe"])
    assert (defaults.json, defaults.timeout) == (False, 7.0)
    assert "probe a host" in top.format_help()
    assert JSON_HELP in probe.format_help() and "Probe." in probe.format_help()


def test_a_flag_may_belong_to_a_group_of_exclusive_options(capsys):
    def declare(p):
        which = p.add_mutually_exclusive_group(required=True)
        flag(which, "--all", "every host")
        which.add_argument("--host")

    top, _ = parser_with(declare)
    assert top.parse_args(["probe", "--all"]).all is True
    with pytest.raises(SystemExit):
        top.parse_args(["probe", "--all", "--host", "a"])
    assert "not allowed with argument" in capsys.readouterr().err
