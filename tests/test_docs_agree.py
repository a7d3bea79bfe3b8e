"""The docs agree with one another and with the code: paths, defaults, trees, examples."""

from __future__ import annotations

import configparser
import json
import re
import shlex
from pathlib import Path

import pytest

from decnet import config
from decnet.forwarder import tap as forwarder_tap
from decnet.master import enrollment

REPO = Path(__file__).resolve().parent.parent
DOCS = [*sorted((REPO / "docs").glob("*.md")), REPO / "README.md"]
OPERATIONS = REPO / "docs" / "Operations.md"
# Where DECNET keeps things on real hosts; Operations.md's table says who owns each.
HOST_PATH = re.compile(
    r"(?:/etc/decnet|/var/lib/decnet[a-z-]*|/opt/decnet|/var/log/decnet|/var/cache/decnet[a-z-]*)"
    r"[A-Za-z0-9_./<>-]*"
)


def unit_option(unit: str, option: str) -> str:
    text = (REPO / "contrib" / "systemd" / unit).read_text().replace("\\\n", " ")
    (line,) = [x for x in text.splitlines() if x.startswith("ExecStart=")]
    argv = shlex.split(line.partition("=")[2])
    return argv[argv.index(option) + 1]


def operations_table_paths() -> list[str]:
    """The first column of Operations.md's "what lives where" table."""
    rows = re.findall(r"^\| `(/[^`]+)`", OPERATIONS.read_text(), flags=re.M)
    return [row.rstrip("/") for row in rows]


def test_every_host_path_in_the_docs_is_one_operations_md_lists_or_lies_under():
    listed = operations_table_paths()
    assert "/etc/decnet/bundle" in listed and "/var/lib/decnet-master" in listed
    strays = {}
    for doc in DOCS:
        for path in HOST_PATH.findall(doc.read_text()):
            path = path.rstrip("/.")
            known = any(path == p or path.startswith(p + "/") or p.startswith(path + "/")
                        for p in listed)  # fmt: skip
            if not known:
                strays.setdefault(doc.name, set()).add(path)
    assert not strays, f"paths no table in Operations.md lists: {strays}"


def test_the_forwarders_state_default_is_where_its_unit_and_the_docs_put_it(master_home, tmp_path):
    enrollment.enroll(enrollment.load_master(master_home), "docs-fwd", "127.0.0.1", tmp_path / "b")
    options = forwarder_tap.Options()
    options.parseOptions(["--bundle", str(tmp_path / "b"), "--master-host", "127.0.0.1"])
    unit_state = unit_option("decnet-forwarder.service", "--state")
    assert str(options["state"]) == unit_state == config.DEFAULT_FORWARDER_STATE
    directory, name = unit_state.rsplit("/", 1)
    table_row = next(r for r in OPERATIONS.read_text().splitlines() if f"`{directory}/`" in r)
    assert name in table_row
    assert f"`{unit_state}`" in (REPO / "docs" / "Logging.md").read_text()


def test_the_master_port_help_names_every_place_the_port_comes_from(master_home, tmp_path):
    (row,) = [r for r in forwarder_tap.Options.optParameters if r[0] == "master-port"]
    assert config.ENV_SYSLOG_PORT in row[3] and "bundle" in row[3]
    assert str(config.SYSLOG_PORT) in row[3]
    enrollment.enroll(
        enrollment.load_master(master_home), "docs-port", "127.0.0.1", tmp_path / "b",
        syslog_port=9003,
    )  # fmt: skip
    options = forwarder_tap.Options()
    options.parseOptions(["--bundle", str(tmp_path / "b"), "--master-host", "127.0.0.1"])
    assert options["master-port"] == 9003  # the bundle's, as the help says


def swarm_mode_tree() -> dict[str, bool]:
    """SWARM-Mode.md's tree of the master home: path -> made by init (not marked "later")."""
    text = (REPO / "docs" / "SWARM-Mode.md").read_text()
    block = text.split("```\n~/.decnet/", 1)[1].split("```", 1)[0]
    entries: dict[str, bool] = {}
    parents: list[str] = []
    for line in block.splitlines()[1:]:
        match = re.match(r"^((?:│   |    )*)[├└]── (\S+)\s*(.*)$", line)
        assert match, line
        depth = len(match.group(1)) // 4
        name = match.group(2).rstrip("/")
        parents[depth:] = [name]
        entries["/".join(parents)] = not match.group(3).startswith("later")
    return entries


def test_the_swarm_mode_tree_is_exactly_what_init_makes(tmp_path):
    home = tmp_path / "home"
    enrollment.init_master(config.MasterPaths.resolve(home))
    made = {str(p.relative_to(home)) for p in home.rglob("*")}
    made -= {m for m in made if m.startswith("registry.sqlite-")}  # SQLite's WAL files
    tree = swarm_mode_tree()
    assert {p for p, by_init in tree.items() if by_init} == made
    assert not {p for p, by_init in tree.items() if not by_init} & made


def test_no_deploy_example_puts_a_decky_on_a_worker_of_the_same_name():
    spec = json.loads((REPO / "docs" / "example-spec.json").read_text())
    deckies = {d["name"] for d in spec["deckies"]}
    hosts = set()
    for doc in DOCS:
        hosts |= set(re.findall(r"decnet-admin (?:enroll|deploy) ([a-z0-9.-]+)", doc.read_text()))
    assert hosts and not deckies & hosts, deckies & hosts


def test_the_license_file_is_the_one_setup_cfg_names():
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    assert setup["metadata"]["license"] == "MIT"
    assert (REPO / "LICENSE").read_text().startswith("MIT License\n")


@pytest.mark.parametrize("doc", ["Operations.md", "Remote-Updates.md"])
def test_the_json_field_the_docs_send_operators_to_exists(doc):
    """Operations.md's troubleshooting names update --json's output.agent: it is there
    (tests/test_cli_update.py checks it is filled)."""
    from decnet.master.rollout import HostResult

    text = (REPO / "docs" / doc).read_text()
    assert "results[].output" in text
    assert "output" in HostResult("h", "failed").as_dict()
