"""decnet-admin init / enroll / hosts / decommission, through the installed console script."""

import json
import os
import shutil
import stat
import subprocess

import pytest

from decnet import config, pki, revocation
from decnet.cli import output
from decnet.errors import ValidationError
from decnet.master import enrollment
from decnet.tls import Accept, PeerPolicy, Refusal, RefusalKind
from tests.support import BIN

ADMIN = str(BIN / "decnet-admin")


def admin(home, *args, env=None, check=None):
    result = subprocess.run(
        [ADMIN, "--home", str(home), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )
    if check is not None:
        assert result.returncode == check, (result.stdout, result.stderr)
    return result


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("cli") / "home"
    admin(home, "init", check=0)
    return home


def test_init_is_idempotent_and_prints_the_ca_fingerprint(home):
    ca_before = (home / "ca" / "ca.crt").read_bytes()
    out = admin(home, "init", check=0).stdout
    assert (home / "ca" / "ca.crt").read_bytes() == ca_before
    fp = pki.colon_fingerprint(pki.fingerprint(pki.load_cert(home / "ca" / "ca.crt")))
    assert fp in out
    assert str(home / "master" / "master.crt") in out
    assert stat.S_IMODE(os.stat(home / "master" / "master.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(home).st_mode) == 0o700


def test_decnet_home_selects_the_state_directory(tmp_path):
    result = subprocess.run(
        [ADMIN, "init"],
        capture_output=True,
        text=True,
        env={**os.environ, config.ENV_HOME: str(tmp_path / "envhome")},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "envhome" / "ca" / "ca.crt").exists()


def test_enroll_with_updater_writes_a_complete_bundle(home, tmp_path):
    out = tmp_path / "web-01"
    result = admin(
        home, "enroll", "web-01", "--address", "10.1.2.3", "--san", "web.example", "--updater",
        "--out", str(out), check=0,
    )  # fmt: skip
    assert "Enrolled web-01" in result.stdout
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "bundle.json",
        "ca.crt",
        "updater.crt",
        "updater.key",
        "worker.crt",
        "worker.key",
    ]
    for key in ("worker.key", "updater.key"):
        assert stat.S_IMODE(os.stat(out / key).st_mode) == 0o600
    settings = json.loads((out / "bundle.json").read_text())
    master_fp = pki.fingerprint(pki.load_cert(home / "master" / "master.crt"))
    assert settings["master_fingerprint"] == master_fp
    assert settings["name"] == "web-01" and settings["agent_port"] == config.AGENT_PORT
    worker = pki.identity_of(pki.load_cert(out / "worker.crt"))
    updater = pki.identity_of(pki.load_cert(out / "updater.crt"))
    assert (worker.cn, worker.role) == ("web-01", "worker")
    assert (updater.cn, updater.role) == ("updater@web-01", "updater")
    # The master keeps fingerprints only: no private key anywhere under --home but its own.
    keys = sorted(p.name for p in home.rglob("*.key"))
    assert keys == ["ca.key", "listener.key", "master.key"]
    hosts = json.loads(admin(home, "hosts", "--json", check=0).stdout)
    row = next(h for h in hosts if h["name"] == "web-01")
    assert row["worker_fingerprint"] == worker.fingerprint
    assert row["updater_fingerprint"] == updater.fingerprint
    assert row["status"] == "enrolled"


def test_every_enroll_option_reaches_the_bundle_the_certificates_and_the_registry(
    home, tmp_path, capsys
):
    from cryptography.hazmat.primitives.asymmetric import rsa

    from decnet.cli.main import main

    out = tmp_path / "opt-01"
    argv = ["--home", str(home), "enroll", "opt-01", "--address", "10.0.0.5", "--updater",
            "--agent-port", "9001", "--updater-port", "9002", "--syslog-port", "9003",
            "--master-host", "10.9.9.9", "--key-type", "rsa-2048", "--validity-days", "30",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    settings = json.loads((out / "bundle.json").read_text())
    assert (settings["agent_port"], settings["updater_port"], settings["syslog_port"]) == (
        9001,
        9002,
        9003,
    )
    assert settings["master_host"] == "10.9.9.9"
    for name in ("worker.crt", "updater.crt"):
        cert = pki.load_cert(out / name)
        assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days in (30, 31)
        assert (
            isinstance(cert.public_key(), rsa.RSAPublicKey) and cert.public_key().key_size == 2048
        )
    row = next(
        h
        for h in json.loads(admin(home, "hosts", "--json", check=0).stdout)
        if h["name"] == "opt-01"
    )
    assert (row["agent_port"], row["updater_port"]) == (9001, 9002) and row["updater_fingerprint"]


def test_enroll_without_updater_and_the_host_table(home, tmp_path):
    admin(
        home, "enroll", "db-01", "--address", "db.internal", "--out", str(tmp_path / "b"), check=0
    )
    assert not (tmp_path / "b" / "updater.key").exists()
    table = admin(home, "hosts", check=0).stdout
    line = next(ln for ln in table.splitlines() if ln.startswith("db-01"))
    assert "db.internal" in line and "enrolled" in line and line.split()[5] == "no"
    assert table.splitlines()[0].split()[:3] == ["NAME", "ADDRESS", "STATUS"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["decnet-master", "--address", "10.0.0.1"], "reserved"),
        (["updater@x", "--address", "10.0.0.1"], "reserved"),
        (["Bad_Name", "--address", "10.0.0.1"], "invalid host name"),
        (["okname", "--address", "not an address"], "invalid address"),
        (["okname", "--address", "10.0.0.1", "--san", "a b"], "invalid address"),
        (["okname", "--address", "10.0.0.1", "--agent-port", "70000"], "not in 1-65535"),
        (["okname", "--address", "10.0.0.1", "--validity-days", "0"], "validity of 0 days"),
    ],
)
def test_bad_enroll_input_is_refused_and_nothing_is_written(home, tmp_path, args, message):
    out = tmp_path / "bundle"
    result = admin(home, "enroll", *args, "--out", str(out), check=1)
    assert message in result.stderr
    assert result.stderr.startswith("decnet-admin: error:")
    assert not out.exists()
    assert "okname" not in admin(home, "hosts", check=0).stdout


def test_every_problem_of_an_enrollment_is_reported_at_once_in_order(master_home, tmp_path):
    out = tmp_path / "full"
    out.mkdir()
    (out / "mine").write_text("")
    with pytest.raises(ValidationError) as caught:
        enrollment.enroll(
            enrollment.load_master(master_home),
            "Bad_Name",
            "not an address",
            out,
            sans=["10.0.0.1", "a b"],
            agent_port=0,
            updater_port=70000,
            validity_days=0,
        )
    problems = caught.value.problems
    assert [p.split()[0:2] for p in problems] == [
        ["invalid", "host"],
        ["invalid", "address"],
        ["invalid", "address"],
        ["agent", "port"],
        ["updater", "port"],
        ["validity", "of"],
        [str(out), "already"],
    ]
    assert "'a b'" in problems[2]


def test_a_duplicate_name_is_refused_and_its_bundle_dir_stays_absent(home, tmp_path):
    admin(home, "enroll", "dup-01", "--address", "10.0.0.9", "--out", str(tmp_path / "a"), check=0)
    result = admin(
        home, "enroll", "dup-01", "--address", "10.0.0.9", "--out", str(tmp_path / "b"), check=1
    )
    assert "already enrolled" in result.stderr
    assert not (tmp_path / "b").exists()


def test_an_existing_non_empty_out_dir_is_refused_without_touching_the_registry(home, tmp_path):
    out = tmp_path / "full"
    out.mkdir()
    (out / "mine").write_text("do not touch")
    result = admin(home, "enroll", "full-01", "--address", "10.0.0.2", "--out", str(out), check=1)
    assert "not empty" in result.stderr
    assert [p.name for p in out.iterdir()] == ["mine"]
    assert "full-01" not in admin(home, "hosts", check=0).stdout


def test_enroll_before_init_says_what_to_do(tmp_path):
    result = admin(
        tmp_path / "empty",
        "enroll",
        "w1",
        "--address",
        "10.0.0.1",
        "--out",
        str(tmp_path / "o"),
        check=1,
    )
    assert "does not exist" in result.stderr and "init`" in result.stderr
    assert not (tmp_path / "o").exists()


def test_decommission_revokes_both_certificates(home, tmp_path):
    admin(
        home,
        "enroll",
        "gone-01",
        "--address",
        "10.0.0.3",
        "--updater",
        "--out",
        str(tmp_path / "g"),
        check=0,
    )
    result = admin(home, "decommission", "gone-01", "--yes", "--no-teardown", check=0)
    assert "Decommissioned gone-01" in result.stdout
    listed = revocation.read_entries(home / "listener" / "revoked.json")
    revoked = {e["fingerprint"]: e for e in listed}
    worker_fp = pki.fingerprint(pki.load_cert(tmp_path / "g" / "worker.crt"))
    updater_fp = pki.fingerprint(pki.load_cert(tmp_path / "g" / "updater.crt"))
    assert revoked[worker_fp]["cn"] == "gone-01"
    assert revoked[updater_fp]["cn"] == "updater@gone-01"
    line = next(
        ln for ln in admin(home, "hosts", check=0).stdout.splitlines() if ln.startswith("gone-01")
    )
    assert "decommissioned" in line
    again = admin(home, "decommission", "gone-01", "--yes", "--no-teardown", check=0)
    assert "already decommissioned" in again.stdout and "2 revocation entries are in place" in (
        again.stdout
    )


def _fresh_home(home, tmp_path):
    """A new master state directory with the module's CA and master identity (no RSA keygen)."""
    new = tmp_path / "home"
    new.mkdir(mode=0o700)
    for sub in ("ca", "master"):
        shutil.copytree(home / sub, new / sub)
    paths = config.MasterPaths.resolve(new)
    enrollment.init_master(paths)
    return paths


def test_twelve_parallel_decommissions_leave_twelve_revocation_entries(home, tmp_path):
    """Each run reads, extends and rewrites revoked.json: without the lock, later renames lost
    the entries of runs in between while every host was still marked decommissioned."""
    paths = _fresh_home(home, tmp_path)
    master = enrollment.load_master(paths)
    names = [f"race-{i:02d}" for i in range(12)]
    fps = {
        enrollment.enroll(master, n, "10.0.0.1", tmp_path / n).host.worker_fingerprint
        for n in names
    }
    procs = [
        subprocess.Popen(
            [ADMIN, "--home", str(paths.home), "decommission", n, "--yes", "--no-teardown"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in names
    ]
    outcomes = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert [rc for rc, _, _ in outcomes] == [0] * 12, outcomes
    entries = revocation.read_entries(paths.revocations)
    assert len(entries) == 12
    assert {e["fingerprint"] for e in entries} == fps
    # What the listener checks in every handshake: all twelve certificates are refused.
    listener = PeerPolicy(
        [Accept(config.ROLE_WORKER)], revocations=revocation.RevocationSet(paths.revocations)
    )
    for n in names:
        identity = pki.identity_of(pki.load_cert(tmp_path / n / config.BUNDLE_WORKER_CERT))
        revoked = Refusal(RefusalKind.REVOKED, f"certificate of {n!r} is revoked")
        assert listener.check(identity) == revoked
    hosts = json.loads(admin(paths.home, "hosts", "--json", check=0).stdout)
    assert {h["name"] for h in hosts if h["status"] == "decommissioned"} == set(names)


def test_decommissioning_again_restores_a_lost_revocation_entry_and_says_so(home, tmp_path):
    paths = _fresh_home(home, tmp_path)
    master = enrollment.load_master(paths)
    host = enrollment.enroll(master, "lost-01", "10.0.0.1", tmp_path / "b", updater=True).host
    admin(paths.home, "decommission", "lost-01", "--yes", "--no-teardown", check=0)
    first = revocation.read_entries(paths.revocations)
    # What the unlocked race left behind: the host is decommissioned, one entry is gone.
    doc = json.loads(paths.revocations.read_text())
    doc["revoked"] = [e for e in doc["revoked"] if e["fingerprint"] != host.worker_fingerprint]
    paths.revocations.write_text(json.dumps(doc))
    assert host.worker_fingerprint not in revocation.RevocationSet(paths.revocations)

    again = admin(paths.home, "decommission", "lost-01", "--yes", "--no-teardown", check=0)
    assert "already decommissioned" in again.stdout
    assert "restored 1 missing revocation entry" in again.stdout
    assert "worker" in again.stdout and output.short_fp(host.worker_fingerprint) in again.stdout
    restored = {e["fingerprint"]: e for e in revocation.read_entries(paths.revocations)}
    assert restored == {e["fingerprint"]: e for e in first}  # same cn, role and revoked_at


def test_decommission_of_an_unknown_host_is_an_error(home):
    result = admin(home, "decommission", "nobody", "--yes", check=1)
    assert "no host named 'nobody'" in result.stderr


@pytest.mark.parametrize("command", ["init", "enroll", "hosts", "decommission"])
def test_every_command_has_help(command):
    result = subprocess.run([ADMIN, command, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "usage: decnet-admin" in result.stdout and "--home" in result.stdout


def test_missing_arguments_are_usage_errors():
    result = subprocess.run([ADMIN, "enroll"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "required" in result.stderr


def test_a_second_init_keeps_the_master_address_and_prints_a_change_as_old_to_new(tmp_path):
    home = tmp_path / "home"
    admin(home, "init", "--master-host", "10.0.0.1", check=0)
    again = admin(home, "init", check=0)  # no --master-host: the stored one stays
    assert "10.0.0.1" in again.stdout and "->" not in again.stdout
    bundle = tmp_path / "w1"
    admin(home, "enroll", "w1", "--address", "10.0.0.2", "--out", str(bundle), check=0)
    assert json.loads((bundle / "bundle.json").read_text())["master_host"] == "10.0.0.1"
    changed = admin(home, "init", "--master-host", "10.0.0.9", check=0)
    assert "Master host changed: 10.0.0.1 -> 10.0.0.9" in changed.stdout
    doc = json.loads(admin(home, "init", "--json", check=0).stdout)
    assert (doc["master_host"], doc["previous_master_host"]) == ("10.0.0.9", "10.0.0.9")
