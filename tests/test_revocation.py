"""The revocation list file and its live reload."""

import fcntl
import json
import os
import subprocess

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.python import usage

from decnet import revocation
from decnet.errors import ConfigError
from decnet.revocation import FORMAT, RevocationSet, RevocationWatcher, add_entries, read_entries

FP1, FP2 = "1" * 64, "2" * 64


def test_a_missing_file_is_an_empty_list(tmp_path):
    assert read_entries(tmp_path / "revoked.json") == []
    assert len(RevocationSet(tmp_path / "revoked.json")) == 0


def test_entries_are_appended_once_and_written_in_the_documented_format(tmp_path):
    path = tmp_path / "revoked.json"
    add_entries(path, [{"fingerprint": FP1, "cn": "w1", "role": "worker", "revoked_at": "t"}])
    added = add_entries(path, [{"fingerprint": FP1.upper(), "cn": "w1"}, {"fingerprint": FP2}])
    assert added == [{"fingerprint": FP2}]
    doc = json.loads(path.read_text())
    assert doc["format"] == FORMAT
    assert [e["fingerprint"] for e in doc["revoked"]] == [FP1, FP2]
    stamp = path.stat().st_ino
    assert add_entries(path, [{"fingerprint": FP2}]) == []
    assert path.stat().st_ino == stamp  # nothing new: not rewritten


def test_the_rewrite_happens_while_the_revocation_lock_is_held(tmp_path, monkeypatch):
    """add_entries holds .revoked.json.lock across its read-modify-write."""
    path = tmp_path / "revoked.json"
    held = []
    real_write = revocation.atomic_write

    def write_and_probe(target, data):
        fd = os.open(tmp_path / ".revoked.json.lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held.append(False)
        except BlockingIOError:
            held.append(True)
        finally:
            os.close(fd)
        real_write(target, data)

    monkeypatch.setattr(revocation, "atomic_write", write_and_probe)
    add_entries(path, [{"fingerprint": FP1}])
    add_entries(path, [{"fingerprint": FP2}])
    assert held == [True, True]
    assert FP1 in RevocationSet(path) and FP2 in RevocationSet(path)


@pytest.mark.parametrize(
    "body",
    [
        "{",
        "[]",
        '{"format": "x", "revoked": []}',
        '{"format": "decnet-revocations/1", "revoked": [{"fingerprint": "zz"}]}',
    ],
)
def test_a_malformed_file_is_an_error_naming_it(tmp_path, body):
    path = tmp_path / "revoked.json"
    path.write_text(body)
    with pytest.raises(ConfigError, match=r"revoked\.json"):
        RevocationSet(path)


def test_reload_picks_up_changes_and_tells_subscribers_what_is_new(tmp_path):
    path = tmp_path / "revoked.json"
    rs = RevocationSet(path)
    seen = []
    rs.subscribe(seen.append)
    assert rs.reload() is False
    add_entries(path, [{"fingerprint": FP1}])
    assert rs.reload() is True
    assert FP1 in rs and FP2 not in rs
    assert seen == [frozenset({FP1})]


def test_a_set_without_a_file_keeps_its_fingerprints_when_reloaded():
    rs = RevocationSet(fingerprints=[FP1])
    assert rs.read_if_changed() is None
    assert rs.reload() is False
    assert FP1 in rs and len(rs) == 1


@pytest_twisted.ensureDeferred
async def test_the_watcher_reloads_off_the_reactor_and_survives_a_bad_file(tmp_path):
    path = tmp_path / "revoked.json"
    rs = RevocationSet(path)
    watcher = RevocationWatcher(rs, reactor, interval=3600)
    add_entries(path, [{"fingerprint": FP1}])
    await watcher.check()
    assert FP1 in rs
    path.write_text("not json")
    await watcher.check()  # logs an error, keeps the previous list
    assert FP1 in rs


# -- who enforces the list (docs/Security.md#revocation) ------------------------


def _help(options: usage.Options) -> str:
    return " ".join(str(options).split())


def test_the_agent_has_no_revocations_option_and_its_help_says_what_it_trusts_instead():
    """Its --revocations flag was unused: no unit or sandbox passed a list; none reaches workers."""
    from decnet.agent import tap

    with pytest.raises(usage.UsageError, match="revocations"):
        tap.Options().parseOptions(["--revocations", "revoked.json"])
    text = _help(tap.Options())
    assert "fingerprint is pinned in the bundle" in text
    assert "keeps no revocation list" in text


def test_the_updater_help_says_it_keeps_no_revocation_list_and_pins_the_master():
    from decnet.updater import tap

    text = _help(tap.Options())
    assert "fingerprint is pinned in the bundle" in text
    assert "keeps no revocation list" in text


def test_decommission_help_names_the_parties_that_enforce_the_list():
    from tests.support import BIN

    out = subprocess.run(
        [str(BIN / "decnet-admin"), "decommission", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    text = " ".join(out.split())
    assert "log listener refuses them" in text and "never contacts the host again" in text
    assert "agents" not in text and "updaters" not in text
