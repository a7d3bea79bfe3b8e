"""``decnet-admin update / rollback / releases``: argument handling and --dry-run (no network)."""

import argparse
import json

import pytest

from decnet.cli.main import main
from decnet.master import enrollment
from tests.support import REPO_ROOT


@pytest.fixture(scope="module")
def home(tmp_path_factory, master_home):
    """A master with hosts: two with an updater, one without, one decommissioned."""
    import shutil

    target = tmp_path_factory.mktemp("cli-update") / "home"
    shutil.copytree(master_home.home, target)
    from decnet.config import MasterPaths

    paths = MasterPaths.resolve(target)
    # Start from an empty registry in the copy.
    paths.registry.unlink()
    for suffix in ("-wal", "-shm"):
        (paths.registry.parent / (paths.registry.name + suffix)).unlink(missing_ok=True)
    master = enrollment.init_master(paths)
    out = target.parent / "bundles"
    for name, updater in (("alpha", True), ("beta", True), ("gamma", False), ("delta", True)):
        enrollment.enroll(master, name, "127.0.0.1", out / name, updater=updater)
    enrollment.decommission(master, "delta")
    return str(target)


def test_dry_run_lists_hosts_files_size_and_sha256_and_contacts_nothing(home, capsys):
    code = main(["--home", home, "update", "--all", "--dry-run", "--canary", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "Dry run: nothing was contacted." in out
    assert "alpha  (canary)" in out and "\n  beta\n" in out
    assert "gamma  skipped: no updater certificate" in out
    assert "delta  skipped: decommissioned" in out
    assert "decnet/updater/engine.py" in out and "sha256" in out


def test_dry_run_json_is_reproducible(home, capsys):
    docs = []
    for _ in range(2):
        assert main(["--home", home, "update", "--host", "alpha", "--dry-run", "--json"]) == 0
        docs.append(json.loads(capsys.readouterr().out))
    assert docs[0]["sha256"] == docs[1]["sha256"]
    assert docs[0]["release"] == docs[0]["sha256"][:16]
    assert docs[0]["hosts"] == ["alpha"]
    assert "setup.cfg" in docs[0]["files"]
    assert not any(f.endswith(".key") or f.startswith("tests/") for f in docs[0]["files"])


def test_unknown_hosts_are_all_named(home, capsys):
    assert main(["--home", home, "update", "--host", "nope", "--host", "nada", "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "'nope'" in err and "'nada'" in err


def test_host_or_all_is_required_and_exclusive(home, capsys):
    for argv in (["update"], ["update", "--all", "--host", "alpha"]):
        with pytest.raises(SystemExit) as info:
            main(["--home", home, *argv])
        assert info.value.code == 2
    capsys.readouterr()


def test_nothing_to_update_is_an_error(home, capsys):
    assert main(["--home", home, "update", "--host", "gamma"]) == 1
    err = capsys.readouterr().err
    assert "gamma: skipped, no updater certificate" in err and "no host to update" in err


def test_concurrency_must_be_positive(home, capsys):
    with pytest.raises(SystemExit):
        main(["--home", home, "update", "--all", "--concurrency", "0", "--dry-run"])
    capsys.readouterr()


def test_a_root_that_is_not_a_source_tree_is_refused(home, tmp_path, capsys):
    assert main(["--home", home, "update", "--all", "--dry-run", "--root", str(tmp_path)]) == 1
    assert "not a DECNET source tree" in capsys.readouterr().err


def test_the_default_root_is_this_checkout():
    from decnet.cli.updates import default_root

    assert default_root() == REPO_ROOT


def test_a_failed_update_shows_the_agents_last_lines_in_the_table_and_all_of_it_in_json(capsys):
    from decnet.cli import output
    from decnet.cli.updates import AGENT_TAIL_LINES, _show_results
    from decnet.master.rollout import HostResult
    from decnet.master.tar_tree import ReleaseArchive

    archive = ReleaseArchive(None, "ab" * 32, 1, (), (), None, None)
    agent = "".join(f"line {i}\n" for i in range(40)) + "RuntimeError: broken \x1b[2J\n"
    failed = HostResult(
        "w1", "rolled_back", "old", 1.0, "HTTP 409: release x failed", output={"agent": agent}
    )
    ok = HostResult("w2", "updated", "new", 1.0, "installed and healthy")
    output.begin(as_json=False)
    _show_results(argparse.Namespace(json=False), archive, [failed, ok])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("w1"))
    assert row.endswith("HTTP 409: release x failed; agent: RuntimeError: broken \\x1b[2J")
    shown = out.split("Last output lines of the agent on w1")[1].splitlines()[1:]
    assert len(shown) == AGENT_TAIL_LINES and shown[-1].strip().startswith("RuntimeError")
    assert "\x1b" not in out and "line 28" not in out and "line 29" in out
    output.begin(as_json=True)
    _show_results(argparse.Namespace(json=True), archive, [failed, ok])
    doc = json.loads(capsys.readouterr().out)
    output.begin(as_json=False)
    assert doc["results"][0]["output"]["agent"] == agent


def test_a_json_command_run_in_process_leaves_text_output_to_the_next_caller(home, capsys):
    from decnet.cli import output

    assert main(["--home", home, "update", "--host", "alpha", "--dry-run", "--json"]) == 0
    json.loads(capsys.readouterr().out)
    assert not output.json_mode()
