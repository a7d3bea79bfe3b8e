"""``decnet-admin update / rollback / releases``: argument handling and --dry-run (no network)."""

import argparse
import json
from pathlib import Path

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


def dry_run(home, wheelhouse, *args):
    from decnet.config import MasterPaths
    from tests.support import admin

    return admin(
        MasterPaths.resolve(home), "update", "--dry-run", "--wheelhouse", str(wheelhouse), *args
    )


def test_dry_run_shows_per_host_what_would_be_sent_and_changes_nothing(home, wheelhouse):
    """No updater answers here: every wheel would be sent, and the table says why."""
    r = dry_run(home, wheelhouse, "--all", "--canary", "1")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "Dry run: each updater was asked what it has; nothing was changed." in out
    assert "decnet_swarm-" in out and "sha256" in out
    rows = {line.split()[0]: line for line in out.splitlines()[4:] if line.strip()}
    assert "(canary)" in rows["alpha"] and "every wheel is sent" in rows["alpha"]
    assert "MiB" in rows["beta"]
    assert "skipped: no updater certificate" in rows["gamma"]
    assert "skipped: decommissioned" in rows["delta"]


def test_dry_run_json_is_reproducible_and_lists_every_wheel_per_host(home, wheelhouse):
    docs = []
    for _ in range(2):
        r = dry_run(home, wheelhouse, "--host", "alpha", "--json")
        assert r.returncode == 0, r.stderr
        docs.append(json.loads(r.stdout))
    assert docs[0]["release"] == docs[1]["release"]
    assert docs[0]["wheel"] == docs[1]["wheel"]
    (alpha,) = docs[0]["hosts"]
    assert alpha["host"] == "alpha" and alpha["wheels"][0] == docs[0]["wheel"]["file"]
    assert len(alpha["wheels"]) == 1 + len(docs[0]["dependencies"])
    assert alpha["bytes"] > 1024 * 1024 and alpha["note"]


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
    from decnet.master.wheel_release import WheelRelease
    from decnet.updater.manifest import Manifest, wheel_of

    decnet_wheel = wheel_of("decnet_swarm-0.1.0-py3-none-any.whl", "ab" * 32)
    archive = WheelRelease(Manifest(decnet_wheel, ()), {}, Path("."))
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

    assert main(["--home", home, "hosts", "--json"]) == 0
    json.loads(capsys.readouterr().out)
    assert not output.json_mode()


def test_a_master_installed_from_a_wheel_releases_its_installed_distribution(monkeypatch, tmp_path):
    """No checkout around decnet (site-packages): the release is built from what is installed;
    ``--root`` still releases a checkout."""
    import argparse

    from decnet.cli import updates

    monkeypatch.setattr(updates, "default_root", lambda: tmp_path)  # site-packages: no setup.cfg
    assert updates.release_root(argparse.Namespace(root=None)) is None
    assert updates.release_root(argparse.Namespace(root=str(REPO_ROOT))) == REPO_ROOT
    monkeypatch.setattr(updates, "default_root", lambda: REPO_ROOT)
    assert updates.release_root(argparse.Namespace(root=None)) == REPO_ROOT
